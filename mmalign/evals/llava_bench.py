"""LLaVA-Bench-style relative scoring: the judge sees the question (and an optional text context describing the
image), a reference answer and the candidate's answer, and rates both 1-10 in one reply ("s_ref s_cand" on the
first line). Per category c (conversation, detail, complex, ...):

    relative_c = 100 * mean_i(s_cand,i) / mean_i(s_ref,i)

over the items of c whose rating parsed. An item whose rating does not parse after the tries (temperature
raised per try) is left out of both means and counted in `parse_failures` — scoring it 0 for the candidate
alone would bias the ratio.
"""
from __future__ import annotations

import re

from .judges import TEMPERATURE_STEP, TRIES, grade_with_retries

SYSTEM_PROMPT = "You are a fair, careful reviewer of answers to questions about images."
INSTRUCTIONS = (
    "Two assistants answered the user's question about an image you cannot see; the context describes the "
    "image. Rate each answer's helpfulness, relevance, accuracy and level of detail on a scale of 1 to 10 "
    "(10 is best). On the first line write only the two ratings, Assistant 1's then Assistant 2's, separated "
    "by a space. Then explain briefly, without letting the order of the answers or their length sway you.")


def rating_messages(question: str, reference: str, candidate: str, context: str = "") -> list[dict]:
    """The reference answer is Assistant 1, the candidate Assistant 2 (as in LLaVA-Bench)."""
    body = (f"[Context]\n{context or '(none)'}\n\n[Question]\n{question}\n\n"
            f"[Assistant 1]\n{reference}\n[End of Assistant 1]\n\n"
            f"[Assistant 2]\n{candidate}\n[End of Assistant 2]\n\n{INSTRUCTIONS}")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": body}]


_PAIR = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[ ,/]\s*(\d+(?:\.\d+)?)\b")


def parse_pair(text: str) -> tuple[float, float] | None:
    """The two ratings on the first line ("8 6", "8, 6", "8/6"), each within 1..10; None otherwise."""
    first = (text or "").strip().split("\n", 1)[0]
    m = _PAIR.match(first)
    if not m:
        return None
    a, b = float(m.group(1)), float(m.group(2))
    return (a, b) if 1 <= a <= 10 and 1 <= b <= 10 else None


def rate_items(items, predictions: list[str], judge, temperature: float = 0.0, step: float = TEMPERATURE_STEP,
               tries: int = TRIES, seed: int = 0) -> list:
    """GradeOutcome per item (score = (reference, candidate) or None); the item's `answer` is the reference
    and its `context` (a text description of the image) is shown to the judge."""
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    return [grade_with_retries(judge, rating_messages(it.question, it.answer, p, it.context or ""),
                               parse_pair, temperature, step, tries, seed=seed * 1_000_003 + i * 16)
            for i, (it, p) in enumerate(zip(items, predictions))]


def relative_scores(pairs: list[tuple[float, float] | None], categories: list[str | None]) -> dict:
    """{category: {"reference", "candidate" (mean ratings), "relative" (100*cand/ref), "n"}} plus "all" (every
    item; items without a category count only there);
    None pairs (parse failures) are left out and counted in "parse_failures"."""
    if len(pairs) != len(categories):
        raise ValueError(f"{len(pairs)} ratings but {len(categories)} categories")
    out = {}
    for cat in sorted({c for c in categories if c} - {"all"}) + ["all"]:
        sel = [p for p, c in zip(pairs, categories) if p is not None and (cat == "all" or c == cat)]
        if not sel:
            continue
        ref = sum(p[0] for p in sel) / len(sel)
        cand = sum(p[1] for p in sel) / len(sel)
        out[cat] = {"reference": ref, "candidate": cand, "relative": 100 * cand / ref, "n": len(sel)}
    out["parse_failures"] = sum(p is None for p in pairs)
    return out
