import random

import numpy as np
import pytest
from PIL import Image

from mmalign.datasets.shapeworld.render import render_shapes
from mmalign.datasets.shapeworld.scene import SIZES, Shape
from mmalign.datasets.shapeworld.video import (DIRECTIONS, MIN_TRAVEL, VideoClip, clip_positions, frames_array,
                                               parse_motion_caption, read_gif, sample_clip, score_motion,
                                               write_clip)


def _clips(seed: int, n: int, **kw) -> list[VideoClip]:
    rng = random.Random(seed)
    return [sample_clip(rng, **kw) for _ in range(n)]


def test_sample_clip_deterministic():
    a, b = _clips(0, 5), _clips(0, 5)
    assert [c.caption for c in a] == [c.caption for c in b]
    assert [c.shape for c in a] == [c.shape for c in b]
    assert all(np.array_equal(frames_array(x.frames), frames_array(y.frames)) for x, y in zip(a, b))
    assert [c.shape for c in _clips(1, 5)] != [c.shape for c in a]


def test_sample_clip_geometry_and_caption():
    clips = _clips(2, 200, n_frames=6, size=24)
    assert {c.direction for c in clips} == set(DIRECTIONS)
    for c in clips:
        assert len(c.frames) == 6 and c.frames[0].size == (24, 24)
        assert c.shape.size in ("small", "large")
        assert parse_motion_caption(c.caption) == (c.shape.colour, c.shape.shape, c.direction)
        half = SIZES[c.shape.size] / 2
        assert half <= c.shape.x <= 1 - half and half <= c.shape.y <= 1 - half


def test_clip_stays_inside_and_travels_far_enough():
    # From the pixels: no foreground on the border in the first and last frames (constant speed, so the
    # frames between are inside too), and the centre of the ink moves by >= MIN_TRAVEL.
    for c in _clips(3, 60, size=64):
        first, last = (np.asarray(f).astype(int) for f in (c.frames[0], c.frames[-1]))
        for arr in (first, last):
            fg = np.abs(arr - 245).sum(-1) > 30
            assert not (fg[0].any() or fg[-1].any() or fg[:, 0].any() or fg[:, -1].any())
        def centre(arr):
            rows, cols = np.nonzero(np.abs(arr - 245).sum(-1) > 30)
            return cols.mean() / 64, rows.mean() / 64
        (x0, y0), (x1, y1) = centre(first), centre(last)
        assert max(abs(x1 - x0), abs(y1 - y0)) >= MIN_TRAVEL - 0.03


def test_parse_motion_caption():
    assert parse_motion_caption("a red circle moving left") == ("red", "circle", "left")
    assert parse_motion_caption("A Blue Square moving up.") == ("blue", "square", "up")
    for bad in ("a red circle", "a red circle moving sideways", "a pink circle moving up",
                "a red blob moving up", "red circle going up", ""):
        with pytest.raises(ValueError, match="motion caption"):
            parse_motion_caption(bad)


def test_rendered_clips_score_correct():
    clips = _clips(4, 100)
    results = [score_motion(c.frames, c.caption) for c in clips]
    assert sum(r["correct"] for r in results) >= 98
    assert all(r["object_found_frac"] == 1.0 for r in results)


def test_reversed_frames_fail_direction():
    for c in _clips(5, 20):
        r = score_motion(c.frames[::-1], c.caption)
        assert not r["direction_ok"] and not r["correct"]


def test_wrong_caption_fails():
    c = _clips(6, 1)[0]
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[c.direction]
    assert not score_motion(c.frames, f"a {c.shape.colour} {c.shape.shape} moving {opposite}")["correct"]
    other = "blue" if c.shape.colour != "blue" else "red"
    r = score_motion(c.frames, f"a {other} {c.shape.shape} moving {c.direction}")
    assert r["colour_consistent"] == 0.0 and not r["correct"]


def test_colour_change_midway_lowers_colour_consistency():
    start = Shape("red", "square", "large", 0.3, 0.5)
    path = clip_positions(start, "right", 0.4, 8)
    frames = [render_shapes([s if i < 4 else Shape("blue", s.shape, s.size, s.x, s.y)]) for i, s in enumerate(path)]
    r = score_motion(frames, "a red square moving right")
    assert r["direction_ok"] and r["shape_consistent"] == 1.0
    assert r["colour_consistent"] == pytest.approx(0.5)
    assert not r["correct"]


def test_empty_frames_are_counted_not_crashes():
    blank = Image.new("RGB", (32, 32), (245, 245, 245))
    c = _clips(7, 1)[0]
    r = score_motion([blank] + c.frames[1:-1] + [blank], c.caption)
    assert r["object_found_frac"] == pytest.approx(6 / 8)
    assert r["colour_consistent"] <= 6 / 8
    r = score_motion([blank] * 4, c.caption)
    assert r["object_found_frac"] == 0.0 and not r["direction_ok"] and not r["correct"]
    assert score_motion([np.asarray(f) for f in c.frames], c.caption)["correct"]  # arrays work too


def test_gif_round_trip(tmp_path):
    c = _clips(8, 1)[0]
    path = tmp_path / "clip.gif"
    write_clip(c, path)
    frames = read_gif(path)
    assert len(frames) == len(c.frames)
    assert frames[0].mode == "RGB" and frames[0].size == c.frames[0].size
    assert score_motion(frames, c.caption)["correct"]
