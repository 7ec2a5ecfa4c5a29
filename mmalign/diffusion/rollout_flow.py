"""Flow-GRPO rollouts of rectified-flow pipelines (SD3/FLUX format, flow.py): the same recorded trajectories as the
DDIM sampler (rollout.Trajectory), on the pipeline's own sigma schedule.

Grid: FlowMatchEulerDiscreteScheduler.set_timesteps for `steps`, as StableDiffusion3Pipeline / FluxPipeline call it
(FLUX: sigmas linspace(1, 1/S, S); with `use_dynamic_shifting` the image-size shift
mu = base_shift + (max_shift − base_shift)·(L − base_len)/(max_len − base_len), L = (h/2)·(w/2) latent patches):
σ_0 = 1 > σ_1 > ... > σ_{S−1}, σ_S = 0, timesteps t_k = σ_k·N as the pipeline passes them.

Step k from x at σ_k to σ_{k+1}, with v = the model's velocity (classifier-free guided u + g·(c − u) when g != 1):
Flow-GRPO's Euler–Maruyama step of dx = [v + (s²/(2σ))(x + (1 − σ)v)] dt + s dw, s = a·sqrt(σ/(1 − σ))
(rollout.flow_sde_stats; at σ = 1 the (1 − σ) uses σ_1, Flow-GRPO's cap), a Gaussian N(μ, std²) whose
log-density of the chosen x_{k+1} is recorded (rollout.gaussian_log_prob). a = 0: the deterministic Euler step
x + (σ_{k+1} − σ_k)·v (FlowMatchEulerDiscreteScheduler.step), log-prob 0, not trained. The sampler and the
training pass (`flow_step_log_prob`) share `flow_step_stats`.

Latents stay unpacked [N, C, h, w] throughout (FLUX packs inside pipeline.denoise), so decoding is the pipeline's
decode(z / scaling_factor + shift_factor) (rollout.vae_decoder) without FLUX's unpacking.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .rollout import Predict, Trajectory, flow_sde_stats, gaussian_log_prob, guided, run_sampler


@dataclass
class FlowGrid:
    """The sampler's schedule, [S] each: timesteps t_k = σ_k·N (model units), σ_k and σ_{k+1} (the last 0)."""
    timesteps: torch.Tensor  # float32, descending
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    sigma_cap: float  # σ_1: stands in for σ in the SDE's (1 − σ) at σ = 1

    def __len__(self) -> int:
        return len(self.timesteps)

    def fields(self) -> dict[str, torch.Tensor]:
        """Per-step inputs of `flow_step_stats` by keyword, [S] each."""
        return {"t": self.timesteps, "sigma": self.sigma, "sigma_next": self.sigma_next,
                "sigma_cap": torch.full_like(self.sigma, self.sigma_cap)}


def image_shift(config, image_seq_len: int, fmt: str) -> float:
    """mu = base_shift + (max_shift − base_shift)·(L − base_len)/(max_len − base_len), the pipelines' calculate_shift
    (their defaults differ: max_shift 1.15 FLUX, 1.16 SD3)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15 if fmt == "flux" else 1.16)
    return base + (top - base) * (image_seq_len - base_len) / (max_len - base_len)


def flow_grid(scheduler_config, steps: int, image_seq_len: int, fmt: str) -> FlowGrid:
    """The schedule the `fmt` ("sd3" / "flux") pipeline samples `steps` steps on, for L = image_seq_len latent
    patches (h/2 · w/2)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    kwargs = {}
    if fmt == "flux" and not sched.config.get("use_flow_sigmas"):
        kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    if sched.config.use_dynamic_shifting:
        kwargs["mu"] = image_shift(sched.config, image_seq_len, fmt)
    sched.set_timesteps(None if "sigmas" in kwargs else steps, **kwargs)
    sig = sched.sigmas.float()  # [S + 1], the last 0
    if len(sig) != steps + 1 or not bool((sig[1:] < sig[:-1]).all()):
        raise ValueError(f"rollout_flow: the scheduler gave {len(sig) - 1} sigmas for {steps} steps, or not "
                         f"decreasing ({sig.tolist()}); karras/exponential/beta sigma options are not supported")
    return FlowGrid(sched.timesteps.float(), sig[:-1], sig[1:], float(sig[1]))


def flow_step_stats(predict: Predict, x_t: torch.Tensor, t: torch.Tensor, sigma: torch.Tensor,
                    sigma_next: torch.Tensor, sigma_cap: torch.Tensor, eta: torch.Tensor, cond: dict,
                    uncond: dict | None, guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ [N, ...], std [N]) of the SDE step from x_t (rollout.flow_sde_stats of the guided velocity); every
    per-step input is [N] (the training pass mixes steps in one batch); eta: the noise level a."""
    v = guided(predict, x_t, t, cond, uncond, guidance).to(x_t.dtype)
    return flow_sde_stats(v, x_t, sigma, sigma_next, eta, sigma_cap)


def flow_step_log_prob(predict: Predict, x_t: torch.Tensor, x_prev: torch.Tensor, t: torch.Tensor,
                       sigma: torch.Tensor, sigma_next: torch.Tensor, sigma_cap: torch.Tensor, eta: torch.Tensor,
                       cond: dict, uncond: dict | None, guidance: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(x_prev | x_t, c) [N], μ, std [N]): the training pass's recomputation, the sampler's own code."""
    if not bool((eta > 0).all()):
        raise ValueError("flow_step_log_prob: a step with noise level 0 is the Euler ODE step and has no log-prob")
    mean, std = flow_step_stats(predict, x_t, t, sigma, sigma_next, sigma_cap, eta, cond, uncond, guidance)
    return gaussian_log_prob(x_prev, mean, std), mean, std


def sample_flow_trajectories(predict: Predict, cond: dict, uncond: dict | None, noise: torch.Tensor, grid: FlowGrid,
                             etas: torch.Tensor, guidance: float, max_batch: int = 64,
                             decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Trajectory:
    """Sample N trajectories, `max_batch` per model call (doubled inside under CFG). noise: [N, S + 1, C, h, w]:
    noise[:, 0] is x at σ = 1, noise[:, k + 1] the draw of step k. etas: [S] per-step noise level a (0: an Euler
    step). decode: final latents -> images."""
    dev, per_step = noise.device, grid.fields()

    def step(x, k, c, u, m):
        at = {name: v[k].to(dev).expand(m) for name, v in per_step.items()}
        return flow_step_stats(predict, x, **at, eta=etas[k].to(dev).expand(m), cond=c, uncond=u, guidance=guidance)

    return run_sampler(step, cond, uncond, noise, grid, etas, guidance, max_batch, decode)
