"""`mmalign eval videos DIR`: the namespace becomes `evals.video_folder.VideoEvalSettings`; the scores are printed.
Nothing heavy is imported at module level: torch and open_clip load inside the command.
"""
from __future__ import annotations

import sys

from ..assets import SHAPEWORLD_CLIP as DEFAULT_CLIP


def cmd_eval_videos(a) -> None:
    from .video_folder import VideoEvalSettings, evaluate_video_folder

    settings = VideoEvalSettings(a.dir, model=a.model, arch=a.arch, subject_model=a.subject_model,
                                 subject_arch=a.subject_arch, samples_file=a.samples_file, n_frames=a.n_frames,
                                 stride=a.stride, motion=a.motion, retrieval=a.retrieval,
                                 sinkhorn_temperature=a.sinkhorn_temperature, bad_rows=a.bad_rows, n_boot=a.n_boot,
                                 seed=a.seed, out=a.out)
    path, tasks, report = evaluate_video_folder(settings)
    print(f"clips: {report.summary()}", file=sys.stderr)
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
