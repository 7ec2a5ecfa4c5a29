"""Diffusion losses: pure functions of tensors, no model calls."""
from __future__ import annotations

import torch


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """err(x) = mean over all non-batch dims of (pred - target)^2, in fp32; shape [B]."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def sft_loss(model_err: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain denoising loss (DDPM, Ho et al. 2020, the "simple" objective): L = mean_i err_theta(x_i).

    `model_err` [B] is `per_sample_mse(eps_theta(x_t, t, c), target)` where target is the noise eps
    (epsilon prediction) or v (v-prediction). Returns (loss, metrics) with metrics model_err.
    """
    loss = model_err.mean()
    return loss, {"model_err": loss.detach()}
