"""Per-token log-probabilities of the trained tokens, computing logits only over the span that holds them."""
from __future__ import annotations

import torch

NON_MODEL_KEYS = ("train_mask",)


def model_inputs(batch: dict, model: torch.nn.Module) -> dict:
    """The batch's model kwargs with floating side inputs (pixel values) in the model's dtype."""
    dtype = next(p for p in model.parameters()).dtype
    return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
            for k, v in batch.items() if k not in NON_MODEL_KEYS}


def token_logps(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each trained token, its 0/1 mask), both (B, K), K = the trained span's width.

    Label j is predicted from position j-1; only positions first-1 .. last-1 of the trained span are sent
    through the LM head (`logits_to_keep` as indices), so prompt and image positions cost no logits."""
    mask = batch["train_mask"]
    cols = mask.any(0).nonzero().flatten()
    if cols.numel() == 0:
        raise ValueError("the batch has no trained tokens")
    first, last = max(int(cols[0]), 1), int(cols[-1])
    keep = torch.arange(first - 1, last, device=mask.device)
    out = model(**model_inputs(batch, model), logits_to_keep=keep, use_cache=False)
    logits = out.logits.float()
    labels = batch["input_ids"][:, first:last + 1]
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
    m = mask[:, first:last + 1].to(picked.dtype)
    return picked * m, m


def sequence_logps(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of trained-token log-probs per row, number of trained tokens per row)."""
    lp, m = token_logps(model, batch)
    return lp.sum(-1), m.sum(-1)
