"""How exact is the DDIM inversion that InPO and Inversion-DPO train on, on the shipped ShapeWorld base?

    .venv/bin/python benchmarks/inversion_diagnostics.py --images 32 --steps 4 10 20 40

For clean ShapeWorld renders of training-split captions (VAE posterior means, scaled), each number of inversion
steps N: invert with the base's conditional eps over InPO's grid (1, 1 + 1000/N, ...), run DDIM back from the
last point, and report
- the reconstruction error ||x0_rec - x0||^2 / ||x0||^2 (0: the inversion is exact);
- the training signal at the start of Inversion-DPO: mean over steps of ||eps_ref,i - eps*_i||^2 / ||eps*_i||^2,
  where eps*_i is the noise that explains x_i given x0 (inversion_dpo.py); at theta = theta_ref the loss's gradient
  is proportional to it, so near-zero means the method starts with almost no signal;
- the seconds of one inversion of the batch (what every Inversion-DPO step pays twice: winner and loser).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from mmalign.datasets.shapeworld import render_scene, sample_scenes
from mmalign.demo.diffusion import BASE_PIPELINE
from mmalign.diffusion.inversion import ddim_sample, eps_from_prediction, inversion_grid, inversion_trajectory
from mmalign.diffusion.losses import inpo_target
from mmalign.diffusion.pipeline import denoise, encode_prompts, load_sd_components


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 10, 20, 40])
    a = ap.parse_args()
    parts = load_sd_components(str(BASE_PIPELINE))
    scenes = sample_scenes(7, a.images, split="train")
    pix = torch.stack([torch.from_numpy(__import__("numpy").asarray(render_scene(s), dtype="float32"))
                       for s in scenes]).permute(0, 3, 1, 2) / 127.5 - 1
    x0 = parts.vae.encode(pix).latent_dist.mean * parts.vae.config.scaling_factor
    cond = encode_prompts(parts, [s.caption for s in scenes], torch.device("cpu"))
    abar = parts.noise_scheduler.alphas_cumprod
    kind = parts.noise_scheduler.config.prediction_type

    def eps_fn(x, t):
        return eps_from_prediction(kind, denoise(parts.unet, x, t, cond), x, t, abar)

    rows = []
    for n in a.steps:
        t0 = time.time()
        traj = inversion_trajectory(eps_fn, x0, abar, n)
        seconds = time.time() - t0
        grid = inversion_grid(1000, n)
        back = ddim_sample(eps_fn, traj.xs[-1], traj.ts[-1].expand(len(x0)), abar, grid)
        rec = ((back - x0) ** 2).flatten(1).sum(1) / (x0 ** 2).flatten(1).sum(1)
        gaps = []
        for i in range(n):
            target = inpo_target(traj.xs[i], x0, abar[traj.ts[i].expand(len(x0))])
            gaps.append(((traj.eps_ref[i] - target) ** 2).flatten(1).sum(1) / (target ** 2).flatten(1).sum(1))
        row = {"steps": n, "reconstruction_rel_err": rec.mean().item(),
               "eps_gap_rel": torch.stack(gaps).mean().item(), "invert_seconds": round(seconds, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| inversion steps | reconstruction error (rel.) | eps_ref vs eps* gap (rel.) | seconds per inversion |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['steps']} | {r['reconstruction_rel_err']:.4f} | {r['eps_gap_rel']:.4f} | {r['invert_seconds']} |")


if __name__ == "__main__":
    main()
