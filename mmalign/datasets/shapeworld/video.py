"""ShapeWorld videos: one shape moving in a captioned direction, and a scorer that checks the motion.

Caption grammar: "a {colour} {shape} moving {direction}". Coordinates are canvas fractions, origin top-left,
so "up" is decreasing y.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

from .render import render_shapes
from .scene import COLOURS, SHAPES, SIZES, Shape
from .scorer import extract_objects

DIRECTIONS = ("left", "right", "up", "down")
DIRECTION_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
CLIP_SIZES = ("small", "large")
MIN_TRAVEL = 0.3  # total displacement of a sampled clip, canvas fraction
EDGE_MARGIN = 0.02  # gap kept between the shape's box and the canvas edge
MIN_SCORED_TRAVEL = 0.1  # net displacement the scorer needs to accept the direction
MIN_CONSISTENCY = 0.75


@dataclass(frozen=True)
class VideoClip:
    frames: list[Image.Image]
    caption: str
    shape: Shape  # start state
    direction: str  # one of DIRECTIONS


def motion_caption(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


def parse_motion_caption(caption: str) -> tuple[str, str, str]:
    """(colour, shape, direction) of "a {colour} {shape} moving {direction}" (case and a final period
    ignored). Raises ValueError for anything else."""
    words = caption.strip().lower().rstrip(".").split()
    if words and words[0] in ("a", "an"):
        words = words[1:]
    if len(words) != 4 or words[0] not in COLOURS or words[1] not in SHAPES or words[2] != "moving" \
            or words[3] not in DIRECTIONS:
        raise ValueError(f"not a motion caption {caption!r}: expected 'a <colour> <shape> moving <direction>' "
                         f"with colour in {tuple(COLOURS)}, shape in {SHAPES}, direction in {DIRECTIONS}")
    return words[0], words[1], words[3]


def clip_positions(start: Shape, direction: str, travel: float, n_frames: int) -> list[Shape]:
    """The shape at `n_frames` evenly spaced points along `travel` (canvas fraction) in `direction`."""
    dx, dy = DIRECTION_VECTORS[direction]
    steps = [i / (n_frames - 1) if n_frames > 1 else 0.0 for i in range(n_frames)]
    return [Shape(start.colour, start.shape, start.size, start.x + dx * travel * t, start.y + dy * travel * t)
            for t in steps]


def sample_clip(rng: random.Random, n_frames: int = 8, size: int = 32) -> VideoClip:
    """One shape moving at constant speed, at least MIN_TRAVEL of the canvas in total, fully inside the
    canvas in every frame. Deterministic given `rng`."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    size_word, direction = rng.choice(CLIP_SIZES), rng.choice(DIRECTIONS)
    lo = SIZES[size_word] / 2 + EDGE_MARGIN
    hi = 1 - lo
    travel = rng.uniform(MIN_TRAVEL, hi - lo)
    along = rng.uniform(lo, hi - travel)  # start, measured in the direction of motion from its origin side
    across = rng.uniform(lo, hi)
    dx, dy = DIRECTION_VECTORS[direction]
    along_coord = along if dx + dy > 0 else 1 - along  # left/up start from the right/bottom side
    x, y = (along_coord, across) if dx else (across, along_coord)
    start = Shape(colour, shape, size_word, x, y)
    frames = [render_shapes([s], size) for s in clip_positions(start, direction, travel, n_frames)]
    return VideoClip(frames, motion_caption(colour, shape, direction), start, direction)


def _main_object(frame):
    objects = extract_objects(frame)
    return max(objects, key=lambda o: o.area) if objects else None


def score_motion(frames, caption: str) -> dict:
    """Check frames (PIL images or arrays) against a motion caption by tracking the largest object.

    - direction_ok: the centroid's net displacement from the first to the last frame with an object is
      mostly along the captioned axis (|along| > |across|), has the captioned sign, and is at least
      MIN_SCORED_TRAVEL of the canvas. Fewer than two frames with an object fail it.
    - colour_consistent / shape_consistent: fraction of all frames whose main object has the caption's
      colour / shape (a frame without an object counts as a mismatch).
    - object_found_frac: fraction of frames with at least one object.
    - correct: direction_ok and both consistencies >= MIN_CONSISTENCY.
    """
    colour, shape, direction = parse_motion_caption(caption)
    n = len(frames)
    found = [_main_object(f) for f in frames]
    tracked = [o for o in found if o is not None]
    along = across = 0.0
    if len(tracked) >= 2:
        dx, dy = tracked[-1].x - tracked[0].x, tracked[-1].y - tracked[0].y
        ux, uy = DIRECTION_VECTORS[direction]
        along = dx * ux + dy * uy
        across = abs(dx * uy - dy * ux)
    direction_ok = len(tracked) >= 2 and along >= MIN_SCORED_TRAVEL and along > across
    colour_frac = sum(o.colour == colour for o in tracked) / n if n else 0.0
    shape_frac = sum(o.shape == shape for o in tracked) / n if n else 0.0
    return {
        "direction_ok": bool(direction_ok),
        "colour_consistent": colour_frac,
        "shape_consistent": shape_frac,
        "object_found_frac": len(tracked) / n if n else 0.0,
        "displacement_along": along,
        "displacement_across": across,
        "correct": bool(direction_ok and colour_frac >= MIN_CONSISTENCY and shape_frac >= MIN_CONSISTENCY),
    }


def write_clip(clip: VideoClip, path: str | Path, frame_ms: int = 125) -> None:
    """Save the clip as a looping animated GIF with the caption as its comment.

    GIF has a 256-colour palette, so pixel values change slightly; Pillow merges consecutive identical
    frames, so a clip with a still segment reads back with fewer frames."""
    first, *rest = [f.convert("RGB") for f in clip.frames]
    first.save(path, save_all=True, append_images=rest, duration=frame_ms, loop=0,
               comment=clip.caption.encode("utf-8"))


def read_gif(path: str | Path) -> list[Image.Image]:
    """All frames of a GIF as RGB images."""
    with Image.open(path) as im:
        return [frame.convert("RGB") for frame in ImageSequence.Iterator(im)]


def frames_array(frames: list[Image.Image]) -> np.ndarray:
    """Frames stacked as uint8 (T, H, W, 3)."""
    return np.stack([np.asarray(f.convert("RGB")) for f in frames])
