"""Statistics for comparing models on the same prompts and seeds.

Items that share a prompt (several seeds of one caption, several questions about one composition) are not
independent draws: a model that improves a prompt tends to improve all of its samples. Every function takes
optional `groups` (one label per item, e.g. the prompt) and then resamples whole groups (the cluster bootstrap),
so the interval reflects how many distinct prompts were measured, not how many samples. The point estimate is
still the mean over items. Without `groups` (or with one item per group) each item is its own group, which gives
exactly the item bootstrap. A bootstrap over a handful of groups cannot see their spread (two groups give an
interval between two numbers), so with fewer than MIN_GROUPS groups the interval is the wider of the two.
"""
from __future__ import annotations

from math import comb

import numpy as np
import torch

MIN_GROUPS = 10  # fewer groups than this: the CI also covers the item bootstrap's


def group_sums(values, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """(per-group sums, per-group sizes) of a 1-D sequence, groups in first-seen order; no groups: one per item."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"need a non-empty 1-D sequence of per-item values, got shape {x.shape}")
    if groups is None:
        return x, np.ones_like(x)
    labels = list(groups)
    if len(labels) != len(x):
        raise ValueError(f"groups must label every item: {len(labels)} labels for {len(x)} values")
    index: dict = {}
    codes = np.fromiter((index.setdefault(g, len(index)) for g in labels), dtype=np.int64, count=len(labels))
    return np.bincount(codes, weights=x), np.bincount(codes).astype(np.float64)


def bootstrap_ci(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                 groups=None) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap CI of the mean over items, fixed seed. With `groups`, whole groups
    are resampled (each replicate's mean = its groups' summed values / their summed sizes); with fewer than
    MIN_GROUPS groups (and more items than groups) the interval spans both that and the item bootstrap's."""
    sums, sizes = group_sums(values, groups)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(sums), size=(n_boot, len(sums)))
    means = sums[pick].sum(axis=1) / sizes[pick].sum(axis=1)
    tail = (1 - level) / 2 * 100
    mean, lo, hi = float(sums.sum() / sizes.sum()), float(np.percentile(means, tail)), float(
        np.percentile(means, 100 - tail))
    if len(sums) < min(MIN_GROUPS, len(values)):
        _, item_lo, item_hi = bootstrap_ci(values, n_boot, seed, level)
        lo, hi = min(lo, item_lo), max(hi, item_hi)
    return mean, lo, hi


def ci_unit(groups=None, unit: str = "prompts") -> str:
    """What a CI resamples, in words, for results files and tables."""
    if groups is None:
        return "95 % percentile bootstrap over samples"
    return f"95 % percentile bootstrap over {len(set(groups))} distinct {unit} (their samples resampled together)"


def cluster_se(values, groups) -> float:
    """The analytic cluster-robust standard error of the item mean (linearised ratio estimator, no small-sample
    factor): sqrt(sum_g (S_g - n_g * mean)^2) / N. What the cluster bootstrap's spread estimates."""
    sums, sizes = group_sums(values, groups)
    mean = sums.sum() / sizes.sum()
    return float(np.sqrt(((sums - sizes * mean) ** 2).sum()) / sizes.sum())


def paired_gain_ci(after, before, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                   groups=None) -> tuple[float, float, float]:
    """(mean gain, low, high) of after - before over the same items (same prompts and seeds), resampling items,
    or whole groups of items when `groups` is given."""
    a, b = np.asarray(after, dtype=np.float64), np.asarray(before, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same items: {a.shape} vs {b.shape}")
    return bootstrap_ci(a - b, n_boot, seed, level, groups)


def win_rate(a_scores, b_scores, n_boot: int = 2000, seed: int = 0, level: float = 0.95, groups=None) -> dict:
    """A vs B on the same items: W/T/L counts and win rate W = (wins + ties/2) / N with its bootstrap CI (over
    items, or over whole groups of items when `groups` is given)."""
    a, b = np.asarray(a_scores, dtype=np.float64), np.asarray(b_scores, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"win rate needs two equal-length 1-D score lists, got {a.shape} and {b.shape}")
    per_item = (a > b) + 0.5 * (a == b)
    rate, lo, hi = bootstrap_ci(per_item, n_boot, seed, level, groups)
    out = {"wins": int((a > b).sum()), "ties": int((a == b).sum()), "losses": int((a < b).sum()),
           "win_rate": rate, "ci95": [lo, hi], "n": len(a)}
    if groups is not None:
        out["n_groups"] = len(set(groups))
    return out


def pass_at(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from c correct of n samples (Chen et al. 2021): 1 − C(n − c, k) / C(n, k), the chance that k
    of the n samples drawn without replacement hold at least one correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def pass_at_curve(correct: dict, n: int, weights: dict | None = None) -> list[dict]:
    """pass@k for k = 1, 2, 4, ... n, averaged over prompts (`correct`: prompt -> correct of its n samples),
    weighted by `weights` (prompt -> weight, e.g. how often it occurs in an evaluation set) and unweighted."""
    w = weights or {p: 1 for p in correct}
    total, rows, k = sum(w[p] for p in correct), [], 1
    while k <= n:
        at = {p: pass_at(n, c, k) for p, c in correct.items()}
        rows.append({"k": k, "weighted": sum(w[p] * v for p, v in at.items()) / total,
                     "unweighted": sum(at.values()) / len(at)})
        k *= 2
    return rows


def gradient_noise_scale(gram: torch.Tensor, batch: int, idx: torch.Tensor | None = None) -> dict[str, float]:
    """The gradient noise scale (McCandlish et al. 2018) from M independent minibatch gradients g_k of `batch`
    samples each, given their M x M Gram matrix g_j . g_k. With G the true gradient and S the per-sample covariance,
    E[g_j . g_k] = |G|^2 for j != k and E|g_k|^2 = |G|^2 + tr(S) / batch, so

        |G|^2 = mean_{j != k} g_j . g_k,   tr(S) = batch (mean_k |g_k|^2 - |G|^2),   B_noise = tr(S) / |G|^2,

    the batch at which a step's noise equals its signal (inf when the |G|^2 estimate is <= 0: no direction
    resolved). `idx`: a bootstrap draw of rows (pairs of one original gradient with itself are left out of the cross
    terms). cos_pairs: mean cosine of two different gradients (gradients of norm 0 left out)."""
    idx = torch.arange(len(gram)) if idx is None else idx
    sub = gram[idx][:, idx].double()
    cross = idx[:, None] != idx[None, :]
    if not cross.any():
        raise ValueError("gradient_noise_scale needs at least two different gradients")
    g2 = sub[cross].mean()
    trace = batch * (sub.diagonal().mean() - g2)
    norms = sub.diagonal().sqrt()
    live = norms > 0
    cos = (sub / (norms[:, None] * norms[None, :]).clamp_min(1e-300))[cross & live[:, None] & live[None, :]]
    return {"G2": g2.item(), "trS": trace.item(), "B_noise": (trace / g2).item() if g2 > 0 else float("inf"),
            "cos_pairs": cos.mean().item() if len(cos) else float("nan")}
