"""What an epsilon- or v-prediction pipeline knows about the image at high noise: its denoising error on ShapeWorld
scenes against two predictors that know nothing (x0_hat = 0, i.e. epsilon_hat = x_t / sqrt(1 - abar), and x0_hat = the
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

import torch

from mmalign.datasets.shapeworld.render import render_scene
from mmalign.datasets.shapeworld.scene import sample_scenes
from mmalign.diffusion.pipeline import SDComponents, denoise, encode_prompts, load_sd_components, preprocess
from mmalign.diffusion.rollout import eps_x0


@torch.no_grad()
def high_noise_table(parts: SDComponents, scenes, timesteps, seed: int = 0) -> list[dict]:
    if parts.is_flow or parts.is_sdxl:
        raise SystemExit("an SD1.5-format pipeline is needed")
    img = torch.stack([preprocess(render_scene(s), parts.resolution)[0] for s in scenes])
    x0 = parts.vae.encode(img).latent_dist.mean * parts.vae.config.scaling_factor
    cond = encode_prompts(parts, [s.caption for s in scenes], torch.device("cpu"))
    abar, mean_x0, rows = parts.noise_scheduler.alphas_cumprod, x0.mean(0, keepdim=True), []
    for t in timesteps:
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + t))
        a = abar[t]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        out = denoise(parts.unet, x_t, torch.full((len(x0),), t), cond)
        pred, x0_hat = eps_x0(out, x_t, a, parts.noise_scheduler.config.prediction_type)
        rows.append({"t": t, "abar": round(a.item(), 5),
                     "model_eps_err": round((pred - eps).pow(2).mean().item(), 5),
                     "zero_x0_eps_err": round((x_t / (1 - a).sqrt() - eps).pow(2).mean().item(), 5),
                     "mean_x0_eps_err": round(((x_t - a.sqrt() * mean_x0) / (1 - a).sqrt() - eps)
                                              .pow(2).mean().item(), 5),
                     "model_x0_err": round((x0_hat - x0).pow(2).mean().item(), 4),
                     "mean_x0_x0_err": round((mean_x0 - x0).pow(2).mean().item(), 4),
                     "x0_power": round(x0.pow(2).mean().item(), 4)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mmalign/assets/shapeworld_sd", help="an SD-format pipeline directory")
    ap.add_argument("--n", type=int, default=256, help="training-split scenes")
    ap.add_argument("--seed", type=int, default=20000)
    ap.add_argument("--timesteps", default="500,700,900,950,980,999")
    a = ap.parse_args()
    scenes = sample_scenes(a.seed, a.n, split="train")
    for row in high_noise_table(load_sd_components(a.model), scenes, [int(t) for t in a.timesteps.split(",")]):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
