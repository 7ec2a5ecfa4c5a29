#!/usr/bin/env python3
"""Side-by-side: our diffusion SFT step (latents and prompt embeddings cached once) vs a step shaped like
diffusers' text-to-image example (VAE encoder and text encoder run on every batch). Same pipeline, batch,
device and number of steps, in one process, alternating blocks so both see the same machine load.

    python benchmarks/sft_step.py --pipeline mmalign/assets/shapeworld_sd --batch 32 --steps 20

Prints one JSON line with both step times and the ratio (per-step-encoding / ours).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from mmalign.datasets.shapeworld import render_scene, sample_scenes
from mmalign.diffusion.losses import per_sample_mse
from mmalign.diffusion.pipeline import load_sd_components, tokenize


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipeline", default="mmalign/assets/shapeworld_sd")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    p = load_sd_components(a.pipeline)
    p.vae.requires_grad_(False)
    p.text_encoder.requires_grad_(False)
    res = p.resolution
    scenes = sample_scenes(0, a.batch)
    pixels = torch.stack([torch.from_numpy(np.asarray(render_scene(s, res)).copy())
                          for s in scenes]).permute(0, 3, 1, 2).float() / 127.5 - 1
    ids = tokenize(p.tokenizer, [s.caption for s in scenes])
    opt = torch.optim.AdamW(p.unet.parameters(), lr=1e-5)
    scale = p.vae.config.scaling_factor
    with torch.no_grad():  # our cache, built once
        post = p.vae.encode(pixels).latent_dist
        mean, std, ctx_cached = post.mean, post.std, p.text_encoder(ids)[0]

    def step(latents, ctx):
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (len(latents),))
        pred = p.unet(p.noise_scheduler.add_noise(latents, noise, t), t, ctx).sample
        per_sample_mse(pred, noise).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ours():
        step((mean + std * torch.randn_like(std)) * scale, ctx_cached)

    def per_step_encoding():
        with torch.no_grad():
            latents = p.vae.encode(pixels).latent_dist.sample() * scale
            ctx = p.text_encoder(ids)[0]
        step(latents, ctx)

    times = {"ours": 0.0, "per_step_encoding": 0.0}
    for fn in (ours, per_step_encoding):
        fn()  # warm-up
    for _ in range(a.rounds):
        for name, fn in (("ours", ours), ("per_step_encoding", per_step_encoding)):
            t0 = time.perf_counter()
            for _ in range(a.steps):
                fn()
            times[name] += time.perf_counter() - t0
    n = a.rounds * a.steps
    print(json.dumps({"pipeline": a.pipeline, "batch": a.batch, "device": "cpu", "threads": torch.get_num_threads(),
                      "ours_step_s": times["ours"] / n, "per_step_encoding_step_s": times["per_step_encoding"] / n,
                      "speedup": times["per_step_encoding"] / times["ours"]}))


if __name__ == "__main__":
    main()
