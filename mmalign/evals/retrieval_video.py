"""Text-to-video retrieval ranking, optionally on Sinkhorn-normalised similarities (as UCoFiA does).

A few "hub" videos that are similar to every text steal the top rank from the right video. Sinkhorn
normalisation rescales the similarity matrix into a transport plan whose every row (text) and column (video)
has a fixed total, so a video cannot be everybody's best match:

    log P⁰ = S / τ;   repeat: log P ← log P − logsumexp_rows(log P)          (rows sum to 1)
                               log P ← log P − logsumexp_cols(log P) + log(T/V) (columns sum to T/V)

until the row sums are within `tol` of 1 (or `max_iters`). For a square matrix rows and columns both sum to 1.
Each text's videos are then ranked by P (or by S without Sinkhorn).
"""
from __future__ import annotations

import numpy as np


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    return m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))


def sinkhorn(sim, temperature: float = 0.1, max_iters: int = 1000, tol: float = 1e-6) -> np.ndarray:
    """The (T, V) plan P ∝ exp(S/τ) with rows summing to 1 and columns to T/V, by log-domain iterations."""
    s = np.asarray(sim, dtype=np.float64)
    if s.ndim != 2 or 0 in s.shape or not np.isfinite(s).all():
        raise ValueError(f"need a finite, non-empty (texts, videos) similarity matrix, got shape {s.shape}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p = s / temperature
    col_total = np.log(s.shape[0] / s.shape[1])
    for _ in range(max_iters):
        log_p = log_p - _logsumexp(log_p, 1)
        log_p = log_p - _logsumexp(log_p, 0) + col_total
        if np.abs(np.exp(_logsumexp(log_p, 1)) - 1).max() < tol:
            break
    return np.exp(log_p)


def ranks(scores, targets=None) -> np.ndarray:
    """1-based rank of each text's target video (row i's target is column `targets[i]`, default i) among that
    row's scores. Ties count against the target: rank = number of videos scoring >= the target, so a
    constant matrix ranks every target last, never first."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.arange(len(s)) if targets is None else np.asarray(targets)
    if s.ndim != 2 or t.shape != (len(s),) or (t < 0).any() or (t >= s.shape[1]).any():
        raise ValueError(f"need (T, V) scores and T target columns in [0, V), got {s.shape} and {t.shape}")
    return (s >= s[np.arange(len(s)), t][:, None]).sum(axis=1)


def retrieval_metrics(sim, targets=None, use_sinkhorn: bool = True, temperature: float = 0.1,
                      ks: tuple[int, ...] = (1, 5)) -> dict:
    """recall@k (fraction of texts whose target ranks <= k), mean and median rank, and the per-text ranks."""
    scores = sinkhorn(sim, temperature) if use_sinkhorn else np.asarray(sim, dtype=np.float64)
    r = ranks(scores, targets)
    out = {f"recall_at_{k}": float((r <= k).mean()) for k in ks}
    out.update(mean_rank=float(r.mean()), median_rank=float(np.median(r)), ranks=r.tolist())
    return out
