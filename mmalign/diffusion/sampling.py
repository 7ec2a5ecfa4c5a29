"""Sampling with fixed seeds: image i of a call depends only on (prompt_i, seed_i), never on the batch."""
from __future__ import annotations

import torch
from PIL import Image


@torch.no_grad()
def sample_images(pipe, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 4.0,
                  batch_size: int = 64, resolution: int | None = None) -> list[Image.Image]:
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    res = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    pipe.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds[i:i + batch_size]]
        out = pipe(prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                   height=res, width=res, generator=gens, output_type="pil")
        images.extend(out.images)
    return images
