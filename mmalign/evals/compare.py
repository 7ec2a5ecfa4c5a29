"""Compare two models scored on the same prompts and seeds: per-attribute accuracy gains with paired bootstrap
CIs, and the win rate (W/T/L) of one scalar reward per prompt."""
from __future__ import annotations

from ..core.stats import paired_gain_ci, win_rate


def compare_scores(after: list[dict], before: list[dict], reward) -> dict:
    """`after`/`before`: per-sample score dicts in the same prompt/seed order; `reward(scores) -> float`."""
    if len(after) != len(before):
        raise ValueError(f"compare needs the same prompts and seeds: {len(after)} vs {len(before)} samples")
    gains = {}
    for key in sorted({k for s in before for k in s}):
        pairs = [(a[key], b[key]) for a, b in zip(after, before) if key in a and key in b]
        if len(pairs) != sum(key in b for b in before):
            raise ValueError(f"attribute {key!r} is scored for different samples in the two runs")
        mean, lo, hi = paired_gain_ci([a for a, _ in pairs], [b for _, b in pairs])
        gains[key] = {"gain": round(mean, 4), "ci95": [round(lo, 4), round(hi, 4)], "n": len(pairs)}
    wr = win_rate([reward(s) for s in after], [reward(s) for s in before])
    wr["win_rate"], wr["ci95"] = round(wr["win_rate"], 4), [round(v, 4) for v in wr["ci95"]]
    return {"gain": gains, "win_rate": wr}
