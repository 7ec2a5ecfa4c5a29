"""Rejection sampling (best-of-N / RAFT): sample N answers per prompt from the model, score each, keep the best
as a new SFT conversation. Training `mllm_sft` on the output and repeating is RAFT.

Prompts come as conversations whose last turn is the assistant's reference answer (what `read_vl_conversations`
reads); a scorer maps (reference, answer, meta) to a number. Prompts whose best answer scores below
`min_score` are left out and counted.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .generate import generate_answers

Scorer = Callable[[str, str, dict], float]


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def exact_match(reference: str, answer: str, meta: dict) -> float:
    """1.0 when the answer's words equal the reference's (case and punctuation ignored), else 0.0."""
    return float(_words(reference) == _words(answer))


def shapeworld_vqa(reference: str, answer: str, meta: dict) -> float:
    """The exact ShapeWorld grader; needs meta["capability"] (colour, shape, count, spatial, existence,
    description) and the question in meta["question"]."""
    from ..datasets.shapeworld.vqa import CAPABILITIES, VQAItem, grade

    cap = meta.get("capability")
    if cap not in CAPABILITIES:
        raise ValueError(f"the shapeworld scorer needs meta['capability'] in {CAPABILITIES}, got {cap!r}")
    return grade(VQAItem(meta.get("question", ""), reference, cap), answer)


SCORERS: dict[str, Scorer] = {"exact_match": exact_match, "shapeworld_vqa": shapeworld_vqa}


def message_text(message: dict) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return " ".join(c["text"] for c in content if c.get("type") == "text")


@dataclass
class BestOfNSummary:
    prompts: int
    kept: int
    below_min_score: int
    mean_sample_score: float
    mean_best_score: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def best_of_n(model, processor, prompts: list[tuple[list, list[dict], str, dict]], n: int, scorer: Scorer,
              temperature: float = 1.0, seed: int = 0, batch_size: int = 32, max_new_tokens: int = 32,
              min_score: float | None = None) -> tuple[list[tuple[list, list[dict], dict]], BestOfNSummary]:
    """`prompts` = [(images, prompt messages, reference answer, meta)]. Returns conversation rows
    (images, prompt + best answer, meta with best_score/sample_scores) for `write_vl_conversations_jsonl`,
    and a summary. The first best-scored sample wins ties; sampling is seeded and reproducible."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    items = [(images, msgs) for images, msgs, _, _ in prompts for _ in range(n)]
    answers = generate_answers(model, processor, items, max_new_tokens=max_new_tokens, do_sample=True,
                               temperature=temperature, seed=seed, batch_size=batch_size)
    rows, all_scores, best_scores, below = [], [], [], 0
    for k, (images, msgs, reference, meta) in enumerate(prompts):
        samples = answers[k * n:(k + 1) * n]
        scores = [float(scorer(reference, a, meta)) for a in samples]
        all_scores += scores
        best = max(range(n), key=lambda j: (scores[j], -j))
        best_scores.append(scores[best])
        if min_score is not None and scores[best] < min_score:
            below += 1
            continue
        reply = {"role": "assistant", "content": [{"type": "text", "text": samples[best]}]}
        rows.append((images, list(msgs) + [reply], {**meta, "best_score": scores[best], "sample_scores": scores}))
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return rows, BestOfNSummary(len(prompts), len(rows), below, mean(all_scores), mean(best_scores))


def prompts_from_conversations(records) -> list[tuple[list, list[dict], str, dict]]:
    """(images, prompt messages, reference, meta) from conversations ending in the reference answer; the user's
    last question goes into meta["question"] for scorers that need it."""
    from ..datasets.vl_records import load_images

    out = []
    for rec in records:
        *prompt, last = rec.messages
        question = next((message_text(m) for m in reversed(prompt) if m["role"] == "user"), "")
        out.append((load_images(rec), prompt, message_text(last), {"question": question, **rec.meta}))
    return out
