"""DDIM inversion utilities (pure torch; the noise predictor is a callable).

`EpsFn(x_t, t) -> eps`: t is a LongTensor [B] (each sample its own timestep); the caller wraps the UNet and its
conditioning and converts v-prediction to epsilon (`eps_from_prediction`). `ddim_invert`/`ddim_sample` evaluate
subsets of the batch; with `rows_aware=True` they call `eps_fn(x_t, t, rows)` (rows: the subset's indices in
the batch) so per-sample conditioning can follow. Noise levels are the cumulative
alphas abar_t; clean data x0 is the level abar = 1, written t = -1 (the model is queried there with t = 0).

Inverse walk of one sample to its own t_end: x0 -> every grid point strictly below t_end (ascending) -> t_end.
Step k (k = 0..len(grid)) goes from level grid[k-1] (x0 for k = 0) to min(grid[k], t_end) (t_end for the last
k) and uses eps at the CURRENT point. Samples with different t_end are batched: step k evaluates eps_fn once,
on the samples that still have to move, each with its own current t; the rest are untouched. (The public InPO
code drives the whole batch with t[0], which is right only at batch size 1.) `ddim_sample` walks the same
steps backwards, so it is the exact DDIM reverse of the deterministic inversion.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

EpsFn = Callable[[Tensor, Tensor], Tensor]


def _bcast(a: Tensor, x: Tensor) -> Tensor:
    return a.view(-1, *[1] * (x.dim() - 1))


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _abar(alphas_cumprod: Tensor, t: Tensor, dtype: torch.dtype) -> Tensor:
    """abar_t for t [B] long, with abar = 1 where t < 0 (clean data)."""
    ac = alphas_cumprod.to(device=t.device, dtype=dtype)
    return torch.where(t >= 0, ac[t.clamp(min=0)], torch.ones((), dtype=dtype, device=t.device))


def eps_from_prediction(prediction_type: str, pred: Tensor, x_t: Tensor, t: Tensor,
                        alphas_cumprod: Tensor) -> Tensor:
    """The network output as epsilon. v-prediction: v = sqrt(abar) eps - sqrt(1-abar) x0 and
    x_t = sqrt(abar) x0 + sqrt(1-abar) eps give eps = sqrt(abar) v + sqrt(1-abar) x_t."""
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        a = _bcast(_abar(alphas_cumprod, t.to(x_t.device), _compute_dtype(x_t)), x_t)
        return (a.sqrt() * pred + (1 - a).sqrt() * x_t).to(x_t.dtype)
    raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")


def inversion_grid(num_train_timesteps: int = 1000, n_steps: int = 10) -> list[int]:
    """Evenly spaced timesteps starting at 1: (1000, 10) -> [1, 101, ..., 901] (InPO's grid)."""
    if not 1 <= n_steps <= num_train_timesteps - 1:
        raise ValueError(f"n_steps must be in [1, {num_train_timesteps - 1}], got {n_steps}")
    step = num_train_timesteps // n_steps
    return [1 + k * step for k in range(n_steps)]


def ddim_step(x: Tensor, eps: Tensor, abar_from: Tensor, abar_to: Tensor) -> Tensor:
    """Deterministic DDIM move between noise levels (either direction; abar = 1 is clean data):
    x0_hat = (x - sqrt(1-a_from) eps) / sqrt(a_from);  x' = sqrt(a_to) x0_hat + sqrt(1-a_to) eps.
    abar_from / abar_to: [B] (or scalars). Computed in at least fp32, returned in x's dtype."""
    dt = _compute_dtype(x)
    af = _bcast(torch.as_tensor(abar_from, device=x.device).to(dt).expand(x.shape[0]), x)
    at = _bcast(torch.as_tensor(abar_to, device=x.device).to(dt).expand(x.shape[0]), x)
    xc, ec = x.to(dt), eps.to(dt)
    x0_hat = (xc - (1 - af).sqrt() * ec) / af.sqrt()
    return (at.sqrt() * x0_hat + (1 - at).sqrt() * ec).to(x.dtype)


def ddim_sigma(abar_from: Tensor, abar_to: Tensor) -> Tensor:
    """DDIM (eta = 1) stochasticity between two levels, s the cleaner (larger abar) and t the noisier:
    sigma^2 = (1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s)  (the DDPM posterior std; 0 from x0)."""
    a_s, a_t = torch.maximum(abar_from, abar_to), torch.minimum(abar_from, abar_to)
    var = (1 - a_s) / (1 - a_t).clamp(min=1e-12) * (1 - a_t / a_s)
    return var.clamp(min=0).sqrt()


def _steps(t_end: Tensor, grid: list[int]):
    """Yield (k, idx of the samples that move at step k, t_from [n], t_to [n]) for the inverse walk."""
    if any(b <= a for a, b in zip(grid, grid[1:])) or not grid or grid[0] < 0:
        raise ValueError(f"grid must be non-negative and strictly ascending, got {grid}")
    if t_end.dim() != 1 or (t_end < 0).any():
        raise ValueError("t_end must be a LongTensor [B] of timesteps >= 0")
    for k in range(len(grid) + 1):
        t_from = grid[k - 1] if k > 0 else -1
        idx = (t_end > t_from).nonzero().flatten()
        if idx.numel() == 0:
            break
        te = t_end[idx]
        t_to = te.clamp(max=grid[k]) if k < len(grid) else te
        yield k, idx, torch.full_like(te, t_from), t_to


@torch.no_grad()
def ddim_invert(eps_fn: EpsFn, x0: Tensor, t_end: Tensor, alphas_cumprod: Tensor, grid: list[int],
                noise_scale: float = 0.0, noise: Tensor | None = None, rows_aware: bool = False) -> Tensor:
    """DDIM inversion of clean x0 [B, ...] to each sample's own t_end [B] (see module docstring), no_grad.
    With noise_scale > 0, after inverse step k add noise_scale * ddim_sigma * noise[:, k]; `noise` is pre-drawn,
    shape [B, len(grid) + 1, *x0.shape[1:]], so a sample's result does not depend on its batch."""
    t_end = t_end.to(device=x0.device, dtype=torch.long)
    if noise_scale > 0:
        want = (x0.shape[0], len(grid) + 1, *x0.shape[1:])
        if noise is None or tuple(noise.shape) != want:
            raise ValueError(f"noise_scale > 0 needs pre-drawn noise of shape {want}")
    dt, x = _compute_dtype(x0), x0.clone()
    for k, idx, t_from, t_to in _steps(t_end, grid):
        xa = x[idx]
        eps = eps_fn(xa, t_from.clamp(min=0), idx) if rows_aware else eps_fn(xa, t_from.clamp(min=0))
        a_f, a_t = _abar(alphas_cumprod, t_from, dt), _abar(alphas_cumprod, t_to, dt)
        xn = ddim_step(xa, eps, a_f, a_t)
        if noise_scale > 0:
            z = noise[idx.to(noise.device), k].to(device=x.device, dtype=dt)
            xn = (xn.to(dt) + noise_scale * _bcast(ddim_sigma(a_f, a_t), xn) * z).to(x.dtype)
        x = x.index_copy(0, idx, xn)
    return x


@torch.no_grad()
def ddim_sample(eps_fn: EpsFn, x_t: Tensor, t_start: Tensor, alphas_cumprod: Tensor, grid: list[int],
                rows_aware: bool = False) -> Tensor:
    """Deterministic DDIM from each sample's t_start back to x0 through the grid points below it: the exact
    reverse of `ddim_invert`'s steps (eps taken at the current, noisier point)."""
    t_start = t_start.to(device=x_t.device, dtype=torch.long)
    dt, x = _compute_dtype(x_t), x_t.clone()
    for _, idx, t_from, t_to in reversed(list(_steps(t_start, grid))):
        xa = x[idx]
        eps = eps_fn(xa, t_to, idx) if rows_aware else eps_fn(xa, t_to)
        x = x.index_copy(0, idx, ddim_step(xa, eps, _abar(alphas_cumprod, t_to, dt),
                                           _abar(alphas_cumprod, t_from, dt)))
    return x


@dataclass
class Trajectory:
    """A deterministic inversion path: xs [N, B, ...] the visited points, ts [N] their timesteps (ascending),
    eps_ref [N, B, ...] the model's eps at (xs[i], ts[i]) - the eps that took the step to xs[i + 1]."""
    xs: Tensor
    ts: Tensor
    eps_ref: Tensor


@torch.no_grad()
def inversion_trajectory(eps_fn: EpsFn, x0: Tensor, alphas_cumprod: Tensor, n_steps: int,
                         num_train_timesteps: int = 1000) -> Trajectory:
    """Deterministic DDIM inversion of x0 over `inversion_grid(num_train_timesteps, n_steps)` (e.g. 40 of 1000),
    under no_grad. Stores each grid point x_i, t_i and eps_fn(x_i, t_i), on x0's device and dtype; n_steps + 1
    forwards in all (one at x0 for the first step, then one per stored point, reused for the next step)."""
    grid = inversion_grid(num_train_timesteps, n_steps)
    b, dt = x0.shape[0], _compute_dtype(x0)
    xs, eps_ref = x0.new_empty((n_steps, *x0.shape)), x0.new_empty((n_steps, *x0.shape))
    ts = torch.tensor(grid, dtype=torch.long, device=x0.device)
    x, t_prev = x0, torch.full((b,), -1, dtype=torch.long, device=x0.device)
    eps = eps_fn(x0, t_prev.clamp(min=0))
    for i in range(n_steps):
        t = ts[i].expand(b)
        x = ddim_step(x, eps, _abar(alphas_cumprod, t_prev, dt), _abar(alphas_cumprod, t, dt))
        eps = eps_fn(x, t)
        xs[i], eps_ref[i], t_prev = x, eps, t
    return Trajectory(xs=xs, ts=ts, eps_ref=eps_ref)
