"""Which way do the video model's objects actually move? Held-out motion captions sampled with the shipped motion
adapter (or --motion DIR); for each clip the direction its tracked object travels furthest along (net displacement
of at least --min-travel of the canvas, else "static"), tabulated against the captioned direction.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/motion_direction_confusion.py --n 48
"""
from __future__ import annotations

import argparse
import collections

from mmalign.assets import SHAPEWORLD_MOTION, SHAPEWORLD_SD
from mmalign.datasets.shapeworld.video import DIRECTIONS, parse_motion_caption, score_motion
from mmalign.demo.video import motion_captions
from mmalign.video.sampling import sample_videos, video_pipeline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--motion", default=str(SHAPEWORLD_MOTION))
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--min-travel", type=float, default=0.05)
    a = ap.parse_args()
    pipe = video_pipeline(str(SHAPEWORLD_SD), a.motion)
    _, heldout = motion_captions()
    prompts = (heldout * (a.n // len(heldout) + 1))[:a.n]
    clips = sample_videos(pipe, prompts, list(range(90000, 90000 + a.n)), num_frames=8, steps=a.steps,
                          guidance=a.guidance)
    table, travel = collections.Counter(), []
    for clip, prompt in zip(clips, prompts):
        asked = parse_motion_caption(prompt)[2]
        along = {d: score_motion(clip, prompt.replace(f"moving {asked}", f"moving {d}"))["displacement_along"]
                 for d in DIRECTIONS}
        moved = max(along, key=along.get)
        travel.append(along[moved])
        table[asked, moved if along[moved] >= a.min_travel else "static"] += 1
    cols = (*DIRECTIONS, "static")
    print("| captioned | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for d in DIRECTIONS:
        print(f"| {d} | " + " | ".join(str(table[d, c]) for c in cols) + " |")
    print(f"mean net travel along the furthest direction: {sum(travel) / len(travel):.3f} of the canvas")


if __name__ == "__main__":
    main()
