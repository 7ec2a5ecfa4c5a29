"""How good are GRPO's rollout samples? The shipped ShapeWorld base sampled on training-split captions with DDIM
at several eta (the stochastic sampler GRPO trains through: eta > 0) and step counts, scored by the exact scorer:
the trained reward (`onpolicy.shapeworld_reward`, 0-2) and "all correct". One process, the same prompts and seeds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rollout_sampler_quality.py --n 128 --config 10:1.0 10:0.5 10:0 15:0
"""
from __future__ import annotations

import argparse
import time

import torch

from mmalign.datasets.shapeworld import sample_scenes
from mmalign.demo.diffusion import BASE_PIPELINE, load_sd_pipeline
from mmalign.diffusion.onpolicy import reward_from_scores
from mmalign.diffusion.sampling import native_resolution
from mmalign.datasets.shapeworld import score_image

GRPO_PROMPT_SEED = 40_000  # configs/shapeworld_diffusion_grpo.yaml's data.seed: the captions GRPO trains on


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--model", default=str(BASE_PIPELINE))
    ap.add_argument("--unique-of", type=int, default=0,
                    help="draw this many captions and keep the distinct ones, as GRPO's data.shapeworld_prompts does")
    ap.add_argument("--config", nargs="+", default=["10:1.0", "10:0.5", "10:0", "15:0"], metavar="STEPS:ETA")
    a = ap.parse_args()
    pipe = load_sd_pipeline(a.model)
    pipe.set_progress_bar_config(disable=True)
    drawn = [s.caption for s in sample_scenes(GRPO_PROMPT_SEED, a.unique_of or a.n, split="train")]
    prompts = list(dict.fromkeys(drawn))[:a.n] if a.unique_of else drawn
    res = native_resolution(pipe)
    print("| DDIM steps | eta | reward (0-2) | all correct | seconds |\n|---|---|---|---|---|")
    for spec in a.config:
        steps, eta = int(spec.split(":")[0]), float(spec.split(":")[1])
        t0, images = time.time(), []
        for i in range(0, a.n, 64):
            gens = [torch.Generator().manual_seed(s) for s in range(i, min(i + 64, a.n))]
            images += pipe(prompts[i:i + 64], num_inference_steps=steps, guidance_scale=a.guidance, eta=eta,
                           height=res, width=res, generator=gens).images
        scores = [score_image(im, p) for im, p in zip(images, prompts)]
        reward = sum(reward_from_scores(s) for s in scores) / a.n
        correct = sum(s["correct"] for s in scores) / a.n
        print(f"| {steps} | {eta:g} | {reward:.3f} | {100 * correct:.1f} % | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
