"""GRPO for diffusion (DDPO, Black et al. 2023; Flow-GRPO, Liu et al. 2025, arXiv 2505.05470): pure functions,
tensors in, (value, metrics) out.

Notation: a prompt's group of G samples with rewards R_1..R_G; a trajectory's trained denoising steps k, each a
Gaussian p_θ(x_{k+1} | x_k, c) = N(μ_θ, σ_k² I) with a fixed σ_k (the sampler's); log-probs are per-dimension
means (rollout.gaussian_log_prob), as in DDPO's and Flow-GRPO's code, so ratios and KLs do not scale with the
image size.
"""
from __future__ import annotations

import torch

ADV_EPS = 1e-4  # added to a group's std (Flow-GRPO's value): a near-constant group gets large but finite advantages


def group_advantages(rewards: torch.Tensor, eps: float = ADV_EPS) -> tuple[torch.Tensor, dict]:
    """A_i = (R_i − mean_g R) / (std_g R + eps) per group g.

    rewards: [P, G], one row per prompt (its group of G samples). std is the population std (ddof 0, as
    numpy's np.std in Flow-GRPO). A group whose rewards are all equal carries no signal: its advantages are
    exactly 0 (never a division by zero) and it is counted. Returns (advantages [P, G] in the rewards' dtype,
    {"zero_adv_groups": count, "zero_adv_share": count / P})."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, group] with group >= 2, got {tuple(rewards.shape)}")
    r = rewards.double()
    flat = (r.amax(1) == r.amin(1))
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)
    adv = torch.where(flat[:, None], torch.zeros_like(adv), adv).to(rewards.dtype)
    n = int(flat.sum())
    return adv, {"zero_adv_groups": n, "zero_adv_share": n / len(r)}


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, adv: torch.Tensor,
                        clip_range: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate, per trained step: with r = exp(log π_θ − log π_old),

        loss = mean_{i,k} max(−A_i·r_ik, −A_i·clip(r_ik, 1 − ε, 1 + ε))      (= −min(r·A, clip(r)·A))

    log_prob, old_log_prob: [N, K] (K trained steps); adv: [N] (broadcast over steps); ε = clip_range.
    Metrics: clip_frac = share of (i, k) with |r − 1| > ε; ratio_mean; approx_kl = ½·mean((log r)²) (DDPO's
    diagnostic of how far the policy moved since the rollout)."""
    if log_prob.shape != old_log_prob.shape or log_prob.dim() != 2 or adv.shape != log_prob.shape[:1]:
        raise ValueError(f"shapes: log_prob {tuple(log_prob.shape)}, old {tuple(old_log_prob.shape)}, adv "
                         f"{tuple(adv.shape)} (need [N, K], [N, K], [N])")
    log_ratio = log_prob - old_log_prob
    ratio = log_ratio.exp()
    a = adv[:, None].to(ratio)
    loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    with torch.no_grad():
        metrics = {"clip_frac": ((ratio - 1).abs() > clip_range).float().mean(),
                   "ratio_mean": ratio.mean(), "approx_kl": 0.5 * (log_ratio ** 2).mean()}
    return loss, metrics


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(μ_θ, σ²I) ‖ N(μ_ref, σ²I)) per dimension = mean over dims of (μ_θ − μ_ref)² / (2σ²).

    mean, ref_mean: [M, *dims]; std: [M] or broadcastable to [M, 1, ...]. Returns [M] (the per-dimension mean,
    Flow-GRPO's scale: `((μ − μ_ref)**2).mean(dims) / (2σ²)`)."""
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    sq = ((mean - ref_mean) ** 2).flatten(1).mean(1)
    return sq / (2 * std.reshape(-1) ** 2)


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, adv: torch.Tensor, clip_range: float,
              kl: torch.Tensor | None = None, kl_beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """loss = clipped_policy_loss + kl_beta · mean(kl); kl: per (sample, step) values from `gaussian_kl` (or
    None when kl_beta is 0). Metrics: the policy loss, the KL, and the clipped loss's diagnostics."""
    policy, metrics = clipped_policy_loss(log_prob, old_log_prob, adv, clip_range)
    if kl_beta and kl is None:
        raise ValueError("kl_beta > 0 needs the per-step KL to the reference")
    kl_mean = kl.mean() if kl is not None else torch.zeros((), device=policy.device)
    total = policy + kl_beta * kl_mean if kl_beta else policy
    return total, {**metrics, "policy_loss": policy.detach(), "kl": kl_mean.detach()}
