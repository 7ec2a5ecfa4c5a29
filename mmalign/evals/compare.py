"""Compare two models scored on the same prompts and seeds: per-attribute accuracy gains with paired bootstrap
CIs, and the win rate (W/T/L) of one scalar reward per sample. With `groups` (each sample's prompt) the CIs
resample whole prompts (`core.stats`), so several seeds of one prompt count as one measured prompt."""
from __future__ import annotations

from ..core.stats import ci_unit, paired_gain_ci, win_rate


def compare_scores(after: list[dict], before: list[dict], reward, groups: list | None = None) -> dict:
    """`after`/`before`: per-sample score dicts in the same prompt/seed order; `reward(scores) -> float`;
    `groups`: one label per sample (its prompt), the unit the CIs resample."""
    if len(after) != len(before):
        raise ValueError(f"compare needs the same prompts and seeds: {len(after)} vs {len(before)} samples")
    if groups is not None and len(groups) != len(before):
        raise ValueError(f"groups must label every sample: {len(groups)} labels for {len(before)} samples")
    gains = {}
    for key in sorted({k for s in before for k in s}):
        keep = [i for i, (a, b) in enumerate(zip(after, before)) if key in a and key in b]
        if len(keep) != sum(key in b for b in before):
            raise ValueError(f"attribute {key!r} is scored for different samples in the two runs")
        mean, lo, hi = paired_gain_ci([after[i][key] for i in keep], [before[i][key] for i in keep],
                                      groups=None if groups is None else [groups[i] for i in keep])
        gains[key] = {"gain": round(mean, 4), "ci95": [round(lo, 4), round(hi, 4)], "n": len(keep)}
    wr = win_rate([reward(s) for s in after], [reward(s) for s in before], groups=groups)
    wr["win_rate"], wr["ci95"] = round(wr["win_rate"], 4), [round(v, 4) for v in wr["ci95"]]
    return {"gain": gains, "win_rate": wr, "ci_unit": ci_unit(groups)}
