"""Where a rectified-flow ShapeWorld base fails: its velocity error at fixed noise levels against a per-element
Gaussian baseline, with the true, a shuffled and the empty caption.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/flow_base_diagnostics.py --model mmalign/assets/shapeworld_sd3

Training renders (a caption seed of their own) are encoded by the pipeline's VAE to x0 (shift and scaling as in
training); at each s, x_s = (1 - s) x0 + s eps and the target is v = eps - x0. The baseline is the best predictor
that knows only each latent element's mean and variance over the renders (elementwise Gaussian x0, so
E[v | x_s] is linear in x_s): a model that has learnt images beats it at every s, and by most at low noise, where
x_s nearly determines x0. true < shuffled measures how much the caption is used. Prints one JSON line per s.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from train_shapeworld_base import to_pixels  # noqa: E402
from train_shapeworld_flow import cache_latents, encode  # noqa: E402

from mmalign.datasets.shapeworld import render_scene, sample_scenes  # noqa: E402
from mmalign.diffusion.flow import flow_denoise  # noqa: E402


def gaussian_baseline(x0: torch.Tensor, x_s: torch.Tensor, s: float) -> torch.Tensor:
    """E[eps - x0 | x_s] for elementwise-independent x0 ~ N(mu, var) and eps ~ N(0, 1)."""
    mu, var = x0.mean(0, keepdim=True), x0.var(0, keepdim=True)
    a, b = 1 - s, s
    return -mu + (b - a * var) / (a * a * var + b * b) * (x_s - a * mu)


def main() -> None:
    from mmalign.diffusion.load_for_sampling import load_pipeline

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="an SD3-format ShapeWorld pipeline directory")
    ap.add_argument("--n", type=int, default=512, help="training renders")
    ap.add_argument("--levels", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--seed", type=int, default=777)
    a = ap.parse_args()
    pipe = load_pipeline(a.model)
    vae = pipe.vae
    scenes = sample_scenes(a.seed, a.n, split="train")
    mean, _ = cache_latents(vae, to_pixels([render_scene(sc, vae.config.sample_size) for sc in scenes]))
    x0 = (mean - vae.config.shift_factor) * vae.config.scaling_factor
    caps = [sc.caption for sc in scenes]
    variants = {"true": caps, "shuffled": caps[1:] + caps[:1], "empty": [""] * len(caps)}
    starts = range(0, len(x0), 128)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        conds = {name: [encode(pipe, c[i:i + 128]) for i in starts] for name, c in variants.items()}  # once
        for s_val in (float(x) for x in a.levels.split(",")):
            eps = torch.randn(x0.shape, generator=g)
            x_s, v = (1 - s_val) * x0 + s_val * eps, eps - x0
            t = s_val * pipe.scheduler.config.num_train_timesteps
            row = {"s": s_val, "gaussian_baseline": ((gaussian_baseline(x0, x_s, s_val) - v) ** 2).mean().item()}
            for name, cond in conds.items():
                parts = ((x_s[i:i + 128], enc) for i, enc in zip(starts, cond))
                pred = torch.cat([flow_denoise(pipe.transformer, x, torch.full((len(x),), t), enc) for x, enc in parts])
                row[name] = ((pred - v) ** 2).mean().item()
            print(json.dumps({k: round(x, 4) for k, x in row.items()}), flush=True)


if __name__ == "__main__":
    main()
