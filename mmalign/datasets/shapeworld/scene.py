"""ShapeWorld scenes: the vocabulary, scene sampling and the caption grammar.

A scene is 1-3 shapes on a light canvas. Everything is a pure function of a seed, so a dataset, a held-out
prompt set or a VQA benchmark is reproducible from its seed alone. Coordinates are fractions of the canvas
(0..1, origin top-left) so the same scene renders at 32 or 64 px.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import asdict, dataclass

CANVAS_RGB = (245, 245, 245)
# Hues spaced ~60 degrees apart so a colour survives blur, noise and a global tint.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (225, 200, 20),
    "green": (40, 170, 60),
    "cyan": (30, 180, 200),
    "blue": (40, 70, 220),
    "purple": (170, 50, 200),
}
SHAPES = ("circle", "square", "triangle")
# Side of the shape's bounding box as a fraction of the canvas side.
SIZES = {"small": 0.25, "large": 0.42}
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
CAPTION_KINDS = ("single", "pair", "relation", "count")


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    size: str
    x: float  # centre, fraction of width
    y: float  # centre, fraction of height


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    caption: str
    kind: str  # one of CAPTION_KINDS
    relation: str | None = None  # for kind == "relation": shapes[0] <relation> shapes[1]

    def to_dict(self) -> dict:
        return {"caption": self.caption, "kind": self.kind, "relation": self.relation,
                "shapes": [asdict(s) for s in self.shapes]}

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        return Scene(tuple(Shape(**s) for s in d["shapes"]), d["caption"], d["kind"], d.get("relation"))


def _plural(shape: str) -> str:
    return shape + "s"


def _place(rng: random.Random, sizes: list[str], relation: str | None, tries: int = 500) -> list[tuple[float, float]]:
    """Centres for shapes of the given sizes: inside the canvas, with a gap between bounding boxes, and for a
    relation, shape 0 clearly on the named side of shape 1 (centres apart by at least one box side)."""
    for _ in range(tries):
        pts = []
        for s in sizes:
            h = SIZES[s] / 2 + 0.03
            pts.append((rng.uniform(h, 1 - h), rng.uniform(h, 1 - h)))
        ok = True
        for i in range(len(pts)):
            for j in range(i + 1, len(pts)):
                gap = (SIZES[sizes[i]] + SIZES[sizes[j]]) / 2 + 0.06
                if abs(pts[i][0] - pts[j][0]) < gap and abs(pts[i][1] - pts[j][1]) < gap:
                    ok = False
        if ok and relation is not None:
            (x0, y0), (x1, y1) = pts[0], pts[1]
            need = max(SIZES[sizes[0]], SIZES[sizes[1]])
            ok = {"left of": x1 - x0, "right of": x0 - x1, "above": y1 - y0, "below": y0 - y1}[relation] >= need
        if ok:
            return pts
    raise RuntimeError(f"could not place shapes of sizes {sizes} with relation {relation!r}")


def sample_scene(rng: random.Random, kind: str | None = None) -> Scene:
    """One scene and its caption, drawn from `rng` (a `random.Random`)."""
    kind = kind or rng.choice(CAPTION_KINDS)
    colours, shapes = list(COLOURS), list(SHAPES)
    if kind == "single":
        c, s, z = rng.choice(colours), rng.choice(shapes), rng.choice(list(SIZES))
        (x, y), = _place(rng, [z], None)
        return Scene((Shape(c, s, z, x, y),), f"a {z} {c} {s}", kind)
    if kind in ("pair", "relation"):
        a = (rng.choice(colours), rng.choice(shapes))
        b = a
        while b == a:  # two distinguishable objects
            b = (rng.choice(colours), rng.choice(shapes))
        rel = rng.choice(RELATIONS) if kind == "relation" else None
        sizes = [rng.choice(list(SIZES)), "small"]
        (xa, ya), (xb, yb) = _place(rng, sizes, rel)
        objs = (Shape(a[0], a[1], sizes[0], xa, ya), Shape(b[0], b[1], sizes[1], xb, yb))
        joint = rel if rel else "and"
        return Scene(objs, f"a {a[0]} {a[1]} {joint} a {b[0]} {b[1]}", kind, rel)
    if kind == "count":
        n = rng.choice([2, 3])
        c, s = rng.choice(colours), rng.choice(shapes)
        pts = _place(rng, ["small"] * n, None)
        objs = tuple(Shape(c, s, "small", x, y) for x, y in pts)
        return Scene(objs, f"{NUMBER_WORDS[n]} {c} {_plural(s)}", kind)
    raise ValueError(f"unknown caption kind {kind!r}; expected one of {CAPTION_KINDS}")


def is_heldout(caption: str) -> bool:
    """About 1 caption in 8 is held out of training (a fixed hash split), so evaluation prompts are new
    compositions, not memorised ones."""
    return zlib.crc32(caption.encode()) % 8 == 0


# The held-out captions, halved by the same hash: "validation" for choosing settings (calibration sweeps),
# "test" only for reported numbers. Both are new compositions; no caption is in both.
SPLITS = ("train", "heldout", "validation", "test")


def heldout_part(caption: str) -> str | None:
    """"validation" or "test" for a held-out caption (about 1 in 16 each), None for a training caption."""
    return {0: "test", 8: "validation"}.get(zlib.crc32(caption.encode()) % 16)


def in_split(caption: str, split: str | None) -> bool:
    """Whether `caption` belongs to `split` (None: any; "heldout" = validation + test)."""
    if split is None:
        return True
    if split in ("train", "heldout"):
        return is_heldout(caption) == (split == "heldout")
    return heldout_part(caption) == split


def sample_scenes(seed: int, n: int, kinds: tuple[str, ...] | None = None, split: str | None = None) -> list[Scene]:
    """`n` scenes, deterministic in `seed`; `kinds` restricts the caption kinds (cycled in order); `split`
    ("train", "heldout", or its halves "validation" / "test") keeps only captions on that side."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    rng = random.Random(seed)
    out: list[Scene] = []
    while len(out) < n:
        scene = sample_scene(rng, kinds[len(out) % len(kinds)] if kinds else None)
        if in_split(scene.caption, split):
            out.append(scene)
    return out


def vocabulary() -> list[str]:
    """Every word the caption grammars (scenes and motion clips) can produce."""
    words = {"a", "and", "of", "left", "right", "above", "below", "moving", "up", "down", *SIZES, *COLOURS,
             *SHAPES, *(s + "s" for s in SHAPES), *NUMBER_WORDS.values()}
    return sorted(words)


@dataclass(frozen=True)
class Requirement:
    """What a caption asks of an image: objects (colour, shape, optional size) and an optional relation
    between object 0 and object 1."""
    objects: tuple[tuple[str, str, str | None], ...]
    relation: str | None = None


def parse_caption(caption: str) -> Requirement:
    """Invert the grammar. Raises ValueError on a caption the grammar cannot produce."""
    words = caption.strip().lower().split()
    def obj(ws: list[str]) -> tuple[str, str, str | None]:
        if ws and ws[0] == "a":
            ws = ws[1:]
        size = ws[0] if len(ws) == 3 and ws[0] in SIZES else None
        ws = ws[1:] if size else ws
        if len(ws) != 2 or ws[0] not in COLOURS or ws[1] not in SHAPES:
            raise ValueError(f"not a ShapeWorld caption: {caption!r}")
        return ws[0], ws[1], size
    if words and words[0] in ("two", "three"):
        n = 2 if words[0] == "two" else 3
        if len(words) != 3 or words[1] not in COLOURS or not words[2].endswith("s") or words[2][:-1] not in SHAPES:
            raise ValueError(f"not a ShapeWorld caption: {caption!r}")
        return Requirement(tuple((words[1], words[2][:-1], None) for _ in range(n)))
    text = " ".join(words)
    for joint in ("left of", "right of", "above", "below", "and"):
        key = f" {joint} a "
        if key in text:
            left, right = text.split(key, 1)
            return Requirement((obj(left.split()), obj(right.split())), None if joint == "and" else joint)
    return Requirement((obj(words),))
