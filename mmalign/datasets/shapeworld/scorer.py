"""The exact ShapeWorld image scorer: read objects out of an image and check them against a caption.

Built for generated samples, not only clean renders: the background is estimated from the image border
(an undertrained model paints it ~RGB(150,180,170) instead of 245 grey), foreground is what differs from that
background relative to the image's own contrast, colours are named by hue (robust to tint and washed-out
saturation) and shapes by template overlap within the object's bounding box (robust to blur).
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .scene import COLOURS, SIZES, Requirement, parse_caption

_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360 for name, rgb in COLOURS.items()}
_MIN_SATURATION = 0.18  # below this a blob is grey: no colour name
_MIN_AREA_FRAC = 0.006  # blobs smaller than this fraction of the canvas are noise


@dataclass(frozen=True)
class Detected:
    colour: str | None
    shape: str | None
    size: str | None
    x: float  # centroid, fraction of width
    y: float  # centroid, fraction of height
    area: float  # fraction of the canvas


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    x = np.asarray(image, dtype=np.float32)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {x.shape}")
    return x / 255.0 if x.max() > 1.5 else x


def _box_blur(x: np.ndarray) -> np.ndarray:
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[:2]
    return sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = ((hist * centres).sum() - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between))])


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (row, col) indices."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        stack, pix = [(r0, c0)], []
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            pix.append((r, c))
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        out.append(np.array(pix))
    return out


def _name_colour(rgb: np.ndarray, background: np.ndarray) -> str | None:
    # Remove the part of the tint that the background shows, at half strength (a tint shifts both; a washed
    # out background alone should not drag the object's hue).
    corrected = np.clip(rgb - 0.5 * (background - background.mean()), 0, 1)
    h, s, v = colorsys.rgb_to_hsv(*corrected)
    if s < _MIN_SATURATION or v < 0.08:
        return None
    hue = h * 360
    return min(_HUES, key=lambda n: min(abs(hue - _HUES[n]), 360 - abs(hue - _HUES[n])))


_SUB = 6  # subsamples per pixel side when rasterising templates


def _template_coverage(shape: str, cx: float, cy: float, area: float, hh: int, ww: int) -> np.ndarray:
    """Antialiased coverage of an upright shape of the given area whose centroid is (cx, cy), in pixels."""
    yy, xx = np.mgrid[0:hh * _SUB, 0:ww * _SUB]
    u = (xx + 0.5) / _SUB - cx
    v = (yy + 0.5) / _SUB - cy
    if shape == "circle":
        inside = u ** 2 + v ** 2 <= area / np.pi
    elif shape == "square":
        half = np.sqrt(area) / 2
        inside = (np.abs(u) <= half) & (np.abs(v) <= half)
    else:  # upright triangle with base = height = a; its centroid sits 2/3 of the way down from the apex
        a = np.sqrt(2 * area)
        top = v + 2 * a / 3  # distance below the apex
        inside = (top >= 0) & (top <= a) & (np.abs(u) <= top / 2)
    return inside.reshape(hh, _SUB, ww, _SUB).mean(axis=(1, 3))


def _name_shape(coverage: np.ndarray) -> tuple[str, float]:
    """Best-fitting template for a coverage map (values 0..1); returns (shape, area in pixels)."""
    area = float(coverage.sum())
    rows, cols = np.mgrid[0:coverage.shape[0], 0:coverage.shape[1]]
    cy = float((coverage * (rows + 0.5)).sum() / area)
    cx = float((coverage * (cols + 0.5)).sum() / area)
    errors = {s: np.abs(_template_coverage(s, cx, cy, area, *coverage.shape) - coverage).sum()
              for s in ("circle", "square", "triangle")}
    return min(errors, key=errors.get), area


def extract_objects(image) -> list[Detected]:
    """Objects in an image: one per connected blob that stands out from the border-estimated background."""
    x = _as_array(image)
    h, w = x.shape[:2]
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    background = np.median(border, axis=0)
    smooth = _box_blur(x)
    dist = np.sqrt(((smooth - background) ** 2).sum(-1))
    threshold = max(_otsu(dist), 0.12)
    mask = dist > threshold
    labels = np.zeros(mask.shape, np.int32)
    comps = _components(mask)
    for i, pix in enumerate(comps, 1):
        labels[pix[:, 0], pix[:, 1]] = i
    raw = np.sqrt(((x - background) ** 2).sum(-1))
    found = []
    for i, pix in enumerate(comps, 1):
        area = len(pix) / (h * w)
        if area < _MIN_AREA_FRAC:
            continue
        rows, cols = pix[:, 0], pix[:, 1]
        d = dist[rows, cols]
        core = d >= np.quantile(d, 0.5)
        colour = _name_colour(np.median(x[rows[core], cols[core]], axis=0), background)
        # Coverage in a window around the blob: contrast to the background relative to the blob's core,
        # ignoring pixels that belong to other blobs.
        r0, r1 = max(rows.min() - 2, 0), min(rows.max() + 3, h)
        c0, c1 = max(cols.min() - 2, 0), min(cols.max() + 3, w)
        contrast = float(np.quantile(raw[rows, cols], 0.8))
        cov = np.clip(raw[r0:r1, c0:c1] / max(contrast, 1e-6), 0, 1)
        other = labels[r0:r1, c0:c1]
        cov[(other != 0) & (other != i)] = 0
        cov[cov < 0.25] = 0  # background noise
        shape, px_area = _name_shape(cov)
        side = np.sqrt(px_area / (h * w) / {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}[shape])
        size = "small" if side < (SIZES["small"] + SIZES["large"]) / 2 else "large"
        found.append(Detected(colour, shape, size, (cols.mean() + 0.5) / w, (rows.mean() + 0.5) / h, area))
    return found


def _relation_holds(a: Detected, b: Detected, relation: str) -> bool:
    return {"left of": a.x < b.x, "right of": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}[relation]


def score_image(image, caption: str | Requirement) -> dict:
    """Check an image against a caption. Returns booleans (as 0/1 floats) for each attribute the caption
    asks about and `correct` = all of them:
      count   - as many objects as the caption names;
      colour  - the multiset of colours matches;
      shape   - the multiset of shapes matches;
      binding - the multiset of (colour, shape) pairs matches;
      size    - (single-object captions with a size) the size matches;
      spatial - (relation captions) the named relation holds between the two named objects.
    """
    req = parse_caption(caption) if isinstance(caption, str) else caption
    objs = extract_objects(image)
    want = [(c, s) for c, s, _ in req.objects]
    got = [(o.colour, o.shape) for o in objs]
    out = {
        "count": float(len(objs) == len(want)),
        "colour": float(sorted(map(str, (c for c, _ in got))) == sorted(c for c, _ in want)),
        "shape": float(sorted(map(str, (s for _, s in got))) == sorted(s for _, s in want)),
        "binding": float(sorted(map(str, got)) == sorted(map(str, want))),
    }
    sizes = [z for _, _, z in req.objects if z]
    if sizes:
        out["size"] = float(len(objs) == 1 and objs[0].size == sizes[0])
    if req.relation:
        holds = False
        if out["binding"]:
            a = next(o for o in objs if (o.colour, o.shape) == want[0])
            b = next(o for o in objs if (o.colour, o.shape) == want[1])
            holds = _relation_holds(a, b, req.relation)
        out["spatial"] = float(holds)
    out["correct"] = float(all(v == 1.0 for v in out.values()))
    return out
