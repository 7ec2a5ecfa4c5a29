"""MT-Bench-style single-answer grading of text-only, multi-turn chats.

Questions file (jsonl, MT-Bench's layout)::

    {"question_id": 81, "category": "writing", "turns": ["first question", "follow-up"],
     "reference": ["reference answer 1", "reference answer 2"]  (optional, e.g. for math / reasoning)}

The model answers turn k with turns 1..k-1 and its own earlier answers in the context. The judge rates one
answer 1-10 and writes the rating as "[[7]]"; when grading turn k >= 2 it sees the whole conversation up to
turn k and is told to rate only the last answer. A rating that does not parse after the tries (temperature
raised per try) is left out of the means and counted, as MT-Bench drops its -1 ratings.

Scores: mean rating over (question, turn) items overall, per turn and per category.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..datasets.records import SkipReport, jsonl_rows, reject
from .judges import TEMPERATURE_STEP, TRIES, grade_with_retries


@dataclass(frozen=True)
class MTQuestion:
    id: str
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] | None = None


def read_questions(path, bad_rows: str = "error") -> tuple[list[MTQuestion], SkipReport]:
    """Questions of an MT-Bench-style jsonl, checked row by row (DataError or counted skip)."""
    path = Path(path)
    report, out = SkipReport(), []
    for where, row in jsonl_rows(path, report, bad_rows, bad_json="not JSON"):
        if not isinstance(row, dict):
            reject(report, bad_rows, "row is not a JSON object", where)
            continue
        turns, ref = row.get("turns"), row.get("reference")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            reject(report, bad_rows, "'turns' must be a non-empty list of non-empty strings", where)
            continue
        if ref is not None and (not isinstance(ref, list) or len(ref) != len(turns)
                                or not all(isinstance(r, str) for r in ref)):
            reject(report, bad_rows, "'reference' must be a list of strings, one per turn", where)
            continue
        if "question_id" not in row:
            reject(report, bad_rows, "missing 'question_id'", where)
            continue
        out.append(MTQuestion(str(row["question_id"]), str(row.get("category", "")), tuple(turns),
                              None if ref is None else tuple(ref)))
    report.kept = len(out)
    return out, report


def chat_messages(turns, answers) -> list[dict]:
    """User/assistant messages for turns[0..k] with answers[0..k-1] (text parts, VLM-processor friendly)."""
    msgs = []
    for i, q in enumerate(turns):
        msgs.append({"role": "user", "content": [{"type": "text", "text": q}]})
        if i < len(answers):
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": answers[i]}]})
    return msgs


def answer_questions(model, processor, questions: list[MTQuestion], max_new_tokens: int = 256,
                     batch_size: int = 8) -> list[list[str]]:
    """Greedy answers, turn by turn: every question's turn k is generated after all turn k-1 answers."""
    from ..mllm.generate import generate_answers

    answers: list[list[str]] = [[] for _ in questions]
    for k in range(max(len(q.turns) for q in questions)):
        idx = [i for i, q in enumerate(questions) if k < len(q.turns)]
        prompts = [([], chat_messages(questions[i].turns[:k + 1], answers[i])) for i in idx]
        for i, a in zip(idx, generate_answers(model, processor, prompts, max_new_tokens=max_new_tokens,
                                              batch_size=batch_size)):
            answers[i].append(a)
    return answers


SYSTEM_PROMPT = "You are an impartial judge of AI assistant answers."
RULES = ("Rate the quality of {what} for helpfulness, relevance, accuracy, depth and clarity. {ref}Be objective, "
         "explain in a few sentences, then give the rating from 1 to 10 in double brackets, exactly like "
         "this: \"Rating: [[6]]\".")


def judge_messages(q: MTQuestion, answers: list[str], turn: int) -> list[dict]:
    """Messages asking to rate answers[turn] (0-based); earlier turns are shown as context."""
    ref = q.reference[turn] if q.reference else None
    ref_rule = "Compare it with the reference answer and penalise mistakes. " if ref else ""
    lines = []
    for k in range(turn + 1):
        lines.append(f"### User (turn {k + 1}):\n{q.turns[k]}")
        if ref and k == turn:
            lines.append(f"### Reference answer (turn {k + 1}):\n{ref}")
        lines.append(f"### Assistant (turn {k + 1}):\n{answers[k]}")
    what = ("the assistant's answer" if turn == 0
            else f"the assistant's answer to the LAST question (turn {turn + 1}) only")
    body = RULES.format(what=what, ref=ref_rule) + "\n\n<conversation>\n" + "\n\n".join(lines) + "\n</conversation>"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": body}]


_DOUBLE = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")
_SINGLE = re.compile(r"\[(\d+(?:\.\d+)?)\]")


def parse_rating(text: str) -> float | None:
    """The rating in "[[x]]" (else the first "[x]"), within 1..10; None otherwise."""
    m = _DOUBLE.search(text or "") or _SINGLE.search(text or "")
    if not m:
        return None
    value = float(m.group(1))
    return value if 1 <= value <= 10 else None


def grade_answers(questions: list[MTQuestion], answers: list[list[str]], judge, temperature: float = 0.0,
                  step: float = TEMPERATURE_STEP, tries: int = TRIES, seed: int = 0) -> list[dict]:
    """One record per (question, turn): id, category, turn (1-based), answer, score (None on parse failure),
    tries and the judge's raw outputs."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answer lists")
    out = []
    for i, (q, a) in enumerate(zip(questions, answers)):
        if len(a) != len(q.turns):
            raise ValueError(f"question {q.id}: {len(q.turns)} turns but {len(a)} answers")
        for k in range(len(q.turns)):
            g = grade_with_retries(judge, judge_messages(q, a, k), parse_rating, temperature, step, tries,
                                   seed=seed * 1_000_003 + i * 64 + k * 16)
            out.append({"id": f"{q.id}#{k + 1}", "question_id": q.id, "category": q.category, "turn": k + 1,
                        "answer": a[k], "score": g.score, "tries": g.tries, "judge_outputs": g.outputs})
    return out


def summarize(records: list[dict]) -> dict:
    """Mean rating overall, per turn and per category over the parsed ratings; parse failures counted."""
    ok = [r for r in records if r["score"] is not None]

    def mean(rs):
        return sum(r["score"] for r in rs) / len(rs) if rs else None

    return {"score": mean(ok),
            "turns": {t: mean([r for r in ok if r["turn"] == t]) for t in sorted({r["turn"] for r in ok})},
            "categories": {c: mean([r for r in ok if r["category"] == c]) for c in sorted({r["category"] for r in ok})},
            "n": len(records), "parse_failures": len(records) - len(ok)}
