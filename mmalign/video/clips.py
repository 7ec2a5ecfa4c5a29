"""Video clips for the video methods: ShapeWorld motion clips or a folder of videos, turned into cached VAE
posteriors in the video layout (N, C, F, h, w), and a dataset of such tensors."""
from __future__ import annotations

import random

import numpy as np
import torch

from ..datasets.records import SkipReport, read_caption_folder, reject
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
    """VAE posterior (mean, std) of each clip, frame by frame: two (N, C, F, h, w) tensors on the CPU. Frames are
    converted a few clips at a time (about `batch` frames per VAE call), never the whole dataset at once. Every
    clip must have `num_frames` frames (default: as many as the first)."""
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
        pending.append(frames_tensor(clip, resolution))
        if len(pending) * len(pending[0]) >= batch:
            flush()
    if pending:
        flush()
    return torch.cat(means).contiguous(), torch.cat(stds).contiguous()


def shapeworld_clips(n: int, seed: int, num_frames: int, size: int) -> list[tuple[str, list]]:
    """n (caption, frames) ShapeWorld motion clips, deterministic given seed."""
    from ..datasets.shapeworld.video import sample_clip

    rng = random.Random(seed)
    return [(c.caption, c.frames) for c in (sample_clip(rng, num_frames, size) for _ in range(n))]


def read_clip_folder(path: str, num_frames: int, bad_rows: str) -> tuple[list[tuple[str, np.ndarray]], SkipReport]:
    """(caption, frames) of a metadata.jsonl folder (file_name: a video `read_video` takes, text); a clip that
    cannot give `num_frames` frames is a counted skip (or a DataError under bad_rows='error')."""
    from ..datasets.video import VideoError, read_video

    rows, report = read_caption_folder(path, bad_rows)
    clips = []
    for r in rows:
        try:
            clips.append((r.caption, read_video(r.image_path, num_frames, as_array=True)))
        except VideoError as e:
            reject(report, bad_rows, e.reason, f"{r.image_path} ({e})")
    report.kept = len(clips)
    return clips, report
