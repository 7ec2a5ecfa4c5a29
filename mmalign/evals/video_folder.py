"""VBench-style scores of a folder of captioned clips (`mmalign eval videos`): settings in, a results file out.

The folder holds a jsonl (default `samples.jsonl`) with one row per clip: `file_name` (a GIF, an mp4/webm/...
file or a folder of frames, relative to the folder) and the caption as `prompt`, `text` or `caption` (the first
present). A ShapeWorld export (`mmalign data shapeworld --videos N`) is read with `samples_file="videos.jsonl"`.
Torch and open_clip are imported only inside the calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..assets import SHAPEWORLD_CLIP
from .errors import EvalError

CAPTION_KEYS = ("prompt", "text", "caption")
MOTION = {"auto": None, "on": True, "off": False}  # auto: when every caption is 'a <colour> <shape> moving <dir>'


@dataclass
class VideoEvalSettings:
    dir: str | Path  # folder with the samples jsonl and the clips it names
    model: str = str(SHAPEWORLD_CLIP)  # open_clip directory, or a weights file with `arch`
    arch: str | None = None
    subject_model: str | None = None  # a second backbone for subject consistency (VBench uses DINO)
    subject_arch: str | None = None
    samples_file: str = "samples.jsonl"
    n_frames: int | None = None  # frames per clip (None: all)
    stride: int = 1
    motion: Literal["auto", "on", "off"] = "auto"
    retrieval: bool = False  # text-video retrieval, plain and Sinkhorn-normalised
    sinkhorn_temperature: float = 0.1
    bad_rows: Literal["skip", "error"] = "skip"
    n_boot: int = 1000
    seed: int = 0
    out: str | Path | None = None  # default: <dir>/results_videos.json


def read_video_samples(folder, samples_file: str = "samples.jsonl", n_frames: int | None = None, stride: int = 1,
                       bad_rows: str = "skip"):
    """(clips as uint8 arrays, captions, kept rows, SkipReport) of `folder/samples_file`, row by row under the
    bad-row policy (a bad row is a counted skip with its reason, or a DataError naming file:line)."""
    from ..datasets.records import DataError, SkipReport, check_policy, jsonl_rows, reject
    from ..datasets.video import VideoError, read_video

    check_policy(bad_rows)
    folder = Path(folder)
    meta = folder / samples_file
    if not meta.is_file():
        raise DataError(f"{folder}: no {samples_file} (one JSON object per line with file_name and a caption as "
                        f"{' / '.join(CAPTION_KEYS)})")
    report, clips, captions, rows = SkipReport(), [], [], []
    for where, row in jsonl_rows(meta, report, bad_rows):
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not row["file_name"]:
            reject(report, bad_rows, "missing file_name", where)
            continue
        caption = next((row[k] for k in CAPTION_KEYS if k in row), None)
        if not isinstance(caption, str):
            reject(report, bad_rows, f"missing or non-string caption ({' / '.join(CAPTION_KEYS)})", where)
            continue
        try:
            clips.append(read_video(folder / row["file_name"], n_frames, stride, as_array=True))
        except VideoError as e:
            reject(report, bad_rows, e.reason, f"{where} ({e})")
            continue
        captions.append(caption)
        rows.append(row)
    report.kept = len(clips)
    return clips, captions, rows, report


def evaluate_video_folder(s: VideoEvalSettings):
    """Score the folder's clips (`evals.video.evaluate_videos`); returns (results path, {task: TaskResult},
    SkipReport of the rows). Raises EvalError naming what failed: the model, the data, or the scoring."""
    from .clip_backbone import load_backbone
    from .video import evaluate_videos

    try:
        backbone = load_backbone(s.model, s.arch)
        subject = load_backbone(s.subject_model, s.subject_arch).image_embeddings if s.subject_model else None
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(f"model error: {e}") from e
    try:
        clips, captions, _, report = read_video_samples(s.dir, s.samples_file, s.n_frames, s.stride, s.bad_rows)
    except ValueError as e:  # a DataError, or bad sampling settings
        raise EvalError(f"data error: {e}") from e
    if not clips:
        raise EvalError(f"no clips to score in {s.dir}: {report.summary()}")
    out = Path(s.out) if s.out else Path(s.dir) / "results_videos.json"
    provenance = {"clip": backbone.provenance, "data": report.to_dict(), "samples": str(Path(s.dir) / s.samples_file),
                  "n_frames": s.n_frames, "stride": s.stride}
    try:
        path, tasks = evaluate_videos(clips, captions, out, backbone, subject_encoder=subject, motion=MOTION[s.motion],
                                      retrieval=s.retrieval, sinkhorn_temperature=s.sinkhorn_temperature,
                                      model=str(s.dir), n_boot=s.n_boot, seed=s.seed, provenance=provenance)
    except ValueError as e:  # e.g. repeated captions with retrieval, non-motion captions with motion "on"
        raise EvalError(f"cannot score {s.dir}: {e}") from e
    return path, tasks, report
