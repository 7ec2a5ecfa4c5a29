"""Statistics for comparing models on the same prompts and seeds."""
from __future__ import annotations

import numpy as np


def bootstrap_ci(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap CI of the mean over items (prompts), fixed seed."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"need a non-empty 1-D sequence of per-item values, got shape {x.shape}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(x.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def paired_gain_ci(after, before, n_boot: int = 2000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float]:
    """(mean gain, low, high) of after - before over the same items (same prompts and seeds), resampling items."""
    a, b = np.asarray(after, dtype=np.float64), np.asarray(before, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same items: {a.shape} vs {b.shape}")
    return bootstrap_ci(a - b, n_boot, seed, level)


def win_rate(a_scores, b_scores, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """A vs B on the same items: W/T/L counts and win rate W = (wins + ties/2) / N with its bootstrap CI."""
    a, b = np.asarray(a_scores, dtype=np.float64), np.asarray(b_scores, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"win rate needs two equal-length 1-D score lists, got {a.shape} and {b.shape}")
    per_item = (a > b) + 0.5 * (a == b)
    rate, lo, hi = bootstrap_ci(per_item, n_boot, seed, level)
    return {"wins": int((a > b).sum()), "ties": int((a == b).sum()), "losses": int((a < b).sum()),
            "win_rate": rate, "ci95": [lo, hi], "n": len(a)}
