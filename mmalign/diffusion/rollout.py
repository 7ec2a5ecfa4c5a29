"""Stochastic sampling that records its trajectory, for online RL (DDPO / Flow-GRPO).

DDIM with η > 0 (Song et al. 2021; DDPO, Black et al. 2023) makes each step a Gaussian: with ᾱ_t the cumulative
alpha at t and ᾱ_p at the step's previous timestep, from the model's ε̂ and x̂0 (ε- or v-prediction),

    σ_t = η · sqrt((1 − ᾱ_p)/(1 − ᾱ_t)) · sqrt(1 − ᾱ_t/ᾱ_p)
    μ   = sqrt(ᾱ_p) · x̂0 + sqrt(1 − ᾱ_p − σ_t²) · ε̂,      x_p = μ + σ_t · z,  z ~ N(0, I)

and log p(x_p | x_t, c) is the Gaussian log-density of the chosen x_p, a per-dimension mean (DDPO's and
Flow-GRPO's code), so ratios do not scale with the image size. A step with η = 0 is the deterministic DDIM (ODE)
step: it has no density, records log-prob 0 and cannot be trained (the window variant: `etas`).

The sampler (`sample_trajectories`) and the training pass (`step_log_prob`) share `step_stats`: the log-prob the
update recomputes on a stored (x_t, x_p, t, cond) is the one recorded, up to batching round-off.

Flow models (SD3/FLUX, x_σ = (1 − σ)·x0 + σ·ε, velocity v = ε − x0): `flow_sde_step`, Flow-GRPO's
Euler–Maruyama step of the SDE with the flow's marginals, as a pure function of a velocity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

Predict = Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]  # (x_t, t [N], cond) -> model output
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class DDIMGrid:
    """The sampler's timesteps (diffusers' DDIMScheduler spacing) and each step's ᾱ_t and ᾱ_prev, [S] each."""
    timesteps: torch.Tensor  # long, descending
    abar_t: torch.Tensor
    abar_prev: torch.Tensor

    def __len__(self) -> int:
        return len(self.timesteps)

    def fields(self) -> dict[str, torch.Tensor]:
        """Per-step inputs of `step_stats` by keyword, [S] each."""
        return {"t": self.timesteps, "abar_t": self.abar_t, "abar_prev": self.abar_prev}


def ddim_grid(scheduler_config, steps: int) -> DDIMGrid:
    """DDIMScheduler's grid for `steps` from a pipeline's scheduler config (spacing, offset, final ᾱ)."""
    from diffusers import DDIMScheduler

    config = dict(scheduler_config)
    if config.get("clip_sample") or config.get("thresholding"):
        raise ValueError("rollout: schedulers with clip_sample or thresholding are not supported (the step would "
                         "not be the Gaussian whose log-prob is recorded); set them false in the scheduler config")
    sched = DDIMScheduler.from_config(config, clip_sample=False)  # an Euler config (SDXL) has no clip_sample
    sched.set_timesteps(steps)
    t = sched.timesteps.long()
    abar = sched.alphas_cumprod.double()
    prev = t - sched.config.num_train_timesteps // steps
    final = torch.as_tensor(sched.final_alpha_cumprod, dtype=torch.float64)
    abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], final)
    return DDIMGrid(t, abar[t].float(), abar_prev.float())


def eps_x0(pred: torch.Tensor, x: torch.Tensor, abar_t: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε̂, x̂0) from the model output: ε-prediction or v-prediction (v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x0)."""
    a = abar_t.reshape(-1, *[1] * (x.dim() - 1)).to(x)
    if kind == "epsilon":
        return pred, (x - (1 - a).sqrt() * pred) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * pred + (1 - a).sqrt() * x, a.sqrt() * x - (1 - a).sqrt() * pred
    raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")


def ddim_sigma(abar_t: torch.Tensor, abar_prev: torch.Tensor, eta: torch.Tensor | float) -> torch.Tensor:
    """σ_t = η · sqrt((1 − ᾱ_p)/(1 − ᾱ_t)) · sqrt(1 − ᾱ_t/ᾱ_p)."""
    return eta * ((1 - abar_prev) / (1 - abar_t)).sqrt() * (1 - abar_t / abar_prev).sqrt()


def guided(predict: Predict, x: torch.Tensor, t: torch.Tensor, cond: dict, uncond: dict | None,
           guidance: float) -> torch.Tensor:
    """The model output, with classifier-free guidance u + g·(c − u) when guidance != 1 (one call over
    [uncond; cond])."""
    if guidance == 1:
        return predict(x, t, cond)
    if uncond is None:
        raise ValueError("guidance != 1 needs the unconditional (empty caption) conditioning")
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    u, c = predict(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    return u + guidance * (c - u)


def step_stats(predict: Predict, x_t: torch.Tensor, t: torch.Tensor, abar_t: torch.Tensor, abar_prev: torch.Tensor,
               eta: torch.Tensor, cond: dict, uncond: dict | None, guidance: float, kind: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ [N, ...], σ [N]) of the DDIM step from x_t; t, abar_t, abar_prev, eta: [N] (per row: the training
    pass mixes steps in one batch)."""
    eps, x0 = eps_x0(guided(predict, x_t, t, cond, uncond, guidance).to(x_t.dtype), x_t, abar_t, kind)
    sigma = ddim_sigma(abar_t, abar_prev, eta).to(x_t)
    view = (-1, *[1] * (x_t.dim() - 1))
    ap = abar_prev.to(x_t).reshape(view)
    mean = ap.sqrt() * x0 + (1 - ap - sigma.reshape(view) ** 2).clamp(min=0).sqrt() * eps
    return mean, sigma


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-row mean over dims of log N(x; μ, σ²): −(x − μ)²/(2σ²) − log σ − log sqrt(2π). std: [N]."""
    s = std.reshape(-1, *[1] * (x.dim() - 1)).to(x)
    lp = -((x - mean) ** 2) / (2 * s ** 2) - s.log() - LOG_SQRT_2PI
    return lp.flatten(1).mean(1)


def step_log_prob(predict: Predict, x_t: torch.Tensor, x_prev: torch.Tensor, t: torch.Tensor, abar_t: torch.Tensor,
                  abar_prev: torch.Tensor, eta: torch.Tensor, cond: dict, uncond: dict | None, guidance: float,
                  kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(x_prev | x_t, c) [N], μ, σ [N]): the training pass's recomputation, the sampler's own code."""
    if not bool((eta > 0).all()):
        raise ValueError("step_log_prob: a step with eta 0 is deterministic and has no log-prob")
    mean, sigma = step_stats(predict, x_t, t, abar_t, abar_prev, eta, cond, uncond, guidance, kind)
    return gaussian_log_prob(x_prev, mean, sigma), mean, sigma


@dataclass
class Trajectory:
    """N sampled trajectories over S steps. latents[:, k] is the input of step k, latents[:, k + 1] its chosen
    output (latents[:, S] the final latent); log_probs[:, k] its log-prob (0 where etas[k] = 0)."""
    latents: torch.Tensor  # [N, S + 1, C, h, w]
    log_probs: torch.Tensor  # [N, S]
    grid: DDIMGrid  # flow rollouts: rollout_flow.FlowGrid
    etas: torch.Tensor  # [S] (flow: the SDE noise level a)
    cond: dict  # [N, ...] each
    uncond: dict | None
    guidance: float
    images: torch.Tensor | None = None  # [N, 3, H, W] in [0, 1]


# one step of a sampler: (x [m, ...], step k, cond, uncond, m) -> (mean, std [m]) of that step's Gaussian
StepFn = Callable[[torch.Tensor, int, dict, "dict | None", int], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def run_sampler(step: StepFn, cond: dict, uncond: dict | None, noise: torch.Tensor, grid, etas: torch.Tensor,
                guidance: float, max_batch: int, decode: Callable[[torch.Tensor], torch.Tensor] | None) -> Trajectory:
    """The loop every stochastic sampler shares: `max_batch` trajectories at a time, x_{k+1} = mean + std·z_k where
    etas[k] > 0 (its Gaussian log-prob recorded), x_{k+1} = mean (log-prob 0) where it is 0; then `decode`."""
    n, s = noise.shape[0], len(grid)
    if noise.shape[1] != s + 1 or len(etas) != s:
        raise ValueError(f"noise must be [N, {s + 1}, ...] and etas [{s}] for {s} steps; got "
                         f"{tuple(noise.shape)} and {len(etas)}")
    dev = noise.device
    lat, lps = [], []
    for lo in range(0, n, max_batch):
        rows = slice(lo, min(n, lo + max_batch))
        c = {k: v[rows] for k, v in cond.items()}
        u = None if uncond is None else {k: v[rows] for k, v in uncond.items()}
        x, m = noise[rows, 0], noise[rows].shape[0]
        xs, lp = [x], []
        for k in range(s):
            mean, std = step(x, k, c, u, m)
            if float(etas[k]) > 0:
                x = mean + std.reshape(-1, *[1] * (x.dim() - 1)) * noise[rows, k + 1]
                lp.append(gaussian_log_prob(x, mean, std))
            else:
                x = mean
                lp.append(torch.zeros(m, device=dev))
            xs.append(x)
        lat.append(torch.stack(xs, 1))
        lps.append(torch.stack(lp, 1))
    latents = torch.cat(lat)
    images = None
    if decode is not None:
        images = torch.cat([decode(latents[lo:lo + max_batch, -1]) for lo in range(0, n, max_batch)])
    return Trajectory(latents, torch.cat(lps), grid, etas.to(dev), cond, uncond, guidance, images)


def sample_trajectories(predict: Predict, cond: dict, uncond: dict | None, noise: torch.Tensor, grid: DDIMGrid,
                        etas: torch.Tensor, guidance: float, kind: str, max_batch: int = 64,
                        decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Trajectory:
    """Sample N trajectories (all prompts × group in one call), `max_batch` trajectories per model call
    (doubled inside under CFG). noise: [N, S + 1, C, h, w]: noise[:, 0] is x_T, noise[:, k + 1] the draw of
    step k. etas: [S] per-step η (0: a deterministic DDIM step). decode: final latents -> images."""
    dev = noise.device

    def step(x, k, c, u, m):
        full = lambda v: v[k].to(dev).expand(m)  # noqa: E731
        return step_stats(predict, x, full(grid.timesteps), full(grid.abar_t), full(grid.abar_prev), full(etas), c, u,
                          guidance, kind)

    return run_sampler(step, cond, uncond, noise, grid, etas, guidance, max_batch, decode)


def vae_decoder(vae) -> Callable[[torch.Tensor], torch.Tensor]:
    """latents z -> images in [0, 1], fp32: decode(z / scaling_factor + shift_factor) (SD3/FLUX VAEs have a
    shift factor; SD1.5/SDXL none)."""
    def decode(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z = z.to(vae.dtype) / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)
            x = vae.decode(z).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)
    return decode


# --- flow matching (SD3 / FLUX convention) ------------------------------------------------------------------


@dataclass
class FlowStep:
    sample: torch.Tensor  # x at sigma_next
    mean: torch.Tensor
    std: torch.Tensor  # [N]
    log_prob: torch.Tensor | None  # [N]; None where std is 0 (the ODE step has no density)


def euler_step(v: torch.Tensor, x: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """The flow ODE's Euler step: x + (σ_next − σ)·v."""
    return x + _col(torch.as_tensor(sigma_next, dtype=x.dtype) - sigma, x) * v


def flow_sde_step(v: torch.Tensor, x: torch.Tensor, sigma, sigma_next, noise_level: float,
                  noise: torch.Tensor | None = None, sigma_cap: float | None = None,
                  generator: torch.Generator | None = None) -> FlowStep:
    """Flow-GRPO's Euler–Maruyama step from σ to σ_next < σ (dt = σ_next − σ < 0) of

        dx = [v + (s_σ²/(2σ))·(x + (1 − σ)·v)] dt + s_σ dw,   s_σ = a·sqrt(σ/(1 − σ)),  a = noise_level:
        μ = x·(1 + s²·dt/(2σ)) + v·(1 + s²·(1 − σ)/(2σ))·dt,   std = s·sqrt(−dt),   x' = μ + std·z.

    σ, σ_next: floats or [N]. At σ = 1, s is infinite: pass `sigma_cap` (Flow-GRPO uses the grid's second σ),
    used in place of σ in the (1 − σ) denominator. With noise_level 0 the step is the Euler ODE step."""
    mean, std = flow_sde_stats(v, x, sigma, sigma_next, noise_level, sigma_cap)
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    sample = mean + _col(std, x) * noise
    log_prob = gaussian_log_prob(sample, mean, std) if bool((std > 0).all()) else None
    return FlowStep(sample, mean, std, log_prob)


def flow_sde_stats(v: torch.Tensor, x: torch.Tensor, sigma, sigma_next, noise_level, sigma_cap=None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ [N, ...], std [N]) of `flow_sde_step`; sigma, sigma_next, noise_level, sigma_cap: floats or [N]."""
    def rows(v):
        return torch.as_tensor(v, dtype=x.dtype, device=x.device).expand(len(x))

    sig, nxt = rows(sigma), rows(sigma_next)
    if bool((nxt >= sig).any()):
        raise ValueError("flow_sde_step integrates towards data: sigma_next must be below sigma")
    if bool((sig >= 1).any()) and sigma_cap is None:
        raise ValueError("flow_sde_step at sigma = 1 needs sigma_cap (the SDE's noise scale is infinite there)")
    denom = 1 - torch.where(sig >= 1, rows(0.0 if sigma_cap is None else sigma_cap), sig)
    s = rows(noise_level) * (sig / denom).sqrt()
    dt = nxt - sig
    mean = x * _col(1 + s ** 2 * dt / (2 * sig), x) + v * _col((1 + s ** 2 * (1 - sig) / (2 * sig)) * dt, x)
    return mean, s * (-dt).sqrt()


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *[1] * (like.dim() - 1)).to(like)
