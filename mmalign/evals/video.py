"""Video evaluators (VBench-style), pure functions of frames and the feature encoders passed in.

A clip is anything `mmalign.datasets.video.read_video` takes (a uint8 (F, H, W, 3) array, a list of PIL images, a
file or frame folder). An image encoder maps a list of PIL images to (N, D) features (`ClipBackbone.
image_embeddings` from `mmalign.evals.clip_backbone`, or any callable: a DINO-style model for subjects); a text
encoder maps captions to (N, D). Features are L2-normalised here, so cos = dot product.

- CLIPSIM: mean over frames f of cos(text, f).
- Consistency (VBench subject / background): for frames i = 1..F-1,
  c_i = ½·(max(0, cos(f_i, f_{i-1})) + max(0, cos(f_i, f_0))); the score is the mean of c_i (VBench clamps
  negative cosines at 0). Subject consistency uses a subject encoder (VBench: DINO), background consistency
  the CLIP image tower.
- Temporal flicker: (255 − mean |frame_i − frame_{i−1}|)/255 over all pixels, channels and i ≥ 1 (uint8 frames).
- ShapeWorld motion: `score_motion` per clip, aggregated with percentile-bootstrap CIs.
- Retrieval (optional): texts × videos cosine matrix, video = normalised mean of its frame features, ranked
  plainly and after Sinkhorn normalisation (`retrieval_video`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from ..datasets.shapeworld.video import parse_motion_caption, score_motion
from ..datasets.video import read_video
from .results import TaskResult, write_results
from .retrieval_video import retrieval_metrics
from ..core.stats import bootstrap_ci

MOTION_METRICS = {"direction_accuracy": "direction_ok", "colour_consistency": "colour_consistent",
                  "shape_consistency": "shape_consistent", "motion_correct": "correct",
                  "object_found": "object_found_frac"}


def _as_clips(clips: Sequence[Any]) -> list[np.ndarray]:
    return [read_video(c, as_array=True) for c in clips]


def _normalise(x) -> np.ndarray:
    x = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(min=1e-12)


def frame_features(clips: Sequence[Any], encode_images: Callable) -> list[np.ndarray]:
    """Per clip, its (F, D) L2-normalised frame features; all frames go to the encoder in one call (it batches)."""
    arrays = _as_clips(clips)
    feats = _normalise(encode_images([Image.fromarray(f) for a in arrays for f in a]))
    return np.split(feats, np.cumsum([len(a) for a in arrays])[:-1])


def clipsim_scores(clips: Sequence[Any], captions: Sequence[str], encode_images: Callable,
                   encode_texts: Callable) -> np.ndarray:
    """Per clip: mean over its frames of cos(caption, frame)."""
    if len(clips) != len(captions):
        raise ValueError(f"{len(clips)} clips but {len(captions)} captions")
    texts = _normalise(encode_texts(list(captions)))
    return np.array([(f @ t).mean() for f, t in zip(frame_features(clips, encode_images), texts)])


def consistency(features) -> float:
    """VBench consistency of one clip's (F, D) frame features (F >= 2); see the module docstring."""
    f = _normalise(features)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"consistency needs (F >= 2, D) frame features, got shape {f.shape}")
    to_prev = np.maximum(0.0, (f[1:] * f[:-1]).sum(axis=1))
    to_first = np.maximum(0.0, f[1:] @ f[0])
    return float(((to_prev + to_first) / 2).mean())


def consistency_scores(clips: Sequence[Any], encode_images: Callable) -> np.ndarray:
    return np.array([consistency(f) for f in frame_features(clips, encode_images)])


def temporal_flicker(frames: Any) -> float:
    """(255 − mean |frame_i − frame_{i−1}|)/255 of one clip's uint8 frames (F >= 2): 1 for a still clip."""
    a = read_video(frames, as_array=True).astype(np.float64)
    if len(a) < 2:
        raise ValueError(f"temporal flicker needs at least 2 frames, got {len(a)}")
    return float((255.0 - np.abs(np.diff(a, axis=0)).mean()) / 255.0)


def motion_scores(clips: Sequence[Any], captions: Sequence[str], n_boot: int = 1000,
                  seed: int = 0) -> tuple[list[dict], dict]:
    """`score_motion` for each (clip, motion caption), and per metric {"mean", "ci95": [low, high]} (bootstrap
    over distinct captions: clips of one caption are resampled together)."""
    if len(clips) != len(captions):
        raise ValueError(f"{len(clips)} clips but {len(captions)} captions")
    per_clip = [score_motion(list(a), c) for a, c in zip(_as_clips(clips), captions)]
    summary = {}
    for name, key in MOTION_METRICS.items():
        mean, lo, hi = bootstrap_ci([float(s[key]) for s in per_clip], n_boot, seed, groups=captions)
        summary[name] = {"mean": mean, "ci95": [lo, hi]}
    return per_clip, summary


def _is_motion_caption(caption: str) -> bool:
    try:
        parse_motion_caption(caption)
        return True
    except ValueError:
        return False


def _task(metrics: dict[str, np.ndarray], n: int, n_boot: int, seed: int, config: dict,
          samples: list[dict]) -> TaskResult:
    """Means of per-clip values with their bootstrap CIs in `extra` (over distinct captions)."""
    means, extra = {}, {}
    captions = [r["caption"] for r in samples]
    for name, values in metrics.items():
        means[name], lo, hi = bootstrap_ci(values, n_boot, seed, groups=captions)
        extra[f"{name}_ci95"] = [lo, hi]
    return TaskResult(means, {k: True for k in means}, n, config=config, samples=samples, extra=extra)


def evaluate_videos(clips: Sequence[Any], captions: Sequence[str], out: str | Path, backbone,
                    subject_encoder: Callable | None = None, motion: bool | None = None, retrieval: bool = False,
                    sinkhorn_temperature: float = 0.1, model: str = "videos", n_boot: int = 1000, seed: int = 0,
                    provenance: dict | None = None) -> tuple[Path, dict[str, TaskResult]]:
    """Score captioned clips and write a results file (`write_results`) to `out`.

    `backbone` has `image_embeddings(images)` and `text_embeddings(texts)` (a `ClipBackbone`). Tasks:
    video_clipsim, video_consistency (background with the CLIP image tower; subject only with `subject_encoder`),
    video_flicker, video_shapeworld_motion (when `motion`, or with None when every caption is a motion caption)
    and video_retrieval (with `retrieval`; needs distinct captions)."""
    clips = _as_clips(clips)
    n, captions = len(clips), list(captions)
    if n == 0 or n != len(captions):
        raise ValueError(f"need the same non-zero number of clips and captions, got {n} and {len(captions)}")
    rows = [{"index": i, "caption": c, "n_frames": len(a)} for i, (a, c) in enumerate(zip(clips, captions))]
    feats = frame_features(clips, backbone.image_embeddings)
    texts = _normalise(backbone.text_embeddings(captions))
    clipsim = np.array([(f @ t).mean() for f, t in zip(feats, texts)])
    tasks = {"video_clipsim": _task({"clipsim": clipsim}, n, n_boot, seed, {"backbone": "clip"},
                                    [{**r, "clipsim": float(v)} for r, v in zip(rows, clipsim)])}

    cons = {"background_consistency": np.array([consistency(f) for f in feats])}
    cfg = {"background": "clip image tower", "subject": "not computed (no subject encoder given)"}
    if subject_encoder is not None:
        cons["subject_consistency"] = consistency_scores(clips, subject_encoder)
        cfg["subject"] = "subject encoder"
    tasks["video_consistency"] = _task(cons, n, n_boot, seed, cfg, [
        {**r, **{k: float(v[i]) for k, v in cons.items()}} for i, r in enumerate(rows)])

    flicker = np.array([temporal_flicker(a) for a in clips])
    tasks["video_flicker"] = _task({"temporal_flicker": flicker}, n, n_boot, seed, {},
                                   [{**r, "temporal_flicker": float(v)} for r, v in zip(rows, flicker)])

    if motion is None:
        motion = all(_is_motion_caption(c) for c in captions)
    if motion:
        per_clip, summary = motion_scores(clips, captions, n_boot, seed)
        tasks["video_shapeworld_motion"] = TaskResult(
            {k: v["mean"] for k, v in summary.items()}, {k: True for k in summary}, n,
            samples=[{**r, **s} for r, s in zip(rows, per_clip)],
            extra={f"{k}_ci95": v["ci95"] for k, v in summary.items()})

    if retrieval:
        if len(set(captions)) != n:
            raise ValueError(f"retrieval needs distinct captions: {n - len(set(captions))} of {n} are repeats")
        videos = _normalise(np.stack([f.mean(axis=0) for f in feats]))
        sim = texts @ videos.T
        plain, sink = (retrieval_metrics(sim, use_sinkhorn=s, temperature=sinkhorn_temperature)
                       for s in (False, True))
        metrics = {**{k: plain[k] for k in plain if k != "ranks"},
                   **{f"sinkhorn_{k}": sink[k] for k in sink if k != "ranks"}}
        tasks["video_retrieval"] = TaskResult(
            metrics, {k: "rank" not in k for k in metrics}, n, config={"sinkhorn_temperature": sinkhorn_temperature},
            samples=[{**r, "rank": a, "sinkhorn_rank": b} for r, a, b in zip(rows, plain["ranks"], sink["ranks"])])

    path = write_results(out, tasks, model=model, provenance={"seed": seed, "n_boot": n_boot, **(provenance or {})})
    return path, tasks
