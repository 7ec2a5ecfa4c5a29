"""POPE on benchmark items: yes/no object-existence questions, scored by the ShapeWorld POPE counter
(`mmalign.datasets.shapeworld.vqa.pope_metrics`: positive = "yes"; yes_ratio is the share of PREDICTIONS that
say yes; a prediction without yes/no is counted in `unparsed` and is wrong), overall and per split
(`category`: random / popular / adversarial in POPE proper).

An item is a POPE item when its `type` is "pope" or "existence" (ShapeWorld's existence questions).
"""
from __future__ import annotations

from ..datasets.shapeworld.vqa import VQAItem, pope_metrics

POPE_TYPES = ("pope", "existence")


def pope_items(items) -> list[int]:
    """Indices of the POPE items; ValueError when one's ground truth is not yes/no."""
    idx = [i for i, it in enumerate(items) if it.type in POPE_TYPES]
    for i in idx:
        if items[i].answer.strip().lower() not in ("yes", "no"):
            raise ValueError(f"POPE item {items[i].id!r} needs a yes/no answer, got {items[i].answer!r}")
    return idx


def pope_table(items, predictions: list[str]) -> dict | None:
    """{"all": metrics, "<category>": metrics, ...} over the POPE items, or None when there are none."""
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    idx = pope_items(items)
    if not idx:
        return None

    def metrics(sel):
        return pope_metrics([VQAItem(items[i].question, items[i].answer.strip().lower(), "existence") for i in sel],
                            [predictions[i] for i in sel])

    out = {"all": metrics(idx)}
    for cat in sorted({items[i].category for i in idx if items[i].category}):
        out[cat] = metrics([i for i in idx if items[i].category == cat])
    return out
