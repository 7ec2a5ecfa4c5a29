"""Video clips for the video methods: ShapeWorld motion clips or a folder of videos, turned into VAE posteriors
in the video layout (N, C, F, h, w), and datasets of such tensors: `TensorRows` in memory, or a sharded cache on
disk (`encode_sharded`, through `datasets.shards.build_sharded`) whose memory does not grow with the clips."""
from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from ..datasets.records import SkipReport, caption_folder_meta, caption_record, check_policy, reject
from ..diffusion.pipeline import preprocess
from .temporal import from_frame_batch


class TensorRows(torch.utils.data.Dataset):
    def __init__(self, **columns: torch.Tensor):
        self.columns = columns

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.columns.items()}


def frames_tensor(frames, resolution: int) -> torch.Tensor:
    """A clip (uint8 (F, H, W, 3) array or list of PIL frames) -> (F, 3, R, R) in [-1, 1] (resized and
    centre-cropped per frame when not already R x R)."""
    from PIL import Image

    arr = np.stack([np.asarray(f.convert("RGB")) if isinstance(f, Image.Image) else np.asarray(f) for f in frames])
    if arr.shape[1:3] != (resolution, resolution):
        return torch.stack([preprocess(Image.fromarray(f), resolution)[0] for f in arr])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def encode_clips(vae, clips: list, resolution: int, device, batch: int = 64,
                 num_frames: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) of each clip (frames, or a `frames_tensor` already), frame by frame: two
    (N, C, F, h, w) tensors on the CPU. Frames are converted a few clips at a time (about `batch` frames per VAE
    call), never the whole dataset at once. Every clip must have `num_frames` frames (default: as many as the
    first)."""
    means, stds, pending = [], [], []

    def flush():
        x = torch.stack(pending)  # (n, F, 3, R, R)
        post = vae.encode(x.flatten(0, 1).to(device)).latent_dist
        means.append(from_frame_batch(post.mean.cpu(), x.shape[1]))
        stds.append(from_frame_batch(post.std.cpu(), x.shape[1]))
        pending.clear()

    for i, clip in enumerate(clips):
        num_frames = num_frames or len(clip)
        if len(clip) != num_frames:
            raise ValueError(f"clip {i} has {len(clip)} frames, expected {num_frames}")
        pending.append(clip if isinstance(clip, torch.Tensor) else frames_tensor(clip, resolution))
        if len(pending) * len(pending[0]) >= batch:
            flush()
    if pending:
        flush()
    return torch.cat(means).contiguous(), torch.cat(stds).contiguous()


class ShapeWorldClips:
    """`n` ShapeWorld motion clips (caption, frames) by range, the same as drawing them in order from
    `random.Random(seed)`. A range goes on from where this process's last one ended (clips before it are drawn
    without rendering: a tiny frame), so ranges asked in increasing order draw each clip once per process."""

    def __init__(self, n: int, seed: int, num_frames: int, size: int):
        self.n, self.seed, self.num_frames, self.size = n, seed, num_frames, size
        self._rng, self._pos = None, 0

    def __len__(self) -> int:
        return self.n

    def __getstate__(self):
        return {**self.__dict__, "_rng": None, "_pos": 0}

    def rows(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, list]]:
        from ..datasets.shapeworld.video import sample_clip

        stop = self.n if stop is None else min(stop, self.n)
        if self._rng is None or start < self._pos:
            self._rng, self._pos = random.Random(self.seed), 0
        while self._pos < start:  # the same draws as a full clip; only the rendering differs
            sample_clip(self._rng, 1, 1)
            self._pos += 1
        while self._pos < stop:
            c = sample_clip(self._rng, self.num_frames, self.size)
            self._pos += 1
            yield c.caption, c.frames


def shapeworld_clips(n: int, seed: int, num_frames: int, size: int) -> list[tuple[str, list]]:
    """n (caption, frames) ShapeWorld motion clips, deterministic given seed."""
    return list(ShapeWorldClips(n, seed, num_frames, size).rows())


def clip_folder_source(path: str | Path):
    """The rows of a clip folder's metadata.jsonl by range (`datasets.row_source.RowSource`)."""
    from ..datasets.row_source import RowSource

    return RowSource(caption_folder_meta(path))


def iter_clip_folder(rows: Iterable[tuple[str, Any, Path]], report: SkipReport, num_frames: int,
                     bad_rows: str) -> Iterator[tuple[str, np.ndarray]]:
    """(caption, frames) of raw metadata.jsonl rows (where, row, folder), lazily; every row counts in
    `report.total` (the caller sets `report.kept`). A clip that cannot give `num_frames` frames is a counted skip
    (or a DataError under bad_rows='error')."""
    from ..datasets.video import VideoError, read_video

    check_policy(bad_rows)
    for where, obj, folder in rows:
        r = caption_record(where, obj, folder, report, bad_rows)  # counts the row in report.total
        if r is None:
            continue
        try:
            yield r.caption, read_video(r.image_path, num_frames, as_array=True)
        except VideoError as e:
            reject(report, bad_rows, e.reason, f"{r.image_path} ({e})")


def read_clip_folder(path: str, num_frames: int, bad_rows: str) -> tuple[list[tuple[str, np.ndarray]], SkipReport]:
    """(caption, frames) of a metadata.jsonl folder (file_name: a video `read_video` takes, text); see
    `iter_clip_folder`."""
    report = SkipReport()
    clips = list(iter_clip_folder(clip_folder_source(path).rows(), report, num_frames, bad_rows))
    report.kept = len(clips)
    return clips, report


def referenced_clips(path: str | Path) -> Iterator[Path]:
    """Every file a clip folder's rows name (a frame folder: each file in it), for a cache key."""
    for _, obj, folder in clip_folder_source(path).rows():
        if isinstance(obj, dict) and isinstance(obj.get("file_name"), str):
            p = folder / obj["file_name"]
            yield from sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else (p,)


# --- the sharded cache ---------------------------------------------------------------------------------------

def prepare_clips(records: Iterable[tuple], report: SkipReport, resolution: int) -> list[tuple]:
    """In a reader worker: (caption, clip, ...) records with every clip as its (F, 3, R, R) `frames_tensor`;
    sets `report.kept`."""
    out = [(rec[0], *(frames_tensor(c, resolution) for c in rec[1:])) for rec in records]
    report.kept = len(out)
    return out


def prepare_shapeworld(rows: Iterable[tuple[str, list]], report: SkipReport, *, resolution: int) -> list[tuple]:
    rows = list(rows)
    report.total += len(rows)
    return prepare_clips(rows, report, resolution)


def prepare_folder(rows: Iterable, report: SkipReport, *, resolution: int, num_frames: int,
                   bad_rows: str) -> list[tuple]:
    return prepare_clips(iter_clip_folder(rows, report, num_frames, bad_rows), report, resolution)


def prepare_pairs(rows: Iterable, report: SkipReport, *, resolution: int, **pair_options) -> list[tuple]:
    """(caption, preferred, rejected) of raw pair rows (`datasets.video.iter_video_pairs` with `pair_options`)."""
    from ..datasets.video import iter_video_pairs

    recs = iter_video_pairs(rows, report, **pair_options)
    return prepare_clips(((r.caption, r.frames_w, r.frames_l) for r in recs), report, resolution)


def encode_clip_shard(prepared: list[tuple], *, vae, text: Callable[[list[str]], torch.Tensor], sides: tuple,
                      resolution: int, device, batch: int, num_frames: int) -> dict:
    """One shard's rows: mean<side>, std<side> per clip side, and `caption_index` into a table of the shard's
    distinct captions' conditioning (`ctx`)."""
    captions = list(dict.fromkeys(p[0] for p in prepared))
    where = {c: i for i, c in enumerate(captions)}
    rows = {"caption_index": torch.tensor([where[p[0]] for p in prepared])}
    for k, side in enumerate(sides, 1):
        rows[f"mean{side}"], rows[f"std{side}"] = encode_clips(vae, [p[k] for p in prepared], resolution, device,
                                                               batch, num_frames)
    return {"rows": rows, "tables": {"caption": {"ctx": text(captions)}}}


def encode_sharded(root: str | Path, key: dict, *, n_rows: int, read: Callable[[int, int], Iterable],
                   prepare: Callable[[Iterable, SkipReport], list], vae, text: Callable[[list[str]], torch.Tensor],
                   sides: tuple, resolution: int, device, batch: int, num_frames: int, shard_rows: int,
                   num_workers: int, log: Callable[[str], None] = print, desc: str = "encode clips"):
    """The sharded cache entry of clip records (`datasets.shards.build_sharded`): `prepare(read(start, stop),
    report)` gives (caption, clip tensor per side) records (in a worker); rows are {mean<side>, std<side>, ctx};
    extras {"empty_ctx"}: the empty caption's conditioning."""
    from ..datasets.shards import build_sharded

    encode = functools.partial(encode_clip_shard, vae=vae, text=text, sides=sides, resolution=resolution,
                               device=device, batch=batch, num_frames=num_frames)
    return build_sharded(root, key, n_rows=n_rows, read=read, prepare=prepare, encode=encode,
                         extras=lambda: {"empty_ctx": text([""])[0]}, shard_rows=shard_rows,
                         num_workers=num_workers, log=log, desc=desc)
