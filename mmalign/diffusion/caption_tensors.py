"""A caption folder (`records.read_caption_folder`'s format) turned into SFT training tensors once: VAE
posterior mean/std of each image (and of its mirror with random_flip) and each caption's text embeddings (or token
ids when the text encoder trains), in a sharded cache entry (`datasets.shards.build_sharded`), so neither encoding
nor training holds the data set in memory. Workers validate rows (`records.caption_record`), decode and crop the
images (uint8); the main process encodes one shard at a time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torchvision.transforms import v2 as T

from ..datasets.cache import file_fingerprint, files_fingerprint, model_fingerprint
from ..datasets.records import SkipReport, caption_folder_meta, caption_record, check_policy, open_rgb
from ..datasets.row_source import RowSource
from ..datasets.shards import ShardedRows, build_sharded

CACHE_VERSION = 2  # 2: keyed by metadata.jsonl and the image files its rows name (not a listing of the folder)


class CachedLatents(torch.utils.data.Dataset):
    """Row i: {"mean", "std": the VAE posterior [C, h, w], "text": the caption's embeddings, or its token ids when
    the text encoder trains}; with random_flip, row 2k is kept image k and row 2k + 1 its mirror (stored as views
    [V, C, h, w] of one cached row). A lazy view of a sharded entry; picklable for DataLoader workers."""

    def __init__(self, rows: ShardedRows, views: int):
        self.rows, self.views = rows, views

    def __len__(self):
        return len(self.rows) * self.views

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        row, v = self.rows[i // self.views], i % self.views
        return {"mean": row["mean"][v], "std": row["std"][v], "text": row["text"]}


class PrepareCaptions:
    """`prepare` of the shard builder (in a worker): valid rows' images decoded (a bad one is a counted skip),
    resized and centre-cropped: {"px": uint8 [n, 3, R, R], "captions": [n]}."""

    def __init__(self, folder: Path, resolution: int, bad_rows: str):
        self.folder, self.bad_rows = folder, bad_rows
        self.crop = T.Compose([T.Resize(resolution), T.CenterCrop(resolution), T.PILToTensor()])

    def __call__(self, rows, report: SkipReport) -> dict:
        px, captions = [], []
        for where, obj, _ in rows:
            rec = caption_record(where, obj, self.folder, report, self.bad_rows)
            if rec is None:
                continue
            im = open_rgb(rec.image_path, report, self.bad_rows, str(rec.image_path))
            if im is None:
                continue
            px.append(self.crop(im))
            captions.append(rec.caption)
        report.kept = len(captions)
        return {"px": torch.stack(px), "captions": captions} if captions else {}


@torch.no_grad()
def encode_captions(vae, device, encode_text: Callable[[list[str]], torch.Tensor], flips: bool,
                    encode_batch: int, prep: dict) -> dict:
    """`encode` of the shard builder (main process): posteriors [n, V, C, h, w] (V = 2 with flips: as is,
    mirrored), `encode_batch` images per VAE call, and the shard's unique captions as its caption table."""
    to_float = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize([0.5] * 3, [0.5] * 3)])
    means, stds = [], []
    for i in range(0, len(prep["px"]), encode_batch):
        x = to_float(prep["px"][i:i + encode_batch].to(device))
        x = torch.stack([x, x.flip(-1)], dim=1) if flips else x.unsqueeze(1)  # [P, V, 3, R, R]
        post = vae.encode(x.flatten(0, 1)).latent_dist
        means.append(post.mean.view(*x.shape[:2], *post.mean.shape[1:]).cpu())
        stds.append(post.std.view(*x.shape[:2], *post.std.shape[1:]).cpu())
    unique = sorted(set(prep["captions"]))
    index = {c: i for i, c in enumerate(unique)}
    caption_index = torch.tensor([index[c] for c in prep["captions"]])
    return {"rows": {"mean": torch.cat(means), "std": torch.cat(stds), "caption_index": caption_index},
            "tables": {"caption": {"text": encode_text(unique)}}}


def referenced_images(source: RowSource, folder: Path):
    """The image file each row of a caption folder's metadata names (rows without a file_name name none)."""
    for _, obj, _ in source.rows():
        if isinstance(obj, dict) and isinstance(obj.get("file_name"), str) and obj["file_name"]:
            yield folder / obj["file_name"]


def build_caption_latents(parts, folder: str, resolution: int, flips: bool, bad_rows: str, text_kind: str,
                          encode_text: Callable[[list[str]], torch.Tensor], device, cache_dir: str | Path,
                          encode_batch: int = 32, shard_rows: int = 256, encode_workers: int = 0,
                          log=print) -> tuple[CachedLatents, SkipReport]:
    """The caption folder as a lazy CachedLatents over the sharded entry under `cache_dir` (encoded first on a
    miss; `text_kind` names what `encode_text` returns, for the key), and the report merged over shards."""
    check_policy(bad_rows)
    meta = caption_folder_meta(folder)
    source = RowSource(meta)
    key = {"version": CACHE_VERSION, "kind": "diffusion_sft",
           "model": model_fingerprint(parts.source, ["vae", "text_encoder", "tokenizer"]),
           "text_encoder_dtype": str(parts.text_encoder.dtype), "text": text_kind,
           # metadata.jsonl and every image its rows name (inside the folder or not), streamed, by size and mtime
           "data": {"path": str(Path(folder).resolve()), "files": file_fingerprint(meta),
                    "images": files_fingerprint(referenced_images(source, Path(folder)))},
           "resolution": resolution, "flips": flips, "bad_rows": bad_rows, "shard_rows": shard_rows}
    rows = build_sharded(cache_dir, key, n_rows=len(source), read=source.rows,
                         prepare=PrepareCaptions(Path(folder), resolution, bad_rows),
                         encode=lambda prep: encode_captions(parts.vae, device, encode_text, flips, encode_batch,
                                                             prep),
                         shard_rows=shard_rows, num_workers=encode_workers, log=log, desc="encode images")
    return CachedLatents(rows, 2 if flips else 1), rows.report
