"""MM-Vet-style evaluation: questions with images, ground truths with <AND>/<OR>, capability tags, answers graded
0.0-1.0 by a judge with a few-shot grading table, per-capability and per-combination scores over judge runs.

Benchmark file (jsonl), one object per line::

    {"id": "q1", "question": "...", "image": "images/q1.png" (relative to the file; optional),
     "answer": "cat <AND> dog", "capabilities": ["rec", "spat"], "category": "...", "type": "...",
     "context": "..." (optional; LLaVA-Bench's text description of the image)}

Ground truth: ``a <AND> b`` — every part is needed (partial credit for the share present); ``a <OR> b`` — any one
part is enough. One answer uses one of the two (mixing them is ambiguous and refused).

Scores (MM-Vet): for a capability c, ``score_c = 100 * mean(grade_i for questions i tagged c)``; for a
combination (the exact tag set of a question, e.g. ``rec_spat``) the mean over questions with that set;
``total = 100 * mean(all grades)``. Over R judge runs: mean and sample standard deviation (ddof=1) per key.
A grade that cannot be parsed after the tries is 0 and is counted in ``parse_failures``.
"""
from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..datasets.records import SkipReport, jsonl_rows, reject
from .judges import TEMPERATURE_STEP, TRIES, RuleJudge, grade_with_retries

MMVET_CAPABILITIES = ("rec", "ocr", "know", "gen", "spat", "math")


@dataclass(frozen=True)
class BenchItem:
    id: str
    question: str
    answer: str
    capabilities: tuple[str, ...]
    image: str | None = None  # absolute path
    category: str | None = None
    type: str | None = None  # e.g. the ShapeWorld VQA kind the rule judge needs, or "pope"
    context: str | None = None  # LLaVA-Bench: a text description of the image for a text-only judge


def truth_parts(answer: str) -> tuple[str, list[str]]:
    """("single" | "and" | "or", parts) of a ground truth; ValueError for an empty part or mixed operators."""
    has_and, has_or = "<AND>" in answer, "<OR>" in answer
    if has_and and has_or:
        raise ValueError(f"ground truth mixes <AND> and <OR>: {answer!r}")
    op = "and" if has_and else "or" if has_or else "single"
    parts = [p.strip() for p in answer.split(f"<{op.upper()}>")] if op != "single" else [answer.strip()]
    if not all(parts):
        raise ValueError(f"ground truth has an empty part: {answer!r}")
    return op, parts


def _bad(report, policy, reason, where):
    reject(report, policy, reason, where)
    return None


def _item(row, where: str, root: Path, report: SkipReport, policy: str) -> BenchItem | None:
    if not isinstance(row, dict):
        return _bad(report, policy, "not a JSON object", where)
    for key in ("id", "question", "answer"):
        if not isinstance(row.get(key), (str, int)) or isinstance(row.get(key), bool) or not str(row[key]).strip():
            return _bad(report, policy, f"missing or empty '{key}'", where)
    caps = row.get("capabilities")
    if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c for c in caps):
        return _bad(report, policy, "'capabilities' must be a non-empty list of tags", where)
    try:
        truth_parts(str(row["answer"]))
    except ValueError as e:
        return _bad(report, policy, str(e), where)
    image = row.get("image")
    if image is not None:
        image = root / image
        if not image.is_file():
            return _bad(report, policy, f"image not found: {image}", where)
    return BenchItem(str(row["id"]), str(row["question"]), str(row["answer"]), tuple(dict.fromkeys(caps)),
                     None if image is None else str(image), row.get("category"), row.get("type"), row.get("context"))


def read_bench(path, bad_rows: str = "error") -> tuple[list[BenchItem], SkipReport]:
    """Items of a benchmark jsonl (see the module docstring), checked row by row: a bad row is a DataError
    naming file:line (`bad_rows="error"`) or a counted skip with its reason (`"skip"`). Ids must be unique."""
    path = Path(path)
    report, items, seen = SkipReport(), [], set()
    for where, row in jsonl_rows(path, report, bad_rows, bad_json="not JSON"):
        item = _item(row, where, path.parent, report, bad_rows)
        if item is not None and item.id in seen:
            item = _bad(report, bad_rows, f"duplicate id {item.id!r}", where)
        if item is not None:
            seen.add(item.id)
            items.append(item)
    report.kept = len(items)
    return items, report


SYSTEM_PROMPT = ("You are a strict, consistent grader. You compare a model's answer with a ground truth and reply "
                 "with one number between 0.0 and 1.0 and nothing else.")
INSTRUCTIONS = (
    "Grade how correct the prediction is against the ground truth, from 0.0 (wrong) to 1.0 (fully right).\n"
    "In a ground truth, <AND> joins parts that are all required: give the share of parts the prediction gets "
    "right. <OR> joins alternatives: any one of them is a full answer. Numbers must match exactly. Extra detail "
    "is fine when it is true; a wrong claim beside the right one, or a hedge between a right and a wrong "
    "option, lowers the grade.\nExamples:\n")
# Written for this project (ShapeWorld-like and everyday scenes), covering <AND>, <OR>, partial and hedged answers.
FEW_SHOT = (
    ("How many triangles are in the picture?", "3 <OR> three", "I can see three triangles.", "1.0"),
    ("How many triangles are in the picture?", "3 <OR> three", "There are four triangles.", "0.0"),
    ("Which two animals sit on the bench?", "heron <AND> duck", "A duck.", "0.5"),
    ("Which two animals sit on the bench?", "heron <AND> duck", "A duck and a heron, side by side.", "1.0"),
    ("Is the red square left of the blue circle?", "no", "Yes, it is on the left.", "0.0"),
    ("What colour is the kite?", "orange", "It is orange or maybe red.", "0.5"),
    ("What does the shop sign say?", "OPEN LATE", "The sign reads \"open late\".", "1.0"),
    ("Name the three tools on the table.", "hammer <AND> saw <AND> drill", "a hammer, a drill and pliers",
     "0.7"),
    ("Where was the photo most likely taken?", "a harbour <OR> a port", "At a marina with fishing boats.", "1.0"),
    ("What is 15 + 27 on the whiteboard?", "42", "The board shows 41.", "0.0"),
)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "/")


def grading_messages(question: str, truth: str, prediction: str) -> list[dict]:
    """System + user messages asking for a 0.0-1.0 grade; the last table row is left open for the judge."""
    rows = ["| Question | Ground truth | Prediction | Correctness |", "|---|---|---|---|"]
    rows += [f"| {q} | {t} | {p} | {g} |" for q, t, p, g in FEW_SHOT]
    rows.append(f"| {_cell(question)} | {_cell(truth)} | {_cell(prediction)} |")
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": INSTRUCTIONS + "\n".join(rows) + "\nReply with the correctness only."}]


_NUMBER = re.compile(r"(?<![\w.])-?(?:\d+(?:\.\d*)?|\.\d+)")


def parse_grade(text: str) -> float | None:
    """The first number in the judge's text if it lies in [0, 1]; None otherwise (no number, out of range)."""
    m = _NUMBER.search(text or "")
    if not m:
        return None
    value = float(m.group())
    return value if 0.0 <= value <= 1.0 else None


def grade_predictions(items: list[BenchItem], predictions: list[str], judge, runs: int = 1,
                      temperature: float = 0.0, step: float = TEMPERATURE_STEP, tries: int = TRIES,
                      seed: int = 0) -> dict:
    """Grades of every prediction in each judge run: {"grades": [run][item] (0 for a parse failure),
    "parse_failed": [run][item], "tries": [run][item], "outputs": [run][item] (raw judge texts), "runs": R}.
    The rule judge grades each item once by the exact ShapeWorld scorer (R = 1: it is deterministic)."""
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if isinstance(judge, RuleJudge):
        grades = [judge.grade(it.question, it.answer, p, it.type) for it, p in zip(items, predictions)]
        n = len(items)
        return {"grades": [grades], "parse_failed": [[False] * n], "tries": [[1] * n], "outputs": [[None] * n],
                "runs": 1}
    out = {"grades": [], "parse_failed": [], "tries": [], "outputs": [], "runs": runs}
    for r in range(runs):
        res = [grade_with_retries(judge, grading_messages(it.question, it.answer, p), parse_grade, temperature,
                                  step, tries, seed=seed * 1_000_003 + r * 100_003 + i * 16)
               for i, (it, p) in enumerate(zip(items, predictions))]
        out["grades"].append([0.0 if g.parse_failed else g.score for g in res])
        out["parse_failed"].append([g.parse_failed for g in res])
        out["tries"].append([g.tries for g in res])
        out["outputs"].append([g.outputs for g in res])
    return out


def capability_scores(grades: list[float], capabilities: list[tuple[str, ...]]) -> dict:
    """{"total": 100*mean, "capabilities": {tag: 100*mean over items having tag}, "combinations":
    {"tag1_tag2": 100*mean over items whose tag set is exactly that}, "n": {"capabilities": {tag: items},
    "combinations": {key: items}}}."""
    if len(grades) != len(capabilities) or not grades:
        raise ValueError(f"need one capability set per grade (got {len(grades)} grades, {len(capabilities)} sets)")
    caps, combos, n = {}, {}, {"capabilities": {}, "combinations": {}}
    for tag in sorted({t for cs in capabilities for t in cs}):
        g = [x for x, cs in zip(grades, capabilities) if tag in cs]
        caps[tag], n["capabilities"][tag] = 100 * sum(g) / len(g), len(g)
    for key in sorted({"_".join(sorted(cs)) for cs in capabilities}):
        g = [x for x, cs in zip(grades, capabilities) if "_".join(sorted(cs)) == key]
        combos[key], n["combinations"][key] = 100 * sum(g) / len(g), len(g)
    return {"total": 100 * sum(grades) / len(grades), "capabilities": caps, "combinations": combos, "n": n}


def summarize_runs(graded: dict, items: list[BenchItem]) -> dict:
    """Per-run capability tables and, per key (total, each capability, each combination), the mean and the
    sample std over runs (None for one run); parse failures per run and in all."""
    tables = [capability_scores(g, [it.capabilities for it in items]) for g in graded["grades"]]

    def over_runs(get):
        values = [get(t) for t in tables]
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}

    first = tables[0]
    return {
        "total": over_runs(lambda t: t["total"]),
        "capabilities": {k: over_runs(lambda t, k=k: t["capabilities"][k]) for k in first["capabilities"]},
        "combinations": {k: over_runs(lambda t, k=k: t["combinations"][k]) for k in first["combinations"]},
        "n": first["n"],
        "runs": tables,
        "parse_failures_per_run": [sum(f) for f in graded["parse_failed"]],
        "parse_failures": sum(sum(f) for f in graded["parse_failed"]),
    }


def item_means(graded: dict) -> list[float]:
    """Each item's grade averaged over the judge runs (the unit for paired comparisons)."""
    runs = graded["grades"]
    return [sum(r[i] for r in runs) / len(runs) for i in range(len(runs[0]))]
