"""Shared-prompt packing of preference pairs: one row [prompt][chosen][rejected] per pair instead of two rows
[prompt][chosen] and [prompt][rejected].

The prompt (with its image tokens) goes through the model once per pair, and the images through the vision
tower once. The rejected answer restarts its position ids where the prompt ends and a 4-D attention mask
hides the chosen answer from it, so every answer token sees exactly the context it has in the two-row layout:

    allowed(i, j) = j <= i  and  not (i in rejected and j in chosen)  and  j is not padding

Its first token is predicted from the last prompt position, like the chosen answer's first token. Log-probs
equal the two-row layout's up to float rounding (tests check this). Only decoder-only LMs with 1-D rotary
positions under sdpa/eager attention accept a custom 4-D mask and position ids this way, so packing is used
for LLaVA-1.5/LLaVA-NeXT-style models without per-token side inputs; anything else keeps the two-row layout.
"""
from __future__ import annotations

import torch

from .encoding import Encoded, cat_images
from .logps import token_logps

PACKABLE_MODEL_TYPES = ("llava", "llava_next")
PACKABLE_ATTENTION = ("sdpa", "eager")


def packing_unsupported(model_config) -> str | None:
    """Why this model cannot take packed pairs (None if it can)."""
    kind = getattr(model_config, "model_type", None)
    if kind not in PACKABLE_MODEL_TYPES:
        return f"model type {kind!r} is not one of {PACKABLE_MODEL_TYPES}"
    text = getattr(model_config, "text_config", model_config)
    attn = getattr(text, "_attn_implementation", None) or getattr(model_config, "_attn_implementation", None)
    if attn not in PACKABLE_ATTENTION:
        return f"attention implementation {attn!r} does not take a custom 4-D mask (needs sdpa or eager)"
    return None


def _split(enc: Encoded) -> tuple[list[int], list[int], list[int]]:
    p = enc.prompt_len
    return enc.ids[:p], enc.ids[p:], enc.train_mask[p:]


def pair_packable(chosen: Encoded, rejected: Encoded) -> str | None:
    """Why this pair cannot be packed (None if it can): it needs one shared prompt and no per-token inputs."""
    if chosen.token_inputs or rejected.token_inputs:
        return "the processor gives per-token inputs"
    if chosen.prompt_len != rejected.prompt_len or chosen.ids[:chosen.prompt_len] != rejected.ids[:rejected.prompt_len]:
        return "chosen and rejected do not share their prompt"
    if chosen.image_inputs is not rejected.image_inputs:
        same = chosen.image_inputs.keys() == rejected.image_inputs.keys() and all(
            torch.equal(chosen.image_inputs[k], rejected.image_inputs[k]) for k in chosen.image_inputs)
        if not same:
            return "chosen and rejected carry different images"
    return None


def pack_batch(pairs: list[tuple[Encoded, Encoded]], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed, right-padded batch: input_ids, position_ids, "segments" (0 pad, 1 prompt, 2 chosen, 3 rejected),
    "train_mask", the prompt/answer lengths, and each pair's image inputs once."""
    parts = [(_split(c), _split(r)) for c, r in pairs]
    n = max(len(p) + len(c) + len(r) for (p, c, _), (_, r, _) in parts)
    b = len(pairs)
    ids = torch.full((b, n), pad_id, dtype=torch.long)
    pos = torch.zeros((b, n), dtype=torch.long)
    seg = torch.zeros((b, n), dtype=torch.long)
    train = torch.zeros((b, n), dtype=torch.long)
    lens = torch.zeros((b, 3), dtype=torch.long)
    for i, ((p, c, cm), (_, r, rm)) in enumerate(parts):
        lp, lc, lr = len(p), len(c), len(r)
        ids[i, :lp + lc + lr] = torch.tensor(p + c + r)
        pos[i, :lp + lc] = torch.arange(lp + lc)
        pos[i, lp + lc:lp + lc + lr] = torch.arange(lp, lp + lr)
        seg[i, :lp], seg[i, lp:lp + lc], seg[i, lp + lc:lp + lc + lr] = 1, 2, 3
        train[i, lp:lp + lc + lr] = torch.tensor(cm + rm)
        lens[i] = torch.tensor([lp, lc, lr])
    return {"input_ids": ids, "position_ids": pos, "segments": seg, "train_mask": train, "lengths": lens,
            **cat_images([c.image_inputs for c, _ in pairs])}


def packed_attention_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, L, L) additive mask (0 = attend, dtype's min = hidden) from the segment ids."""
    n = segments.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=segments.device).tril()
    q, k = segments.unsqueeze(2), segments.unsqueeze(1)
    allowed = causal & (k > 0) & ~((q == 3) & (k == 2))
    allowed |= torch.eye(n, dtype=torch.bool, device=segments.device)  # padding rows: no all-hidden softmax
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def _prediction_index(lengths: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For [chosen rows; rejected rows] x K answer tokens: the position whose logits predict each token, the
    token's own position, and a validity mask."""
    lp, lc, lr = lengths.unbind(1)
    j = torch.arange(k, device=lengths.device).unsqueeze(0)
    tok_c = lp.unsqueeze(1) + j
    tok_r = (lp + lc).unsqueeze(1) + j
    pred_c = tok_c - 1
    pred_r = torch.where(j == 0, lp.unsqueeze(1) - 1, tok_r - 1)  # rejected[0] is predicted by the prompt's end
    valid = torch.cat([j < lc.unsqueeze(1), j < lr.unsqueeze(1)])
    return torch.cat([pred_c, pred_r]), torch.cat([tok_c, tok_r]), valid


def packed_token_logps(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each answer token, its 0/1 train mask), both (2B, K) as [chosen rows; rejected rows] — the
    same contract as logps.token_logps on the two-row layout."""
    lengths = batch["lengths"]
    b = lengths.shape[0]
    k = int(lengths[:, 1:].max())
    first = int(lengths[:, 0].min())
    if first < 1:
        raise ValueError("a packed pair has an empty prompt; nothing predicts its first answer token")
    dtype = next(p for p in model.parameters()).dtype
    inputs = {key: (v.to(dtype) if v.is_floating_point() else v) for key, v in batch.items()
              if key not in ("segments", "train_mask", "lengths")}
    inputs["attention_mask"] = packed_attention_mask(batch["segments"], dtype)
    keep = torch.arange(first - 1, batch["input_ids"].shape[1], device=lengths.device)
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits.float()
    pred, tok, valid = _prediction_index(lengths, k)
    n = batch["input_ids"].shape[1]
    pred, tok = pred.clamp(first - 1, n - 1), tok.clamp(0, n - 1)
    rows = torch.arange(b, device=lengths.device).repeat(2).unsqueeze(1)
    picked_logits = logits[rows, pred - (first - 1)]  # (2B, K, V)
    labels = batch["input_ids"][rows, tok]
    lp = picked_logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(picked_logits, -1)
    m = (batch["train_mask"][rows, tok].bool() & valid).to(lp.dtype)
    return lp * m, m


def pair_token_logps(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs of a collated pair batch in either layout, as [chosen rows; rejected rows]."""
    if "packed" in batch:
        return packed_token_logps(model, batch["packed"])
    return token_logps(model, batch["pairs"])


def pair_sequence_logps(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """(2B,) summed answer log-probs of a collated pair batch in either layout."""
    return pair_token_logps(model, batch)[0].sum(-1)
