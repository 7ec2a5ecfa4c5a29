"""Preference losses for multimodal LLMs: pure functions, tensors in, tensors out.

Conventions shared by every function here:

* ``*_logps`` are sequence log-probabilities, i.e. per-token log-probs summed over the completion
  tokens only, shape ``(B,)``; row ``i`` of every argument belongs to preference pair ``i``.
* ``z = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))`` is the DPO logit; the loss
  falls as ``z`` grows, i.e. as the policy moves probability towards the chosen answer ``y_w``.
* Implicit rewards are ``β·(log π − log π_ref)``, detached, per sample (TRL's ``rewards/*`` metrics
  are their batch means).
* Losses are returned per sample (unreduced) unless the docstring says otherwise; the trainer owns the
  batch reduction (TRL uses the plain mean).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def _check_logps(**named: torch.Tensor) -> torch.Size:
    """All tensors 1-D with one common shape (B,); returns it."""
    shape = None
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must have shape (B,), got {tuple(t.shape)}")
        if shape is None:
            shape = t.shape
        elif t.shape != shape:
            shapes = {k: tuple(v.shape) for k, v in named.items()}
            raise ValueError(f"shape mismatch, all must be (B,): {shapes}")
    return shape


def _as_beta(beta, like: torch.Tensor) -> torch.Tensor | float:
    """β as a positive float or a (B,)/0-d tensor on ``like``'s device and dtype (never trained)."""
    if isinstance(beta, torch.Tensor):
        if beta.dim() > 1 or (beta.dim() == 1 and beta.shape != like.shape):
            raise ValueError(f"beta tensor must be 0-d or shape {tuple(like.shape)}, got {tuple(beta.shape)}")
        beta = beta.detach().to(device=like.device, dtype=like.dtype)
        if not bool(torch.all(beta > 0)):
            raise ValueError("beta must be > 0 for every sample")
        return beta
    beta = float(beta)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return beta


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float | torch.Tensor = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""DPO-family pairwise loss (Rafailov et al. 2023 and variants), per sample.

    With ``z`` as in the module docstring and ``ε = label_smoothing``:

    * ``sigmoid`` (DPO; conservative DPO / cDPO when ε > 0, Mitchell 2023):
      ``L = −(1−ε)·log σ(βz) − ε·log σ(−βz)``, ε ∈ [0, 0.5].
      **TRL 1.16 differs for ε > 0**: its ``sigmoid`` ignores ``label_smoothing`` and always computes
      ``−log σ(βz)``. The two agree exactly at ε = 0 (the default).
    * ``robust`` (rDPO, Chowdhury et al. 2024; ε = label flip rate, ε ∈ [0, 0.5)):
      ``L = [−(1−ε)·log σ(βz) + ε·log σ(−βz)] / (1−2ε)``; identical to TRL's ``robust``.
    * ``hinge`` (SLiC, Zhao et al. 2023): ``L = relu(1 − βz)``; identical to TRL.
    * ``ipo`` (Azar et al. 2023, eq. 17; β plays the role of τ):
      ``L = (z_avg − 1/(2β))²`` where ``z_avg`` uses length-averaged log-ratios,
      ``(log π(y_w) − log π_ref(y_w))/|y_w| − (log π(y_l) − log π_ref(y_l))/|y_l|``;
      ``chosen_lengths`` / ``rejected_lengths`` (completion token counts, (B,), > 0) are required.
      Same as TRL, which divides by ``completion_mask.sum().clamp(min=1)``; here a zero length is an error.

    ``hinge`` and ``ipo`` take no label smoothing (ε must be 0), unlike TRL, which silently ignores it.

    Args:
        *_logps: (B,) sequence log-prob sums; the policy ones carry the gradient.
        beta: float or (B,) / 0-d tensor of per-sample β (MM-DPO, see :func:`mmdpo_beta`); > 0, detached.
        loss_type: one of ``DPO_LOSS_TYPES``.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each (B,). ``losses`` is unreduced; rewards are
        ``β·(log π − log π_ref)`` per sample, detached and unnormalised by length (also for ipo).
    """
    _check_logps(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; known: {list(DPO_LOSS_TYPES)}")
    eps = float(label_smoothing)
    if loss_type == "sigmoid" and not 0.0 <= eps <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5] for sigmoid, got {eps}")
    if loss_type == "robust" and not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for robust, got {eps}")
    if loss_type in ("hinge", "ipo") and eps != 0.0:
        raise ValueError(f"loss_type {loss_type!r} has no label smoothing; got label_smoothing={eps}")
    beta = _as_beta(beta, policy_chosen_logps)

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    z = chosen_logratios - rejected_logratios

    if loss_type == "sigmoid":
        losses = -(1.0 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z)
    elif loss_type == "robust":
        losses = (-(1.0 - eps) * F.logsigmoid(beta * z) + eps * F.logsigmoid(-beta * z)) / (1.0 - 2.0 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * z)
    else:  # ipo
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type 'ipo' needs chosen_lengths and rejected_lengths (completion token counts)")
        _check_logps(policy_chosen_logps=policy_chosen_logps, chosen_lengths=chosen_lengths,
                     rejected_lengths=rejected_lengths)
        if not (bool(torch.all(chosen_lengths > 0)) and bool(torch.all(rejected_lengths > 0))):
            raise ValueError("chosen_lengths and rejected_lengths must be > 0")
        like = chosen_logratios
        z_avg = (chosen_logratios / chosen_lengths.to(like.device, like.dtype)
                 - rejected_logratios / rejected_lengths.to(like.device, like.dtype))
        losses = (z_avg - 1.0 / (2.0 * beta)) ** 2

    chosen_rewards = (beta * chosen_logratios).detach()
    rejected_rewards = (beta * rejected_logratios).detach()
    return losses, chosen_rewards, rejected_rewards


def mmdpo_beta(
    beta: float,
    margins: torch.Tensor,
    w: float = 0.1,
    k: float = 0.5,
) -> torch.Tensor:
    r"""MM-DPO dynamic reward scaling (MM-RLHF, Zhang et al. 2025, arXiv 2502.10391).

    ``β_i = β · (1 + w · (1 − exp(−k·δ_i)))``, with ``δ_i ≥ 0`` the reward margin of pair ``i``
    (r(y_w) − r(y_l) from a reward model or annotation scores). β_i grows monotonically from β (δ = 0)
    towards ``β·(1+w)`` (δ → ∞), so confident pairs get a sharper loss; ``k`` sets how fast.

    Defaults: ``w = 0.1`` is the value in the public code's training script (``ls_factor_weight``);
    ``k = 0.5`` is our default, not verified against the paper's text — set both explicitly for a
    reproduction. This is the per-sample form; the public fork also has a batch-level β variant, which
    is not implemented here.

    Negative or non-finite margins raise ``ValueError`` (a negative margin means the reward model
    disagrees with the pair's label: fix/flip the pair or clamp the margins before calling).

    Args:
        beta: base β (> 0). margins: (B,) reward margins. w: ≥ 0. k: > 0.

    Returns:
        (B,) detached tensor of per-sample β, dtype/device of ``margins`` (floating).
    """
    if not float(beta) > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not w >= 0:
        raise ValueError(f"w must be >= 0, got {w}")
    if not k > 0:
        raise ValueError(f"k must be > 0, got {k}")
    margins = torch.as_tensor(margins).detach()
    if not margins.is_floating_point():
        margins = margins.float()
    if margins.dim() != 1:
        raise ValueError(f"margins must have shape (B,), got {tuple(margins.shape)}")
    if not bool(torch.all(torch.isfinite(margins))):
        raise ValueError("margins must be finite")
    if bool(torch.any(margins < 0)):
        raise ValueError(f"margins must be >= 0 (got min {margins.min().item():.4g}); "
                         "flip or drop disagreeing pairs, or clamp(min=0) explicitly")
    # 1 − e^{−kδ} via -expm1 for accuracy at small δ
    return float(beta) * (1.0 + w * -torch.expm1(-k * margins))


def mdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    policy_chosen_cropped_logps: torch.Tensor,
    ref_chosen_cropped_logps: torch.Tensor,
    beta: float = 0.1,
    anchor: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""mDPO loss (Wang et al. 2024, arXiv 2406.11839), per sample.

    ``L = −log σ(β·z) − log σ(β·z_img) − log σ(β·c_w − δ)`` with

    * ``z``: the standard DPO logit (module docstring), same image for both answers;
    * ``z_img = (log π(y_w|m) − log π_ref(y_w|m)) − (log π(y_w|m') − log π_ref(y_w|m'))``: conditional
      preference — the chosen answer under the real image ``m`` is preferred to the same answer under a
      heavily cropped image ``m'`` (the ``*_cropped_logps`` arguments);
    * ``c_w = log π(y_w|m) − log π_ref(y_w|m)``: anchored preference, keeps the chosen reward above
      ``δ = anchor`` (paper: δ = 0) so the chosen likelihood is not pushed down.

    All logps are (B,) sequence sums; β is a positive float.

    Returns:
        ``(losses, metrics)``: losses (B,) unreduced; metrics are detached 0-d batch means:
        ``loss/dpo``, ``loss/image``, ``loss/anchor`` (the three terms), ``rewards/chosen``,
        ``rewards/rejected``, ``rewards/chosen_cropped`` (β·log-ratios), ``rewards/accuracies``,
        ``rewards/margins``.
    """
    _check_logps(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        policy_chosen_cropped_logps=policy_chosen_cropped_logps,
        ref_chosen_cropped_logps=ref_chosen_cropped_logps,
    )
    if isinstance(beta, torch.Tensor):
        raise TypeError("mdpo_loss takes a float beta")
    beta = _as_beta(beta, policy_chosen_logps)
    c_w = policy_chosen_logps - ref_chosen_logps
    c_l = policy_rejected_logps - ref_rejected_logps
    c_crop = policy_chosen_cropped_logps - ref_chosen_cropped_logps

    term_dpo = -F.logsigmoid(beta * (c_w - c_l))
    term_img = -F.logsigmoid(beta * (c_w - c_crop))
    term_anchor = -F.logsigmoid(beta * c_w - float(anchor))
    losses = term_dpo + term_img + term_anchor

    with torch.no_grad():
        r_w, r_l, r_crop = beta * c_w, beta * c_l, beta * c_crop
        metrics = {
            "loss/dpo": term_dpo.mean(),
            "loss/image": term_img.mean(),
            "loss/anchor": term_anchor.mean(),
            "rewards/chosen": r_w.mean(),
            "rewards/rejected": r_l.mean(),
            "rewards/chosen_cropped": r_crop.mean(),
            "rewards/accuracies": (r_w > r_l).to(r_w.dtype).mean(),
            "rewards/margins": (r_w - r_l).mean(),
        }
    return losses, metrics


def sft_nll(chosen_token_logps: torch.Tensor, chosen_mask: torch.Tensor) -> torch.Tensor:
    r"""SFT / RPO term: mean negative log-likelihood over all chosen completion tokens of the batch.

    ``L = −Σ_{i,t} m_{i,t}·log π(y_w,t) / Σ_{i,t} m_{i,t}`` — a token mean over the whole batch (not a
    mean of per-sequence means), as TRL's ``sft`` loss type. RPO (Pang et al. 2024) adds ``α·L`` to
    the DPO loss (TRL: ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, α]``).

    Args:
        chosen_token_logps: (B, T) per-token log-probs of the chosen completions (aligned with the mask).
        chosen_mask: (B, T) bool or 0/1, True on completion tokens.

    Returns:
        0-d tensor. Raises ``ValueError`` when the mask selects no token (TRL would return NaN).
    """
    if chosen_token_logps.dim() != 2 or chosen_token_logps.shape != chosen_mask.shape:
        raise ValueError(f"need matching (B, T) tensors, got {tuple(chosen_token_logps.shape)} "
                         f"and {tuple(chosen_mask.shape)}")
    mask = chosen_mask.to(device=chosen_token_logps.device).bool()
    if not bool(mask.any()):
        raise ValueError("chosen_mask selects no tokens")
    return -chosen_token_logps[mask].mean()


__all__ = ["DPO_LOSS_TYPES", "dpo_loss", "mdpo_loss", "mmdpo_beta", "sft_nll"]
