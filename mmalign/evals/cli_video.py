"""`mmalign eval videos DIR`: VBench-style scores of a folder of captioned clips, written as a results file.

DIR holds a jsonl (default `samples.jsonl`) with one row per clip: `file_name` (a GIF, an mp4/webm/... file or a
folder of frames, relative to DIR) and the caption as `prompt`, `text` or `caption` (the first present). A
ShapeWorld export (`mmalign data shapeworld --videos N`) is read with `--samples-file videos.jsonl`.
Nothing heavy is imported at module level: torch and open_clip load inside the command.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..assets import SHAPEWORLD_CLIP as DEFAULT_CLIP
CAPTION_KEYS = ("prompt", "text", "caption")


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


def cmd_eval_videos(a) -> None:
    from .clip_backbone import load_backbone
    from .video import evaluate_videos

    try:
        backbone = load_backbone(a.model, a.arch)
        subject = load_backbone(a.subject_model, a.subject_arch).image_embeddings if a.subject_model else None
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"model error: {e}")
    try:
        clips, captions, _, report = read_video_samples(a.dir, a.samples_file, a.n_frames, a.stride, a.bad_rows)
    except ValueError as e:  # a DataError, or bad sampling settings
        sys.exit(f"data error: {e}")
    if not clips:
        sys.exit(f"no clips to score in {a.dir}: {report.summary()}")
    print(f"clips: {report.summary()}", file=sys.stderr)
    out = Path(a.out) if a.out else Path(a.dir) / "results_videos.json"
    motion = {"auto": None, "on": True, "off": False}[a.motion]
    provenance = {"clip": backbone.provenance, "data": report.to_dict(), "samples": str(Path(a.dir) / a.samples_file),
                  "n_frames": a.n_frames, "stride": a.stride}
    try:
        path, tasks = evaluate_videos(clips, captions, out, backbone, subject_encoder=subject, motion=motion,
                                      retrieval=a.retrieval, sinkhorn_temperature=a.sinkhorn_temperature,
                                      model=str(a.dir), n_boot=a.n_boot, seed=a.seed, provenance=provenance)
    except ValueError as e:  # e.g. repeated captions with --retrieval, non-motion captions with --motion on
        sys.exit(f"cannot score {a.dir}: {e}")
    for name, t in tasks.items():
        print(f"{name}: " + ", ".join(f"{k}={v:.4f}" for k, v in t.metrics.items()))
    print(f"results: {path}")


def register(esub) -> None:
    p = esub.add_parser("videos", help="score a folder of captioned clips (CLIPSIM, consistency, flicker, motion)",
                        description="VBench-style video scores of DIR/samples.jsonl clips with an open_clip backbone "
                                    "(CLIPSIM, background/subject consistency, temporal flicker, ShapeWorld motion, "
                                    "optional text-video retrieval with Sinkhorn); writes an lmms-eval-style results "
                                    "file.")
    p.add_argument("dir", help="folder with the samples jsonl and the clips it names")
    p.add_argument("--model", default=str(DEFAULT_CLIP),
                   help="open_clip model directory, or a weights file with --arch (default: the shipped ShapeWorld "
                        "CLIP)")
    p.add_argument("--arch", help="open_clip architecture name or model-config JSON for a weights-file --model")
    p.add_argument("--subject-model", help="a second open_clip backbone for subject consistency (VBench uses DINO)")
    p.add_argument("--subject-arch")
    p.add_argument("--samples-file", default="samples.jsonl")
    p.add_argument("--n-frames", type=int, default=None, help="frames per clip (default: all)")
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--motion", choices=("auto", "on", "off"), default="auto",
                   help="ShapeWorld motion scores (auto: when every caption is 'a <colour> <shape> moving <dir>')")
    p.add_argument("--retrieval", action="store_true", help="text-video retrieval, plain and Sinkhorn-normalised")
    p.add_argument("--sinkhorn-temperature", type=float, default=0.1)
    p.add_argument("--bad-rows", choices=("skip", "error"), default="skip")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="results file (default: DIR/results_videos.json)")
    p.set_defaults(fn=cmd_eval_videos)
