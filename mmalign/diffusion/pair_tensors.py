"""Preference pairs turned into training tensors once: VAE posteriors of both images (both orientations when
flips are on), text conditioning of each caption, SDXL size/crop conditioning — stored in a sharded cache entry
(`datasets.shards.build_sharded`) keyed by the model's encoders, the preprocessing, the shard size and the data:
the data file or folder and every image file its rows name (beside a jsonl, or outside the folder), by size and
mtime, so a changed image is a new entry. Training never runs the VAE encoder or the text encoders, and a second
run on the same data starts at once.

Memory does not grow with the data: `encode_workers` processes read, validate, decode and crop one shard of
`shard_rows` source rows at a time (uint8 pixels, one view), the main process encodes it (VAE, then the shard's
unique captions: a per-shard caption table) and writes it; training reads rows lazily from memory-mapped shards.
In flight per shard: ~6 B x R^2 per pair of pixels (6 MB at 1024 px) plus its encodings (posteriors 2 MB per pair
with flips at 1024 px, 0.6 MB per SDXL caption), for the shard being encoded and ~2 prepared ones per worker.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from ..datasets.cache import file_fingerprint, files_fingerprint, model_fingerprint
from ..datasets.pairs import check_ties, load_pair_images, pair_record, referenced_files
from ..datasets.records import SkipReport, check_policy
from ..datasets.row_source import RowSource
from ..datasets.shards import ShardedRows, build_sharded
from .pipeline import SDComponents, encode_prompts, preprocess

CACHE_VERSION = 3  # 2: the key covers the image files the rows name; 3: sharded entries (datasets.shards)


class PairTensors(torch.utils.data.Dataset):
    """Row i: posterior mean/std of winner and loser [V, C, h, w] (V views: as-is, flipped), the caption's
    conditioning (ctx, and for SDXL pooled), each image's original size [2] and crop [V, 2] (used by SDXL).
    A lazy view of a sharded entry; picklable for DataLoader workers."""

    def __init__(self, rows: ShardedRows):
        self.rows = rows
        self.empty = {k[len("empty_"):]: v[0] for k, v in rows.extras().items() if k.startswith("empty_")}

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    @property
    def report(self) -> SkipReport:
        """The data report merged over shards."""
        return self.rows.report

    def empty_cond(self) -> dict[str, torch.Tensor]:
        """Conditioning of the empty prompt (caption dropout, null-condition positives)."""
        return dict(self.empty)


def pair_cache_key(parts: SDComponents, data_path: str, resolution: int, flips: bool, ties: str, bad_rows: str,
                   shard_rows: int) -> dict:
    # else a hub id, keyed by its name. A local source's path column is re-read and its images stat-ed on every run,
    # hits too (stat only: seconds at 1 M rows); images inside a data folder are stat-ed by both fingerprints.
    local = Path(data_path).exists()
    return {"version": CACHE_VERSION, "kind": "diffusion_pairs",
            "model": model_fingerprint(parts.source, _encoder_folders(parts)),
            "text_encoder_dtype": str(parts.text_encoder.dtype if parts.text_encoder is not None
                                      else parts.text_encoder_2.dtype),
            "data": {"path": str(Path(data_path).resolve()) if local else data_path,
                     "files": file_fingerprint(data_path) if local else None,
                     "images": files_fingerprint(referenced_files(data_path)) if local else None},
            "resolution": resolution, "flips": flips, "ties": ties, "bad_rows": bad_rows,
            "shard_rows": shard_rows}


def build_pair_tensors(parts: SDComponents, data_path: str, resolution: int, flips: bool, ties: str,
                       bad_rows: str, device: torch.device, cache_dir: str | Path, encode_batch: int = 32,
                       log=print, shard_rows: int = 256, encode_workers: int = 0) -> tuple[PairTensors, SkipReport]:
    """The pairs of `data_path` as a lazy PairTensors over the sharded entry under `cache_dir` (encoded first on
    a miss), and the data report merged over shards (kept + skipped == total)."""
    check_policy(bad_rows)
    check_ties(ties)
    if not cache_dir:
        raise ValueError("build_pair_tensors needs a cache folder (the encodings are not kept in memory)")
    source = RowSource(data_path)
    key = pair_cache_key(parts, data_path, resolution, flips, ties, bad_rows, shard_rows)
    rows = build_sharded(cache_dir, key, n_rows=len(source), read=source.rows,
                         prepare=PreparePairs(resolution, flips, ties, bad_rows),
                         encode=partial(encode_pairs, parts, device, flips, encode_batch),
                         extras=partial(_empty_cond, parts, device), shard_rows=shard_rows,
                         num_workers=encode_workers, log=log, desc="encode pairs")
    report = rows.report
    if not len(rows):
        raise ValueError(f"{data_path}: no usable pairs ({report.summary()})")
    return PairTensors(rows), report


def _encoder_folders(parts: SDComponents) -> list[str]:
    extra = [s for s, enc in (("_2", parts.text_encoder_2), ("_3", parts.text_encoder_3)) if enc is not None]
    return ["vae", "text_encoder", "tokenizer"] + [f"{n}{s}" for s in extra for n in ("text_encoder", "tokenizer")]


def _empty_cond(parts: SDComponents, device) -> dict[str, torch.Tensor]:
    return {f"empty_{k}": v for k, v in encode_prompts(parts, [""], device).items()}


def flipped_left(size_hw: tuple[int, int], left: int, resolution: int) -> int:
    """The crop's left offset in the mirrored resized image, as `preprocess(flip=True)` reports it (its resize
    rule: shorter side to R, longer int(R * long / short))."""
    h, w = size_hw
    rw = resolution if w <= h else int(resolution * w / h)
    return rw - left - resolution


class PreparePairs:
    """`prepare` of the shard builder (runs in a worker): validate each raw row (`pairs.pair_record`), decode
    both images (`load_pair_images`: a bad image is a counted skip), resize and crop them (`preprocess`).
    Returns {"px": uint8 [n, 2, 3, R, R] (winner, loser; unflipped), "size": [n, 2, 2], "crop": [n, 2, V, 2],
    "captions": [n]}; the flipped view's pixels are the mirror of these, made on the device."""

    def __init__(self, resolution: int, flips: bool, ties: str, bad_rows: str):
        self.resolution, self.flips, self.ties, self.bad_rows = resolution, flips, ties, bad_rows

    def __call__(self, rows, report: SkipReport) -> dict:
        px, sizes, crops, captions = [], [], [], []
        for where, row, base in rows:
            rec = pair_record(where, row, base, report, self.ties, self.bad_rows)
            if rec is None:
                continue
            report.kept += 1
            images = load_pair_images(rec, report, self.bad_rows)  # takes a failed pair off report.kept
            if images is None:
                continue
            for im in images:
                x, info = preprocess(im, self.resolution)
                # preprocess's values are k / 127.5 - 1 for the uint8 pixel k: this round trip is exact
                px.append(x.add(1.0).mul(127.5).round_().to(torch.uint8))
                top, left = info["crop_top_left"]
                views = [(top, left)] + ([(top, flipped_left(info["original_size"], left, self.resolution))]
                                         if self.flips else [])
                sizes.append(torch.tensor(info["original_size"]))
                crops.append(torch.tensor(views))
            captions.append(rec.caption)
        if not captions:
            return {}
        r = self.resolution
        return {"px": torch.stack(px).view(-1, 2, 3, r, r), "size": torch.stack(sizes).view(-1, 2, 2),
                "crop": torch.stack(crops).view(len(captions), 2, -1, 2), "captions": captions}


@torch.no_grad()
def encode_pairs(parts: SDComponents, device, flips: bool, encode_batch: int, prep: dict) -> dict:
    """`encode` of the shard builder (main process): VAE posteriors of the shard's pairs, `encode_batch` pairs
    per call, and the conditioning of its unique captions as the shard's caption table."""
    means, stds = [], []
    for i in range(0, len(prep["px"]), encode_batch):
        x = prep["px"][i:i + encode_batch].to(device).float().div(127.5).sub(1.0)  # preprocess's values
        x = torch.stack([x, x.flip(-1)], dim=2) if flips else x.unsqueeze(2)  # [P, 2, V, 3, R, R]
        post = parts.vae.encode(x.flatten(0, 2)).latent_dist
        means.append(post.mean.view(*x.shape[:3], *post.mean.shape[1:]).cpu())
        stds.append(post.std.view(*x.shape[:3], *post.std.shape[1:]).cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    captions = prep["captions"]
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    rows = {"mean_w": mean[:, 0], "std_w": std[:, 0], "mean_l": mean[:, 1], "std_l": std[:, 1],
            "size_w": prep["size"][:, 0], "size_l": prep["size"][:, 1],
            "crop_w": prep["crop"][:, 0], "crop_l": prep["crop"][:, 1],
            "caption_index": torch.tensor([index[c] for c in captions])}
    return {"rows": rows, "tables": {"caption": encode_prompts(parts, unique, device)}}
