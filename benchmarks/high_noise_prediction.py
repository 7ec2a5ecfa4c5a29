"""What an epsilon-prediction pipeline knows about the image at high noise: its denoising error on ShapeWorld scenes
against two predictors that know nothing (x0_hat = 0, i.e. epsilon_hat = x_t / sqrt(1 - abar), and x0_hat = the
scenes' mean latent), and its implied x0 error, per timestep.

An epsilon error e means an x0 error of e (1 - abar) / abar, which at t = 999 of SD's schedule is 213 e: a model can
be good everywhere it is trained hard and still carry no layout at the first sampling steps. Where its x0 error is
above E|x0|^2, its first steps' prediction is further from the image than predicting nothing, and what the sample
becomes is decided later, by the noise pattern rather than the caption.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/high_noise_prediction.py [--model DIR] [--n 256]
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from mmalign.datasets.shapeworld.render import render_scene
from mmalign.datasets.shapeworld.scene import sample_scenes


@torch.no_grad()
def high_noise_table(pipe: StableDiffusionPipeline, scenes, timesteps, seed: int = 0) -> list[dict]:
    if pipe.scheduler.config.prediction_type != "epsilon":
        raise SystemExit(f"an epsilon-prediction pipeline is needed, this one predicts "
                         f"{pipe.scheduler.config.prediction_type}")
    img = torch.tensor(np.stack([np.asarray(render_scene(s).convert("RGB")) for s in scenes]))
    img = img.permute(0, 3, 1, 2).float() / 127.5 - 1
    x0 = pipe.vae.encode(img).latent_dist.mean * pipe.vae.config.scaling_factor
    tok = pipe.tokenizer([s.caption for s in scenes], padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
    ctx = pipe.text_encoder(tok.input_ids)[0]
    abar, mean_x0, rows = pipe.scheduler.alphas_cumprod, x0.mean(0, keepdim=True), []
    for t in timesteps:
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + t))
        a = abar[t]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = pipe.unet(x_t, torch.full((len(x0),), t), ctx).sample
        x0_hat = (x_t - (1 - a).sqrt() * pred) / a.sqrt()
        rows.append({"t": t, "abar": round(a.item(), 5),
                     "model_eps_err": round((pred - eps).pow(2).mean().item(), 5),
                     "zero_x0_eps_err": round((x_t / (1 - a).sqrt() - eps).pow(2).mean().item(), 5),
                     "mean_x0_eps_err": round(((x_t - a.sqrt() * mean_x0) / (1 - a).sqrt() - eps)
                                              .pow(2).mean().item(), 5),
                     "model_x0_err": round((x0_hat - x0).pow(2).mean().item(), 4),
                     "x0_power": round(x0.pow(2).mean().item(), 4)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mmalign/assets/shapeworld_sd", help="an SD-format pipeline directory")
    ap.add_argument("--n", type=int, default=256, help="training-split scenes")
    ap.add_argument("--seed", type=int, default=20000)
    ap.add_argument("--timesteps", default="500,700,900,950,980,999")
    a = ap.parse_args()
    pipe = StableDiffusionPipeline.from_pretrained(a.model, safety_checker=None, requires_safety_checker=False)
    scenes = sample_scenes(a.seed, a.n, split="train")
    for row in high_noise_table(pipe, scenes, [int(t) for t in a.timesteps.split(",")]):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
