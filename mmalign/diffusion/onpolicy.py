"""On-policy AI-feedback pairs: sample the model N times per prompt with fixed seeds, score every sample, keep
the best against the worst. Prompts whose samples all score the same give no preference and are counted."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from PIL import Image
from tqdm.auto import tqdm

from ..datasets.pairs import write_pairs_jsonl
from ..datasets.records import SkipReport
from .sampling import sample_images

Scorer = Callable[[Image.Image, str], float]


def shapeworld_reward(image: Image.Image, prompt: str) -> float:
    """The exact ShapeWorld scorer as one number: the share of the caption's attributes that hold, plus 1 when
    all of them do (so a fully correct sample always beats a nearly correct one)."""
    from ..datasets.shapeworld import score_image

    return reward_from_scores(score_image(image, prompt))


def reward_from_scores(scores: dict) -> float:
    """`shapeworld_reward` from a `score_image` result."""
    attrs = [v for k, v in scores.items() if k != "correct"]
    return sum(attrs) / len(attrs) + scores["correct"]


SCORERS: dict[str, Scorer] = {"shapeworld": shapeworld_reward}


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r} (known: {', '.join(sorted(SCORERS))})")
    return SCORERS[name]


def ranked_pairs(scores: list[float]) -> list[tuple[int, int]]:
    """Every (better, worse) index pair with strictly different scores, best-first order."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return [(a, b) for k, a in enumerate(order) for b in order[k + 1:] if scores[a] > scores[b]]


def best_vs_worst(scores: list[float]) -> tuple[int, int] | None:
    """Indices (best, worst); the first one wins a tie at either end; None when every score is equal."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    return None if scores[best] == scores[worst] else (best, worst)


def make_onpolicy_pairs(pipe, prompts: list[str], per_prompt: int, out_dir: str | Path, scorer: Scorer,
                        seed: int = 0, steps: int = 25, guidance: float = 4.0, batch_size: int = 64,
                        pairing: str = "best_worst", min_winner_score: float | None = None) -> dict:
    """Write a Pick-a-Pic-format pair folder (jpg_0 = winner, jpg_1 = loser, label_0 = 1, with scores and seeds)
    and `pairs_report.json`. Sample j of prompt i uses seed `seed + i * per_prompt + j`. pairing "best_worst":
    one pair per prompt; "all": every two samples of a prompt whose scores differ (up to N(N-1)/2 pairs from
    the same samples). `min_winner_score`: keep only pairs whose winner scores at least this (e.g. 2.0 with
    `shapeworld_reward`: the winner satisfies the whole caption); prompts left without a pair are counted."""
    if pairing not in ("best_worst", "all"):
        raise ValueError(f"pairing must be 'best_worst' or 'all', got {pairing!r}")
    if per_prompt < 2:
        raise ValueError(f"per_prompt must be >= 2 to form a pair, got {per_prompt}")
    t0 = time.time()
    flat = [p for p in prompts for _ in range(per_prompt)]
    seeds = [seed + k for k in range(len(flat))]
    images = sample_images(pipe, flat, seeds, steps=steps, guidance=guidance, batch_size=batch_size,
                           desc="on-policy samples")
    scores = [scorer(im, p) for im, p in tqdm(list(zip(images, flat)), desc="score samples", unit="img")]
    report, rows = SkipReport(total=len(prompts)), []
    for i, prompt in enumerate(prompts):
        k = slice(i * per_prompt, (i + 1) * per_prompt)
        pick = best_vs_worst(scores[k])
        if pick is None:
            report.skip("no preference (all samples scored equal)", prompt)
            continue
        chosen = [(b, w) for b, w in (ranked_pairs(scores[k]) if pairing == "all" else [pick])
                  if min_winner_score is None or scores[k][b] >= min_winner_score]
        if not chosen:
            report.skip(f"no winner scoring >= {min_winner_score}", prompt)
        for b, w in chosen:
            b, w = i * per_prompt + b, i * per_prompt + w
            rows.append((prompt, images[b], images[w], {"score_0": scores[b], "score_1": scores[w],
                                                        "seed_0": seeds[b], "seed_1": seeds[w]}))
    report.kept = report.total - sum(report.skipped.values())
    write_pairs_jsonl(out_dir, rows)
    info = {"prompts": len(prompts), "per_prompt": per_prompt, "pairing": pairing,
            "min_winner_score": min_winner_score, "pairs": len(rows),
            "report": report.to_dict(),
            "mean_score": sum(scores) / len(scores), "sampler": {"steps": steps, "guidance": guidance},
            "seconds": round(time.time() - t0, 1)}
    (Path(out_dir) / "pairs_report.json").write_text(json.dumps(info, indent=1))
    return info
