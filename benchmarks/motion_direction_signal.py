"""How much can the direction word lower the denoising loss at all? The Bayes-optimal denoiser of ShapeWorld clips,
approximated by a posterior mean over many sampled clips, with and without the direction.

For one colour and shape ("a red circle moving ..."), draw N clips per direction from `sample_clip`'s own
distribution (size, start, travel as it draws them; colour, shape and direction fixed) and encode them with the
base's VAE (scaled latents, 8 frames). For held-out clips x0 of that caption (other seeds), noise eps and a
timestep t, x_t = sqrt(a) x0 + sqrt(1 - a) eps; the posterior mean of x0 over a candidate set C is
sum_i w_i x0_i, w_i proportional to exp(-|x_t - sqrt(a) x0_i|^2 / (2 (1 - a))), and its epsilon error per
dimension is a / (1 - a) |x0_hat - x0|^2 / D. Candidate sets:

- true: the clip's own direction (what a model that reads the word can reach);
- any: all four directions (the best a model blind to the direction word can do);
- opposite: the opposite direction (what `scripts/train_shapeworld_motion.py --gap-only` swaps in);
- other colour: the same direction, blue (the colour word's gap, for scale).

Printed per t: each set's error relative to `true`'s, and `true`'s error itself; and for scale, a video model's
(`--adapter`, default the shipped one) epsilon error on the same x_t under the true caption, under the opposite
direction's and under the other colour's. A finite candidate set overstates every error at low t (its nearest clip
is not x0), equally for all sets; `--per-direction 250` against the default shows how far the gaps depend on N.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/motion_direction_signal.py
"""
from __future__ import annotations

import argparse
import functools
import json
import random
import tempfile
import time

import torch

from mmalign.datasets.shapeworld.video import DIRECTIONS, motion_caption, sample_clip
from mmalign.diffusion.pipeline import load_sd_components
from mmalign.video.clips import encode_clips
from mmalign.video.methods import VideoConfig, VideoDataConfig, VideoModelConfig, VideoTemporalTraining

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


class Fixed(random.Random):
    """A Random whose `choice` returns the forced value when the sequence holds it (colour, shape, direction)."""

    def __init__(self, seed: int, forced: tuple[str, ...]):
        super().__init__(seed)
        self.forced = forced

    def choice(self, seq):
        hit = [v for v in self.forced if v in seq]
        return hit[0] if hit else super().choice(seq)


def clips(colour: str, shape: str, direction: str, n: int, seed: int) -> list:
    rng = Fixed(seed, (colour, shape, direction))
    return [sample_clip(rng, 8, 32).frames for _ in range(n)]


def posterior_error(x0: torch.Tensor, x_t: torch.Tensor, cand: torch.Tensor, a: float) -> torch.Tensor:
    """Per clip: the epsilon error per dimension of the posterior mean over `cand` (N, D); x0, x_t (Q, D)."""
    d2 = torch.cdist(x_t, a ** 0.5 * cand) ** 2  # (Q, N)
    w = torch.softmax(-d2 / (2 * (1 - a)), dim=1)
    x0_hat = w @ cand
    return a / (1 - a) * ((x0_hat - x0) ** 2).mean(dim=1)


@functools.lru_cache(maxsize=1)
def video_model(base: str, adapter: str):
    cfg = VideoConfig(VideoModelConfig(pretrained=base, motion_adapter=adapter), VideoDataConfig(num_frames=8))
    with tempfile.TemporaryDirectory() as tmp:  # the method's output_dir (nothing is written there)
        method = VideoTemporalTraining(cfg, tmp, data=[])
        return method, method.build(torch.device("cpu"))


@torch.no_grad()
def model_errors(base: str, adapter: str, x_t: torch.Tensor, eps: torch.Tensor, t: int, captions: list[str],
                 shape: tuple) -> torch.Tensor:
    """The video model's epsilon error per dimension, per clip, on x_t (flattened) under `captions`."""
    method, policy = video_model(base, adapter)
    pred = policy(x_t.float().view(-1, *shape), torch.full((len(x_t),), t), method.encode_captions(captions))
    return ((pred.flatten(1).double() - eps) ** 2).mean(dim=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="mmalign/assets/shapeworld_sd")
    ap.add_argument("--per-direction", type=int, default=1000, help="candidate clips per direction (N)")
    ap.add_argument("--held-out", type=int, default=16, help="held-out clips per direction")
    ap.add_argument("--timesteps", default="500,700,900,950,980,999")
    ap.add_argument("--colour", default="red")
    ap.add_argument("--shape", default="circle")
    ap.add_argument("--other-colour", default="blue")
    ap.add_argument("--adapter", default="mmalign/assets/shapeworld_motion", help="'' skips the model's errors")
    a = ap.parse_args()
    t0 = time.time()
    parts = load_sd_components(a.base)
    scale = parts.vae.config.scaling_factor

    def encode(frames_list) -> torch.Tensor:
        """Scaled VAE latents (N, C, F, h, w), in float64."""
        mean, _ = encode_clips(parts.vae, frames_list, 32, torch.device("cpu"))
        return (mean * scale).double()

    held = {d: encode(clips(a.colour, a.shape, d, a.held_out, 3000 + i)) for i, d in enumerate(DIRECTIONS)}
    shape = tuple(held[DIRECTIONS[0]].shape[1:])  # (C, F, h, w): the model's input; the posterior works flat
    held = {d: x.flatten(1) for d, x in held.items()}
    cand = {d: encode(clips(a.colour, a.shape, d, a.per_direction, 1000 + i)).flatten(1)
            for i, d in enumerate(DIRECTIONS)}
    other = {d: encode(clips(a.other_colour, a.shape, d, a.per_direction, 2000 + i)).flatten(1)
             for i, d in enumerate(DIRECTIONS)}
    every = torch.cat(list(cand.values()))
    bars = parts.noise_scheduler.alphas_cumprod.double()
    gen = torch.Generator().manual_seed(0)
    for t in (int(x) for x in a.timesteps.split(",")):
        abar = float(bars[t])
        err = {"true": [], "any": [], "opposite": [], "other colour": []}
        model = {"model_true": [], "model_opposite": [], "model_other_colour": []}
        for d in DIRECTIONS:
            x0 = held[d]
            eps = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
            x_t = abar ** 0.5 * x0 + (1 - abar) ** 0.5 * eps
            if a.adapter:
                for key, colour, word in (("model_true", a.colour, d), ("model_opposite", a.colour, OPPOSITE[d]),
                                          ("model_other_colour", a.other_colour, d)):
                    model[key].append(model_errors(a.base, a.adapter, x_t, eps, t,
                                                   [motion_caption(colour, a.shape, word)] * len(x0), shape))
            err["true"].append(posterior_error(x0, x_t, cand[d], abar))
            err["any"].append(posterior_error(x0, x_t, every, abar))
            err["opposite"].append(posterior_error(x0, x_t, cand[OPPOSITE[d]], abar))
            err["other colour"].append(posterior_error(x0, x_t, other[d], abar))
        e = {k: torch.cat(v) for k, v in err.items()}
        rel = {f"{k}_vs_true": round(((e[k] - e["true"]).mean() / e["true"].mean()).item(), 5)
               for k in e if k != "true"}
        if a.adapter:
            m = {k: torch.cat(v) for k, v in model.items()}
            rel["model_eps_err"] = round(m["model_true"].mean().item(), 5)
            for k in ("model_opposite", "model_other_colour"):
                rel[f"{k}_vs_true"] = round(((m[k] - m["model_true"]).mean() / m["model_true"].mean()).item(), 5)
        print(json.dumps({"t": t, "alpha_bar": round(abar, 5), "per_direction": a.per_direction,
                          "held_out": 4 * a.held_out, "true_eps_err": round(e["true"].mean().item(), 5),
                          "blind_eps_err": round(e["any"].mean().item(), 5), **rel}), flush=True)
    print(json.dumps({"seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
