"""ShapeWorld VQA: questions with exact ground truth from the scene, capability tags, and strict grading.

Capabilities: colour, shape, count, spatial, existence (POPE-style, balanced yes/no with hard negatives) and
description (free caption, graded by object F1 and the relation).
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

from .scene import COLOURS, SHAPES, Scene, Shape, parse_caption

CAPABILITIES = ("colour", "shape", "count", "spatial", "existence", "description")
SPATIAL_MARGIN = 0.15  # centres must differ by this (canvas fraction) along the asked axis
EXISTENCE_YES_PER_SCENE = 2  # at most; as many "no" items are added

# Words that count as a *wrong* answer when they appear beside the right one (hedging, "red or orange").
OTHER_COLOUR_WORDS = ("orange", "pink", "brown", "black", "white", "grey", "gray", "violet", "magenta",
                      "teal", "turquoise", "indigo")
OTHER_SHAPE_WORDS = ("rectangle", "oval", "ellipse", "star", "diamond", "pentagon", "hexagon", "heart", "cross")
COLOUR_WORDS = tuple(COLOURS) + OTHER_COLOUR_WORDS
SHAPE_WORDS = SHAPES + OTHER_SHAPE_WORDS
NUMBER_VALUES = {w: i for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}
SIZE_WORDS = ("small", "large", "big", "tiny", "little", "huge")
RELATION_WORDS = {"above": "above", "below": "below", "under": "below", "beneath": "below", "underneath": "below"}
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class VQAItem:
    question: str
    answer: str
    capability: str  # one of CAPABILITIES


def _name(s: Shape) -> str:
    return f"{s.colour} {s.shape}"


def _colour_items(scene: Scene) -> list[VQAItem]:
    counts = Counter(s.shape for s in scene.shapes)
    return [VQAItem(f"What colour is the {s.shape}?", s.colour, "colour")
            for s in scene.shapes if counts[s.shape] == 1]


def _shape_items(scene: Scene) -> list[VQAItem]:
    counts = Counter(s.colour for s in scene.shapes)
    return [VQAItem(f"What shape is the {s.colour} object?", s.shape, "shape")
            for s in scene.shapes if counts[s.colour] == 1]


def _count_items(scene: Scene, rng: random.Random) -> list[VQAItem]:
    counts = Counter(s.shape for s in scene.shapes)
    items = [VQAItem("How many shapes are there?", str(len(scene.shapes)), "count")]
    items += [VQAItem(f"How many {shape}s are there?", str(counts[shape]), "count")
              for shape in SHAPES if counts[shape]]
    absent = [shape for shape in SHAPES if not counts[shape]]
    if absent:  # a zero count probes hallucination
        items.append(VQAItem(f"How many {rng.choice(absent)}s are there?", "0", "count"))
    return items


def _spatial_items(scene: Scene, rng: random.Random) -> list[VQAItem]:
    names = Counter(_name(s) for s in scene.shapes)
    unique = [s for s in scene.shapes if names[_name(s)] == 1]
    items = []
    for i in range(len(unique)):
        for j in range(i + 1, len(unique)):
            for axis, (before, after) in (("x", ("left of", "right of")), ("y", ("above", "below"))):
                a, b = (unique[i], unique[j]) if rng.random() < 0.5 else (unique[j], unique[i])
                da = getattr(b, axis) - getattr(a, axis)  # > 0: a is left of / above b
                if abs(da) < SPATIAL_MARGIN:
                    continue
                want_yes = rng.random() < 0.5
                rel = before if (da > 0) == want_yes else after
                items.append(VQAItem(f"Is the {_name(a)} {rel} the {_name(b)}?",
                                     "yes" if want_yes else "no", "spatial"))
    return items


def _existence_items(scene: Scene, rng: random.Random) -> list[VQAItem]:
    """Equal numbers of yes and no; negatives are hard (right colour wrong shape, or right shape wrong
    colour) first, then any of hard/random."""
    present = sorted({(s.colour, s.shape) for s in scene.shapes})
    rng.shuffle(present)
    yes = present[:EXISTENCE_YES_PER_SCENE]
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    colours, shapes = {c for c, _ in present}, {s for _, s in present}
    pools = {"same colour": [p for p in absent if p[0] in colours],
             "same shape": [p for p in absent if p[1] in shapes],
             "random": [p for p in absent if p[0] not in colours and p[1] not in shapes] or absent}
    no: list[tuple[str, str]] = []
    while len(no) < len(yes):
        kinds = ["same colour", "same shape"] if not no else list(pools)
        pool = [p for p in pools[rng.choice(kinds)] if p not in no] or [p for p in absent if p not in no]
        no.append(rng.choice(pool))
    yes_items = [VQAItem(f"Is there a {c} {s}?", "yes", "existence") for c, s in yes]
    no_items = [VQAItem(f"Is there a {c} {s}?", "no", "existence") for c, s in no]
    first, second = (yes_items, no_items) if rng.random() < 0.5 else (no_items, yes_items)
    return [it for pair in zip(first, second) for it in pair]  # alternating keeps any prefix balanced


def make_vqa(scene: Scene, rng: random.Random, per_scene: int | None = None) -> list[VQAItem]:
    """All exact questions about `scene` (deterministic given `rng`). With `per_scene`, at most that many,
    taken round-robin over capabilities in a random order so a small budget still mixes capabilities."""
    groups = {
        "colour": _colour_items(scene),
        "shape": _shape_items(scene),
        "count": _count_items(scene, rng),
        "spatial": _spatial_items(scene, rng),
        "existence": _existence_items(scene, rng),
        "description": [VQAItem("Describe the image.", scene.caption, "description")],
    }
    if per_scene is None:
        return [it for cap in CAPABILITIES for it in groups[cap]]
    for cap in ("colour", "shape", "count", "spatial"):  # existence keeps its alternation
        rng.shuffle(groups[cap])
    order = list(CAPABILITIES)
    rng.shuffle(order)
    depth = max(len(g) for g in groups.values())
    out = [groups[c][d] for d in range(depth) for c in order if d < len(groups[c])]
    return out[:per_scene]


def _tokens(text) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", str(text).lower()).split()


def _singular(tok: str) -> str:
    return tok[:-1] if tok.endswith("s") and tok[:-1] in SHAPE_WORDS else tok


def parse_yes_no(text) -> str | None:
    """The first "yes"/"no" token, or None."""
    return next((t for t in _tokens(text) if t in ("yes", "no")), None)


def parse_numbers(text) -> set[int]:
    """Every number stated: digits, number words, "none", and "no" before a noun ("no circles")."""
    toks = _tokens(text)
    out = set()
    for i, t in enumerate(toks):
        if t.isdigit():
            out.add(int(t))
        elif t in NUMBER_VALUES:
            out.add(NUMBER_VALUES[t])
        elif t == "none":
            out.add(0)
        elif t == "no" and i + 1 < len(toks) and (
                _singular(toks[i + 1]) in SHAPE_WORDS + COLOUR_WORDS + SIZE_WORDS
                or toks[i + 1] in ("shapes", "objects", "shape", "object")):
            out.add(0)
    return out


Mention = tuple[int, int, tuple[str, str]]  # (first token, last token, (colour, shape))


def _scan_description(text) -> tuple[list[tuple[str, str]], tuple | None]:
    """Objects and the first relation in free text. An object is a colour word followed (size words
    allowed between) by a shape word, singular or plural; a number word or digit just before sets how
    many. Bare shapes ("the circle") and bare colours ("a red one") are not objects. A relation phrase
    (left of, right of, above, below/under/beneath) links the nearest object before it to the next after."""
    toks = _tokens(text)
    mentions: list[Mention] = []
    objects: list[tuple[str, str]] = []
    i = 0
    while i < len(toks):
        if toks[i] not in COLOURS:
            i += 1
            continue
        j = i + 1
        while j < len(toks) and toks[j] in SIZE_WORDS:
            j += 1
        if j < len(toks) and _singular(toks[j]) in SHAPES:
            k = i - 1
            while k >= 0 and toks[k] in SIZE_WORDS:
                k -= 1
            n = 1
            if k >= 0 and (toks[k].isdigit() or toks[k] in NUMBER_VALUES):
                n = int(toks[k]) if toks[k].isdigit() else NUMBER_VALUES[toks[k]]
            pair = (toks[i], _singular(toks[j]))
            objects += [pair] * min(n, 10)
            mentions.append((i, j, pair))
            i = j
        i += 1
    relation = None
    for k, t in enumerate(toks):
        rel = RELATION_WORDS.get(t)
        if t in ("left", "right") and k + 1 < len(toks) and toks[k + 1] == "of":
            rel = f"{t} of"
        if rel is None:
            continue
        before = [m for m in mentions if m[1] < k]
        after = [m for m in mentions if m[0] > k]
        if before and after:
            relation = (before[-1][2], rel, after[0][2])
            break
    return objects, relation


def _description_parts(text) -> tuple[list[tuple[str, str]], tuple | None]:
    """(objects, relation) of a description: by the caption grammar when it parses, else by scanning."""
    try:
        req = parse_caption(" ".join(_tokens(text)))
    except ValueError:
        return _scan_description(text)
    objects = [(c, s) for c, s, _ in req.objects]
    return objects, (objects[0], req.relation, objects[1]) if req.relation else None


def _relation_matches(pred: tuple | None, truth: tuple) -> bool:
    if pred is None:
        return False
    (pa, r, pb), (ta, tr, tb) = pred, truth
    return (pa, r, pb) == (ta, tr, tb) or (pa, INVERSE_RELATION[r], pb) == (tb, tr, ta)


def grade_description(truth_caption: str, prediction) -> float:
    """F1 between the multisets of (colour, shape) objects (sizes ignored), halved when the truth has a
    relation and the prediction states it wrongly or not at all ("A left of B" equals "B right of A")."""
    truth_objs, truth_rel = _description_parts(truth_caption)
    pred_objs, pred_rel = _description_parts(prediction)
    matched = sum((Counter(truth_objs) & Counter(pred_objs)).values())
    if not matched:
        return 0.0
    precision, recall = matched / len(pred_objs), matched / len(truth_objs)
    f1 = 2 * precision * recall / (precision + recall)
    if truth_rel is not None and not _relation_matches(pred_rel, truth_rel):
        f1 *= 0.5
    return f1


def _word_answer(expected: str, prediction, vocabulary: tuple[str, ...]) -> float:
    said = {_singular(t) for t in _tokens(prediction)} & set(vocabulary)
    return 1.0 if said == {expected} else 0.0


def grade(item: VQAItem, prediction) -> float:
    """Score in [0, 1] for `prediction` on `item`. Text is lower-cased and stripped of punctuation.

    - colour / shape: 1 if the expected word appears and no other colour (resp. shape) word does, counting
      common off-vocabulary words (orange, rectangle, ...) as other words; plurals are accepted.
    - count: 1 if the only number stated (digits, "two", "none", "no circles") is the expected one.
      "a"/"an" are not numbers.
    - spatial / existence: the first "yes"/"no" token decides; none gives 0.
    - description: see `grade_description`.
    An unparseable prediction scores 0; it never raises.
    """
    if item.capability == "colour":
        return _word_answer(item.answer, prediction, COLOUR_WORDS)
    if item.capability == "shape":
        return _word_answer(item.answer, prediction, SHAPE_WORDS)
    if item.capability == "count":
        return 1.0 if parse_numbers(prediction) == {int(item.answer)} else 0.0
    if item.capability in ("spatial", "existence"):
        return 1.0 if parse_yes_no(prediction) == item.answer else 0.0
    if item.capability == "description":
        return grade_description(item.answer, prediction)
    raise ValueError(f"unknown capability {item.capability!r}; expected one of {CAPABILITIES}")


def pope_metrics(items: list[VQAItem], predictions: list[str]) -> dict:
    """POPE metrics over the existence items (positive = "yes"). A prediction with no yes/no token is
    counted in `unparsed` and is wrong: a false negative on a "yes" item, and a non-correct (but not
    false-positive) answer on a "no" item. `yes_ratio` is the share of predictions that say yes."""
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    tp = fp = tn = fn = n = unparsed = 0
    for item, pred in zip(items, predictions):
        if item.capability != "existence":
            continue
        said = parse_yes_no(pred)
        n += 1
        unparsed += said is None
        if item.answer == "yes":
            tp += said == "yes"
            fn += said != "yes"
        else:
            fp += said == "yes"
            tn += said == "no"
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "n": n,
        "unparsed": unparsed,
    }
