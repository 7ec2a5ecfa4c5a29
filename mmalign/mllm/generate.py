"""Batched answer generation (greedy for evaluation, sampled for on-policy pairs and best-of-N)."""
from __future__ import annotations

import torch

from .encoding import render, tokenizer_of


@torch.no_grad()
def generate_answers(model, processor, items: list[tuple[list, list[dict]]], max_new_tokens: int = 24,
                     do_sample: bool = False, temperature: float = 1.0, seed: int = 0,
                     batch_size: int = 32) -> list[str]:
    """Answers to `items` = [(images, prompt messages)], in order. Prompts are left-padded per batch; with
    sampling each batch draws from a generator seeded by (seed, batch index), so a run is reproducible."""
    tok = tokenizer_of(processor)
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out: list[str] = []
    for b in range(0, len(items), batch_size):
        chunk = items[b:b + batch_size]
        texts = [render(processor, msgs, add_generation_prompt=True) for _, msgs in chunk]
        images = [list(ims) for ims, _ in chunk]  # per prompt: processors like Gemma-3 read a flat list as one prompt's
        enc = processor(text=texts, images=images if any(images) else None, padding=True, padding_side="left",
                        return_tensors="pt", add_special_tokens=False)
        enc = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in enc.items()}
        if do_sample:
            torch.manual_seed(seed * 100_003 + b)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             temperature=temperature if do_sample else None, top_p=None, top_k=None,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out += [t.strip() for t in tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    return out
