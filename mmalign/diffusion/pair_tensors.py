"""Preference pairs turned into training tensors once: VAE posteriors of both images (both orientations when
flips are on), text conditioning of each caption, SDXL size/crop conditioning — stored in the persistent cache
(`cache.load_or_compute`) keyed by the model's encoders, the preprocessing and the data: the data file or folder
and every image file its rows name (beside a jsonl, or outside the folder), by size and mtime, so a changed image
is a new entry. Training never runs the VAE encoder or the text encoders, and a second run on the same data starts
at once.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..datasets.pairs import load_pair_images, read_pairs, referenced_files
from ..datasets.records import SkipReport
from ..datasets.cache import file_fingerprint, files_fingerprint, fingerprint, load_or_compute, model_fingerprint
from .pipeline import SDComponents, encode_prompts, preprocess

CACHE_VERSION = 2  # 2: the key covers the image files the rows name


class PairTensors(torch.utils.data.Dataset):
    """Row i: posterior mean/std of winner and loser [V, C, h, w] (V views: as-is, flipped), the caption's
    conditioning, and for SDXL each image's original size and crop per view."""

    def __init__(self, t: dict[str, torch.Tensor]):
        self.t = t
        self.cond_keys = [k for k in ("ctx", "pooled") if k in t]

    def __len__(self):
        return len(self.t["mean_w"])

    def __getitem__(self, i):
        row = {k: self.t[k][i] for k in ("mean_w", "std_w", "mean_l", "std_l")}
        cap = self.t["caption_index"][i]
        row.update({k: self.t[k][cap] for k in self.cond_keys})
        if "size_w" in self.t:
            row.update({k: self.t[k][i] for k in ("size_w", "size_l", "crop_w", "crop_l")})
        return row

    def empty_cond(self) -> dict[str, torch.Tensor]:
        """Conditioning of the empty prompt (caption dropout, null-condition positives)."""
        return {k: self.t[f"empty_{k}"][0] for k in self.cond_keys}


def build_pair_tensors(parts: SDComponents, data_path: str, resolution: int, flips: bool, ties: str,
                       bad_rows: str, device: torch.device, cache_dir: str | None, encode_batch: int = 32,
                       log=print) -> tuple[PairTensors, SkipReport]:
    # else a hub id, keyed by its name. A local source's path column is re-read and its images stat-ed on every run,
    # hits too (stat only: seconds at 1 M rows); images inside a data folder are stat-ed by both fingerprints.
    local = Path(data_path).exists()
    key = {"version": CACHE_VERSION, "kind": "diffusion_pairs",
           "model": model_fingerprint(parts.source, _encoder_folders(parts)),
           "text_encoder_dtype": str(parts.text_encoder.dtype if parts.text_encoder is not None
                                     else parts.text_encoder_2.dtype),
           "data": {"path": str(Path(data_path).resolve()) if local else data_path,
                    "files": file_fingerprint(data_path) if local else None,
                    "images": files_fingerprint(referenced_files(data_path)) if local else None},
           "resolution": resolution, "flips": flips, "ties": ties, "bad_rows": bad_rows}
    report_box: list[SkipReport] = []

    def compute():
        t, report = _encode(parts, data_path, resolution, flips, ties, bad_rows, device, encode_batch)
        report_box.append(report)
        return t

    if cache_dir:
        tensors, hit = load_or_compute(cache_dir, key, compute, log=log)
        report_file = Path(cache_dir) / fingerprint(key)[:20] / "data_report.json"
        if report_box:
            report_file.write_text(json.dumps(report_box[0].to_dict(), indent=1))
            report = report_box[0]
        else:
            report = _report_from(json.loads(report_file.read_text())) if report_file.is_file() else SkipReport()
    else:
        tensors = compute()
        report = report_box[0]
    return PairTensors(tensors), report


def _encoder_folders(parts: SDComponents) -> list[str]:
    return ["vae", "text_encoder", "tokenizer"] + (["text_encoder_2", "tokenizer_2"] if parts.is_sdxl else [])


def _report_from(d: dict) -> SkipReport:
    r = SkipReport(total=d["total"], kept=d["kept"])
    r.skipped.update(d["skipped"])
    r.examples.update(d["examples"])
    return r


@torch.no_grad()
def _encode(parts, data_path, resolution, flips, ties, bad_rows, device, encode_batch):
    records, report = read_pairs(data_path, ties=ties, bad_rows=bad_rows)
    views = (False, True) if flips else (False,)
    out = {k: [] for k in ("mean_w", "std_w", "mean_l", "std_l", "size_w", "size_l", "crop_w", "crop_l")}
    captions: list[str] = []
    pending: list[tuple] = []

    def flush():
        # pending: (pixels [2, V, 3, R, R], sizes [2, 2], crops [2, V, 2]) per pair
        px = torch.stack([p for p, _, _ in pending]).to(device)  # [P, 2, V, 3, R, R]
        shape = px.shape
        post = parts.vae.encode(px.flatten(0, 2)).latent_dist
        mean = post.mean.view(*shape[:3], *post.mean.shape[1:]).cpu()
        std = post.std.view(*shape[:3], *post.std.shape[1:]).cpu()
        out["mean_w"].append(mean[:, 0])
        out["mean_l"].append(mean[:, 1])
        out["std_w"].append(std[:, 0])
        out["std_l"].append(std[:, 1])
        for side, j in (("w", 0), ("l", 1)):
            out[f"size_{side}"].append(torch.stack([s[j] for _, s, _ in pending]))
            out[f"crop_{side}"].append(torch.stack([c[j] for _, _, c in pending]))
        pending.clear()

    kept = 0
    for rec in tqdm(records, desc="encode pairs", unit="pair"):  # decode all now: a bad image is a counted skip
        images = load_pair_images(rec, report, bad_rows)
        if images is None:
            continue
        pix, sizes, crops = [], [], []
        for im in images:
            per_view = [preprocess(im, resolution, flip=f) for f in views]
            pix.append(torch.stack([p for p, _ in per_view]))
            sizes.append(torch.tensor(per_view[0][1]["original_size"]))
            crops.append(torch.tensor([list(info["crop_top_left"]) for _, info in per_view]))
        pending.append((torch.stack(pix), torch.stack(sizes), torch.stack(crops)))
        captions.append(rec.caption)
        kept += 1
        if len(pending) == encode_batch:
            flush()
    if pending:
        flush()
    report.kept = kept
    if not kept:
        raise ValueError(f"{data_path}: no usable pairs ({report.summary()})")
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    t = {k: torch.cat(v) for k, v in out.items()}
    t["caption_index"] = torch.tensor([index[c] for c in captions])
    t.update(encode_prompts(parts, unique, device))
    t.update({f"empty_{k}": v for k, v in encode_prompts(parts, [""], device).items()})
    return t, report
