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
    (epsilon prediction) or v (v-prediction). Rectified flow (SD3/FLUX, flow.py): err = ||v_theta(x_sigma, sigma, c)
    - (eps - x0)||^2 (mean), x_sigma = (1 - sigma) x0 + sigma eps: the flow-matching loss with uniform weighting.
    Returns (loss, metrics) with metrics model_err.
    """
    loss = model_err.mean()
    return loss, {"model_err": loss.detach()}


def _half_tie_accuracy(x: torch.Tensor) -> torch.Tensor:
    return ((x > 0).float() + 0.5 * (x == 0).float()).mean()


def diffusion_dpo_loss(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor,
                       ref_err_l: torch.Tensor, beta: float = 5000.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908), SDXL/Salesforce beta convention:

        inside = -(beta / 2) * [(err_theta(w) - err_ref(w)) - (err_theta(l) - err_ref(l))]
        loss   = mean_pairs( -log sigmoid(inside) )

    All inputs are per-sample denoising errors of shape [B] (`per_sample_mse` at ONE shared t and noise per
    pair). diffusers' SD1.5 example drops the 1/2 and uses beta=2500: the same objective.
    Rectified flow (SD3/FLUX): the same equation on velocity errors err(x) = ||v(x_sigma, sigma, c) - (eps - x0)||^2
    (mean over C, H, W), x_sigma = (1 - sigma) x0 + sigma eps with one sigma and eps per pair; beta keeps this
    convention (the 1/2 inside) but has its own scale, velocity errors not being noise errors (a FLUX LoRA run at
    beta 500 spiked; 2000 was the advice, Flow-GRPO issue #47; configs/sd3_diffusion_dpo.yaml uses 2000).
    `objective.flow_error: epsilon` passes instead the error of the noise the velocity implies,
    eps_hat = x_sigma + (1 - sigma) v_hat, i.e. (1 - sigma)^2 times the velocity error: SD's weighting over noise
    levels (a beta that falls as (1 - sigma)^2 towards pure noise).
    Metrics: implicit_acc = mean(inside > 0) with ties counted 1/2; reward_w = -beta/2 * (err_theta(w) -
    err_ref(w)), reward_l likewise; margin = reward_w - reward_l (= inside); model_err, ref_err (means).
    """
    shapes = {t.shape for t in (model_err_w, model_err_l, ref_err_w, ref_err_l)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"diffusion_dpo_loss wants four [B] tensors, got shapes {sorted(map(tuple, shapes))}")
    reward_w = -0.5 * beta * (model_err_w - ref_err_w)
    reward_l = -0.5 * beta * (model_err_l - ref_err_l)
    inside = reward_w - reward_l
    loss = -torch.nn.functional.logsigmoid(inside).mean()
    with torch.no_grad():
        metrics = {"implicit_acc": _half_tie_accuracy(inside), "reward_w": reward_w.mean(),
                   "reward_l": reward_l.mean(), "margin": inside.mean(),
                   "model_err": torch.cat([model_err_w, model_err_l]).mean(),
                   "ref_err": torch.cat([ref_err_w, ref_err_l]).mean()}
    return loss, metrics


def cca_loss_from_deltas(delta_pos: torch.Tensor, delta_neg: torch.Tensor, beta: float,
                         lam: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Condition Contrastive Alignment (Chen et al., ICLR 2025, arXiv 2410.09347):

        loss = mean( -log sigmoid(beta * delta(x, c)) - lam * log sigmoid(-beta * delta(x, c_neg)) )

    where delta is the policy-vs-reference log-likelihood ratio of x under its own condition c (positive)
    and under a mismatched condition c_neg (negative; roll the batch's conditions by one). lam plays the role
    of the guidance scale; sampling afterwards is guidance-free.
    """
    if delta_pos.shape != delta_neg.shape or delta_pos.dim() != 1:
        raise ValueError(f"want two [B] tensors, got {tuple(delta_pos.shape)} and {tuple(delta_neg.shape)}")
    logsig = torch.nn.functional.logsigmoid
    pos, neg = -logsig(beta * delta_pos), -lam * logsig(-beta * delta_neg)
    loss = (pos + neg).mean()
    with torch.no_grad():
        metrics = {"loss_pos": pos.mean(), "loss_neg": neg.mean(), "delta_pos": delta_pos.mean(),
                   "delta_neg": delta_neg.mean(), "cond_acc": _half_tie_accuracy(delta_pos - delta_neg)}
    return loss, metrics


def cca_loss(model_err_pos: torch.Tensor, ref_err_pos: torch.Tensor, model_err_neg: torch.Tensor,
             ref_err_neg: torch.Tensor, beta: float, lam: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CCA, diffusion form: delta(x, c) = -(err_theta(x_t, c) - err_ref(x_t, c)), all four errors at ONE shared
    (t, noise) per image, [B] each; then `cca_loss_from_deltas`. (The paper is autoregressive-only; the
    denoising error stands in for -log-likelihood up to scale, as in Diffusion-DPO.) Rectified flow (SD3/FLUX): the
    errors are velocity errors ||v(x_sigma, sigma, c) - (eps - x0)||^2 at one shared (sigma, eps); beta multiplies
    delta directly (no 1/2), on the scale of those errors."""
    return cca_loss_from_deltas(-(model_err_pos - ref_err_pos), -(model_err_neg - ref_err_neg), beta, lam)


def cca_loss_ar(policy_logp_pos: torch.Tensor, ref_logp_pos: torch.Tensor, policy_logp_neg: torch.Tensor,
                ref_logp_neg: torch.Tensor, beta: float = 0.02,
                lam: float = 50.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CCA, autoregressive form (token models): delta(x, c) = log p_theta(x|c) - log p_ref(x|c), sequence
    log-probs summed over tokens, [B] each; defaults are the paper's beta=0.02 and a lam in its 50-1000 range."""
    return cca_loss_from_deltas(policy_logp_pos - ref_logp_pos, policy_logp_neg - ref_logp_neg, beta, lam)


def inpo_target(x_t: torch.Tensor, x0: torch.Tensor, alphas_cumprod_t: torch.Tensor) -> torch.Tensor:
    """InPO re-parametrised noise target (Lu et al., CVPR 2025, arXiv 2503.18454):

        eps_hat = (x_t - sqrt(abar_t) * x0) / sqrt(1 - abar_t)

    where x_t comes from DDIM inversion of x0 (not from fresh noise) and abar_t [B] is the cumulative alpha
    of each sample's own timestep. Feeding eps_hat to `per_sample_mse` gives the errors for Diffusion-DPO.
    """
    a = alphas_cumprod_t.to(x_t.dtype).view(-1, *[1] * (x_t.dim() - 1))
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def bco_loss(model_err: torch.Tensor, ref_err: torch.Tensor, desirable: torch.Tensor, beta: float,
             delta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Binary classifier optimisation for unpaired thumbs-up/down data (BCO, Jung et al. 2024), diffusion form:

        g    = beta * (err_ref(x) - err_theta(x))          implicit reward of each sample, [B]
        loss = mean( -y * log sigmoid(g - delta) - (1 - y) * log sigmoid(-(g - delta)) )

    with y = 1 for desirable samples and delta a running mean of past rewards, kept by the caller (update it
    with metrics["reward_mean"]). beta multiplies the error gap directly (no 1/2). Rectified flow (SD3/FLUX): the
    same with velocity errors ||v(x_sigma, sigma, c) - (eps - x0)||^2, x_sigma = (1 - sigma) x0 + sigma eps.
    """
    if not (model_err.shape == ref_err.shape == desirable.shape) or model_err.dim() != 1:
        raise ValueError("bco_loss wants three [B] tensors")
    y = desirable.to(model_err.dtype)
    g = beta * (ref_err - model_err)
    logsig = torch.nn.functional.logsigmoid
    loss = -(y * logsig(g - delta) + (1 - y) * logsig(-(g - delta))).mean()
    with torch.no_grad():
        up, down = g[y > 0.5], g[y < 0.5]
        metrics = {"reward_mean": g.mean(),
                   "reward_desirable": up.mean() if len(up) else g.new_tensor(0.0),
                   "reward_undesirable": down.mean() if len(down) else g.new_tensor(0.0)}
    return loss, metrics
