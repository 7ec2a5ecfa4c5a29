"""Inversion-DPO (Li et al., ACM MM 2025, arXiv 2507.11554), re-derived to agree with Diffusion-DPO.

Setting. Each image x0 is inverted once, deterministically, by the frozen REFERENCE model (`inversion_trajectory`):
points x_i at timesteps t_i (i = 1..N) with the reference eps ε_ref,i = ε_ref(x_i, t_i). The policy is then
evaluated with gradients at the same points, in place of Diffusion-DPO's random (t, ε).

Target. Diffusion-DPO scores an image by its denoising error against the noise that produced x_t from x0. Here
x_i was produced by inversion, so the matching target is the noise that explains x_i given x0 under the forward
marginal q(x_t | x0):  ε*_i = (x_i − √ā_i·x0) / √(1 − ā_i)  (InPO's re-parametrisation, `losses.inpo_target`).
Then err(ε_θ(x_i), ε*_i) = ā_i/(1 − ā_i) · ‖x̂0_θ(x_i) − x0‖²: how well the model recovers THIS image from x_i.

Objective. With w_i = 1/(2ā_{t_i}) (the paper's weights) normalised to mean 1 (w̃), the per-image distance is the
weighted mean  D_θ(x0) = (1/N) Σ_i w̃_i · err(ε_θ(x_i), ε*_i),  D_ref likewise with the stored ε_ref,i (no extra
forward), and
    reward(x0) = −β/2 · (D_θ − D_ref),    loss = −log σ(reward(x_w) − reward(x_l))   (`diffusion_dpo_loss`).
Averaging (rather than summing) over the N steps with mean-1 weights keeps β on the Diffusion-DPO scale: with
N = 1, or equal per-step errors, D is exactly Diffusion-DPO's err, so β = 5000 (SDXL convention) means the same.

Sign. Like Diffusion-DPO, the winner's reward rises when the policy reconstructs it BETTER than the reference
(lower error), the loser's when worse. The public script instead uses target ε_ref,i and a sign that rewards the
policy for moving AWAY from the reference on winners.

First step. ∂loss/∂ε_θ(x_i) ∝ w̃_i·(ε_θ(x_i) − ε*_i). At θ = θ_ref (a LoRA with B = 0) this is w̃_i·(ε_ref,i − ε*_i),
non-zero because DDIM inversion is inexact (ε*_i = ε_ref,i only if eps were constant along the path). With the
public target ε_ref,i the distance is quadratic in (ε_θ − ε_ref), so the gradient is exactly zero there and
training from a LoRA init never starts.

Points. With `points` [K, B] (indices into the N stored points, the same for a pair's winner and loser), D is
estimated from K points at K/N of the policy's cost (the sigmoid then sees a noisy D, as Diffusion-DPO sees one
random t per pair). Drawn uniformly: (1/K) Σ_j w̃_{i_j}·err_{i_j}. Drawn with replacement with probability
p_i = w̃_i / N (`drawn_by_weight`; lower variance, the weights being skewed: at N = 40 on SD's schedule the 5
noisiest points hold 66 % of them): (1/K) Σ_j err_{i_j}. Both are unbiased estimates of D. None: all N, exactly.

Memory ("chunked backward"). Each step's policy forward runs inside torch.utils.checkpoint (non-reentrant): the
graph keeps only each step's inputs (views of the stored trajectory) and, during backward, recomputes and
back-propagates one step at a time, so activation memory is that of one forward, not N. Winner and loser of a
pair share the grid and go through one forward per step, concatenated.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .inversion import EpsFn, Trajectory
from .losses import diffusion_dpo_loss, inpo_target, per_sample_mse


def inversion_weights(alphas_cumprod: Tensor, ts: Tensor) -> Tensor:
    """w̃_i = w_i / mean(w), w_i = 1 / (2·ā_{t_i}); fp32, shape [N]."""
    ac = alphas_cumprod.to(device=ts.device, dtype=torch.float32)
    w = 1.0 / (2.0 * ac[ts.long()])
    return w / w.mean()


def weighted_points(weights: Tensor, u: Tensor) -> Tensor:
    """Indices [K, B] drawn with probability weights_i / sum(weights) by inverting the CDF at uniforms u [B, K]
    in [0, 1) (each pair's K draws, with replacement)."""
    cdf = weights.to(u.device, torch.float64).cumsum(0)
    idx = torch.searchsorted(cdf, (u.to(torch.float64) * cdf[-1]).T.contiguous(), right=True)
    return idx.clamp(max=len(cdf) - 1)


def _step_target(x_w: Tensor, x_l: Tensor, x0: Tensor, abar: Tensor) -> tuple[Tensor, Tensor]:
    x = torch.cat([x_w, x_l])
    return x, inpo_target(x, x0, abar)


def _policy_err(policy_eps_fn: EpsFn, x_w: Tensor, x_l: Tensor, x0: Tensor, t: Tensor, abar: Tensor) -> Tensor:
    x, target = _step_target(x_w, x_l, x0, abar)
    return per_sample_mse(policy_eps_fn(x, t), target)


def inversion_dpo_loss(policy_eps_fn: EpsFn, traj_w: Trajectory, traj_l: Trajectory, x0_w: Tensor, x0_l: Tensor,
                       alphas_cumprod: Tensor, beta: float = 5000.0, checkpoint_steps: bool = True,
                       points: Tensor | None = None, drawn_by_weight: bool = False
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """Inversion-DPO loss over pairs (x0_w[b], x0_l[b]) with their reference trajectories (module docstring).

    `policy_eps_fn(x, t)` runs the policy with gradients (t LongTensor [2B]). Both trajectories must share the
    timesteps. `points` [K, B]: the stored points each pair is scored at, drawn uniformly or, with
    `drawn_by_weight`, with probability w̃_i / N (module docstring; None: all N).
    Returns (loss, metrics) as `diffusion_dpo_loss` (implicit_acc, reward_w, reward_l, margin, model_err,
    ref_err), the errors being the weighted per-image distances D_θ and D_ref (estimates when `points` is given).
    """
    if not torch.equal(traj_w.ts.cpu(), traj_l.ts.cpu()):
        raise ValueError("winner and loser trajectories must share their timesteps")
    if traj_w.xs.shape != traj_l.xs.shape or traj_w.xs.shape[1:] != x0_w.shape or x0_w.shape != x0_l.shape:
        raise ValueError(f"shape mismatch: xs {tuple(traj_w.xs.shape)} / {tuple(traj_l.xs.shape)}, "
                         f"x0 {tuple(x0_w.shape)} / {tuple(x0_l.shape)}")
    n, b, dev = traj_w.ts.numel(), x0_w.shape[0], x0_w.device
    if points is None:
        points = torch.arange(n, device=dev).unsqueeze(1).expand(n, b)
    points = points.to(device=dev, dtype=torch.long)
    if points.dim() != 2 or points.shape[1] != b or points.numel() == 0 or points.min() < 0 or points.max() >= n:
        raise ValueError(f"points must be [K >= 1, {b}] indices into the {n} trajectory points, "
                         f"got shape {tuple(points.shape)}")
    ts, ac, cols = traj_w.ts.to(dev), alphas_cumprod.to(dev), torch.arange(b, device=dev)
    wt = inversion_weights(ac, ts)
    x0 = torch.cat([x0_w, x0_l])
    d_model = torch.zeros(2 * b, device=dev)
    d_ref = torch.zeros(2 * b, device=dev)
    for i in points:  # i [B]: one stored point per pair
        t = ts[i].repeat(2)
        w = (torch.ones_like(wt[i]) if drawn_by_weight else wt[i]).repeat(2) / len(points)
        abar = ac[t]
        x_w, x_l = traj_w.xs[i, cols], traj_l.xs[i, cols]
        with torch.no_grad():
            _, target = _step_target(x_w, x_l, x0, abar)
            d_ref = d_ref + w * per_sample_mse(torch.cat([traj_w.eps_ref[i, cols], traj_l.eps_ref[i, cols]]), target)
        args = (policy_eps_fn, x_w, x_l, x0, t, abar)
        err = checkpoint(_policy_err, *args, use_reentrant=False) if checkpoint_steps else _policy_err(*args)
        d_model = d_model + w * err
    return diffusion_dpo_loss(d_model[:b], d_model[b:], d_ref[:b], d_ref[b:], beta=beta)
