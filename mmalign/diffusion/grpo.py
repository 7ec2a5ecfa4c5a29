"""Online RL of an SD1.5/SDXL-format UNet (GRPO: DDPO's Gaussian DDIM steps, Flow-GRPO's group advantages,
clipped ratio and per-step KL), one more Method on the shared loop. SD3/FLUX-format (rectified-flow) pipelines roll
out with Flow-GRPO's SDE steps on the pipeline's sigma schedule (rollout_flow.py; noise level
objective.flow_noise_level, DDIM's eta unused), otherwise the same. FLUX: the transformer's embedded guidance
is flow.FLUX_TRAIN_GUIDANCE; objective.guidance != 1 adds true CFG against the empty caption (FluxPipeline's
true_cfg_scale), so a guidance-distilled FLUX.1-dev wants guidance 1 or cfg_free_training.

Rows are prompts. When the rollout buffer is empty, `loss` samples the batch's prompts × group_size with the
current policy (no grad; rollout.sample_trajectories, η > 0), scores them (rewards.Rewards), computes group
advantages (grpo_losses.group_advantages) and fills the buffer with `inner_epochs` passes × `minibatches`
minibatches of its trajectories. Every `loss` call, including that one, trains on the next minibatch: it
recomputes the log-probs of the trained steps with the policy, in one forward (rollout.step_log_prob, the
sampler's own code), and returns the clipped-ratio loss + kl_beta · KL to the reference. So a rollout serves
inner_epochs × minibatches loss calls; the loader's batches met while the buffer serves only pace the loop.
On-policy (ratio 1) the loss value is about 0 (advantages have mean 0 in each group) while its gradient is not:
judge a run by reward/<name>_mean and the held-out rewards, not by the loss curve. Timing metrics:
time/rollout_s and time/reward_s of the rollout being trained on, time/update_s of this loss call (its forward
plus the previous call's backward and optimizer step).

Randomness: the rollout's noise and window are drawn per row (core.row_rng), so they depend only on (seed,
epoch, row): deterministic given the seed and step. Resume is exact when checkpoints fall on rollout boundaries
(the buffer is not checkpointed: a resumed run starts with a fresh rollout).

DDP: each rank rolls out its own batch of prompts and every group (one prompt's group_size samples) stays on its
rank, so advantages need no communication; the logged rewards are the ranks' mean. A train_steps_window is
rank 0's (drawn from its first row, the global batch's first), shared by every rank: 2 ranks x batch B train what
one process does with batch 2B (tests/test_grpo.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.config import ConfigError, bounded
from ..core.distributed import main_process_value
from ..core.row_rng import RowRandom, mix
from ..datasets.records import SkipReport
from .grpo_losses import gaussian_kl, group_advantages, grpo_loss
from .latent_method import LatentDiffusionMethod
from .pipeline import encode_prompts, make_time_ids
from .preference import PrefModelConfig, build_cond_policy
from .rewards import Rewards
from .rollout import Trajectory, ddim_grid, sample_trajectories, step_log_prob, step_stats, vae_decoder
from .rollout_flow import flow_grid, flow_step_log_prob, flow_step_stats, sample_flow_trajectories


@dataclass
class PromptDataConfig:
    path: str = ""  # prompt file, one per line (blank and duplicate lines are counted skips)
    shapeworld_prompts: int = bounded(0, 0)  # with path "": this many training-split ShapeWorld captions
    seed: int = bounded(0, 0)  # seed of the ShapeWorld captions (datasets.shapeworld.sample_scenes)
    resolution: int = bounded(0, 0)  # 0: the model's native resolution


@dataclass
class GRPOObjective:
    group_size: int = bounded(8, 2)  # samples per prompt (one group: its advantages are normalised together)
    sample_steps: int = bounded(10, 1)  # DDIM steps of a rollout
    eta: float = bounded(1.0, 0, lo_open=True)  # DDIM eta of the stochastic steps (DDPO: 1.0); UNet pipelines
    # SD3/FLUX: the SDE noise level a of the stochastic steps, s = a·sqrt(σ/(1 − σ)) (Flow-GRPO: 0.7)
    flow_noise_level: float = bounded(0.7, 0, lo_open=True)
    guidance: float = bounded(4.0, 0)  # CFG scale of rollouts and training; 1: no CFG
    cfg_free_training: bool = False  # roll out and train without CFG (guidance ignored): Flow-GRPO's option
    # W > 0: only W consecutive steps (drawn per rollout) are stochastic and trained, the others deterministic
    # DDIM / Euler (ODE) steps: MixGRPO's window; 0: every step
    train_steps_window: int = bounded(0, 0)
    # -1: the window's first step drawn per rollout; k >= 0: always steps k .. k + W - 1 (0: the high-noise steps,
    # where a sample's composition is decided; MixGRPO's sliding window starts there)
    train_steps_window_start: int = bounded(-1, -1)
    # DanceGRPO: a group's samples start from one x_T, so their rewards differ only through the stochastic
    # (trained) steps and the advantage is not spent on the initial noise, which no trained step chose
    shared_initial_noise: bool = False
    clip_range: float = bounded(1e-4, 0, lo_open=True)  # PPO ratio clip (DDPO and Flow-GRPO: 1e-4)
    kl_beta: float = bounded(0.0, 0)  # weight of the per-step KL to the reference (Flow-GRPO: 0.04 / 0.01)
    inner_epochs: int = bounded(1, 1)  # passes over each rollout's trajectories
    minibatches: int = bounded(1, 1)  # loss calls per pass (the trajectories split evenly)
    rollout_batch: int = bounded(64, 1, identity=False)  # trajectories per sampler call (memory)


@dataclass
class RewardConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"shapeworld": 1.0})  # trained: name -> weight
    heldout: list[str] = field(default_factory=list)  # logged, never trained on (watch for reward hacking)


@dataclass
class GRPOConfig:
    model: PrefModelConfig
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    objective: GRPOObjective = field(default_factory=GRPOObjective)
    reward: RewardConfig = field(default_factory=RewardConfig)


class PromptRows(torch.utils.data.Dataset):
    def __init__(self, prompts: list[str]):
        self.prompts = prompts

    def __len__(self):
        return len(self.prompts)

    def __getitem__(self, i):
        return {"index": torch.tensor(i)}


def read_prompts(lines: list[str], where: str) -> tuple[list[str], SkipReport]:
    """Stripped prompts in order; blank and repeated lines are counted skips."""
    report, kept, seen = SkipReport(total=len(lines)), [], set()
    for n, line in enumerate(lines, 1):
        p = line.strip()
        if not p:
            report.skip("blank line", f"{where}:{n}")
        elif p in seen:
            report.skip("duplicate prompt", f"{where}:{n}")
        else:
            seen.add(p)
            kept.append(p)
    report.kept = len(kept)
    return kept, report


class DiffusionGRPO(LatentDiffusionMethod):
    config_class = GRPOConfig
    flow_refusal = None  # SD3/FLUX: rollout_flow.py

    def __init__(self, cfg: GRPOConfig, output_dir: str):
        super().__init__(cfg, output_dir)
        m, o, r = cfg.model, cfg.objective, cfg.reward
        if m.reference == "adapters_off" and m.lora_rank == 0:
            raise ConfigError("model.reference: adapters_off needs LoRA (model.lora_rank > 0)")
        if m.dtype != "fp32" and m.lora_rank == 0:
            raise ConfigError(f"model.dtype: {m.dtype!r} only with LoRA (a full fine-tune keeps fp32 weights)")
        if o.train_steps_window > o.sample_steps:
            raise ConfigError(f"objective.train_steps_window: {o.train_steps_window} is more than "
                              f"objective.sample_steps ({o.sample_steps})")
        if o.train_steps_window_start >= 0 and \
                o.train_steps_window_start + (o.train_steps_window or o.sample_steps) > o.sample_steps:
            raise ConfigError(f"objective.train_steps_window_start: {o.train_steps_window_start} + the window "
                              f"({o.train_steps_window or o.sample_steps} steps) runs past objective.sample_steps "
                              f"({o.sample_steps})")
        if not r.weights:
            raise ConfigError("reward.weights: name at least one reward to train on, e.g. {shapeworld: 1.0}")
        if set(r.weights) & set(r.heldout):
            raise ConfigError(f"reward.heldout: {sorted(set(r.weights) & set(r.heldout))} also trained on")
        if not cfg.data.path and not cfg.data.shapeworld_prompts:
            raise ConfigError("data: set data.path (a prompt file) or data.shapeworld_prompts (ShapeWorld captions)")
        self.needs_reference = o.kl_beta > 0
        self.guidance = 1.0 if o.cfg_free_training else o.guidance
        self.buffer: list[torch.Tensor] = []
        self.traj: Trajectory | None = None
        self.last_return: float | None = None

    def build(self, device: torch.device) -> nn.Module:
        from diffusers import DDIMScheduler

        m = self.cfg.model
        policy = build_cond_policy(self, m, device)
        p = self.parts
        if p.is_flow:  # the grid depends on the resolution: dataset()
            self.step_stats, self.step_log_prob = flow_step_stats, flow_step_log_prob
        else:
            config = DDIMScheduler.load_config(m.pretrained, subfolder="scheduler")
            self.grid = ddim_grid(config, self.cfg.objective.sample_steps)
            self.step_stats, self.step_log_prob = step_stats, step_log_prob
        self.decode = vae_decoder(p.vae)
        self.rewards = Rewards(self.cfg.reward.weights, self.cfg.reward.heldout)
        return policy

    def dataset(self) -> tuple[PromptRows, SkipReport]:
        d = self.cfg.data
        if d.path:
            with open(d.path, encoding="utf-8") as f:
                self.prompts, report = read_prompts(f.read().splitlines(), d.path)
        else:
            from ..datasets.shapeworld import sample_scenes
            captions = [s.caption for s in sample_scenes(d.seed, d.shapeworld_prompts, split="train")]
            self.prompts, report = read_prompts(captions, "shapeworld")
        self.require_rows(report, d.path or "data.shapeworld_prompts")
        self.resolution = self.data_resolution()
        if self.parts.is_flow:
            side = self.latent_size() // 2  # 2x2 patches (SD3's patch size, FLUX's packing)
            self.grid = flow_grid(self.parts.noise_scheduler.config, self.cfg.objective.sample_steps, side * side,
                                  self.parts.flow)
        self.empty = self.encode([""])
        return PromptRows(self.prompts), report

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning on the device; SDXL adds time_ids for an uncropped image at the training resolution."""
        cond = {k: v.to(self.device) for k, v in encode_prompts(self.parts, prompts, self.device).items()}
        if self.parts.is_sdxl:
            size = torch.tensor([[self.resolution, self.resolution]] * len(prompts))
            cond["time_ids"] = make_time_ids(size, torch.zeros_like(size), (self.resolution,) * 2).to(self.device)
        return cond

    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.parts.vae.config.block_out_channels) - 1)

    # --- rollout -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, policy: nn.Module, batch: dict) -> dict[str, float]:
        """Sample, score and buffer the batch's prompts × group_size; returns the rollout's metrics."""
        o, rows = self.cfg.objective, RowRandom.of(batch)
        g, s, idx = o.group_size, len(self.grid), batch["index"].tolist()
        prompts = [self.prompts[i] for i in idx for _ in range(g)]
        t0 = time.perf_counter()
        flow, latent = self.parts.is_flow, self.latent_size()
        channels = self.parts.vae.config.latent_channels if flow else self.parts.unet.config.in_channels
        shape = (g, s + 1, channels, latent, latent)
        noise = rows.randn("rollout_noise", shape, self.device)  # [B, G, S+1, ...], per row
        if o.shared_initial_noise:
            noise[:, :, 0] = noise[:, :1, 0]
        noise = noise.flatten(0, 1)
        w = o.train_steps_window or s
        # one window per rollout, drawn from its first row: under DDP/FSDP rank 0's, whose first row is the global
        # batch's, so every rank trains the steps one process would
        drawn = main_process_value(int(rows.randint("window", 0, s - w + 1)[0]), self.device) if w < s else 0
        start = o.train_steps_window_start if o.train_steps_window_start >= 0 else drawn
        self.steps = torch.arange(start, start + w)
        etas = torch.zeros(s)
        etas[self.steps] = o.flow_noise_level if flow else o.eta
        cond = {k: v.repeat_interleave(g, 0) for k, v in self.encode([self.prompts[i] for i in idx]).items()}
        uncond = None if self.guidance == 1 else \
            {k: v.expand(len(prompts), *v.shape[1:]) for k, v in self.empty.items()}
        if flow:
            self.traj = sample_flow_trajectories(policy, cond, uncond, noise, self.grid, etas, self.guidance,
                                                 o.rollout_batch, self.decode)
        else:
            self.traj = sample_trajectories(policy, cond, uncond, noise, self.grid, etas, self.guidance,
                                            self.parts.noise_scheduler.config.prediction_type, o.rollout_batch,
                                            self.decode)
        t1 = time.perf_counter()
        total, metrics = self.rewards(self.traj.images, prompts)
        adv, adv_metrics = group_advantages(total.view(len(idx), g))
        self.adv = adv.flatten().float().to(self.device)
        t2 = time.perf_counter()
        gen = torch.Generator().manual_seed(mix(*[int(x) for x in batch.get("row_seed", batch["index"])]))
        n = len(prompts)
        if n < o.minibatches:
            raise ConfigError(f"objective.minibatches: {o.minibatches} is more than the {n} trajectories of a "
                              f"rollout (batch_size x group_size)")
        self.buffer = [part for _ in range(o.inner_epochs)
                       for part in torch.randperm(n, generator=gen).chunk(o.minibatches)]
        return {**metrics, **adv_metrics, "time/rollout_s": t1 - t0, "time/reward_s": t2 - t1}

    # --- training ------------------------------------------------------------------------------------------

    def step_inputs(self, sel: torch.Tensor, steps: torch.Tensor) -> dict:
        """The stored (x_t, x_prev, the grid's per-step fields (t, ᾱs; flow: σs), η, cond) of trajectories `sel`
        at `steps`, flattened sample-major: keyword arguments of `self.step_log_prob`."""
        tr, k = self.traj, len(steps)
        lat = tr.latents[sel.to(tr.latents.device)]
        per_step = lambda v: v[steps].to(self.device).repeat(len(sel))  # noqa: E731
        per_row = lambda c: None if c is None else \
            {n: v[sel].repeat_interleave(k, 0) for n, v in c.items()}  # noqa: E731
        x = {"x_t": lat[:, steps].flatten(0, 1), "x_prev": lat[:, steps + 1].flatten(0, 1),
             **{name: per_step(v) for name, v in tr.grid.fields().items()}, "eta": per_step(tr.etas),
             "cond": per_row(tr.cond), "uncond": per_row(tr.uncond), "guidance": tr.guidance}
        if not self.parts.is_flow:
            x["kind"] = self.parts.noise_scheduler.config.prediction_type
        return x

    def recompute(self, policy, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """(log-probs [M, K] of the trained steps under `policy`, μ, σ, the inputs): one forward."""
        x = self.step_inputs(sel, self.steps)
        lp, mean, std = self.step_log_prob(policy, **x)
        return lp.view(len(sel), len(self.steps)), mean, std, x

    def loss(self, policy, batch):
        t0 = time.perf_counter()
        if not self.buffer:
            self.rollout_metrics = self.rollout(policy, batch)
        sel = self.buffer.pop(0)
        t1 = time.perf_counter()
        o = self.cfg.objective
        lp, mean, std, x = self.recompute(policy, sel)
        old = self.traj.log_probs[sel][:, self.steps]
        kl = None
        if o.kl_beta:
            x.pop("x_prev")
            ref_mean, _ = self.ref(lambda model: self.step_stats(model, **x))
            kl = gaussian_kl(mean, ref_mean, std).view(lp.shape)
        loss, metrics = grpo_loss(lp, old, self.adv[sel], o.clip_range, kl, o.kl_beta)
        now = time.perf_counter()
        gap = 0.0 if self.last_return is None else max(0.0, t0 - self.last_return)  # last call's backward + step
        self.last_return = now
        r = self.rollout_metrics
        return loss, {"reward_mean": r["reward_mean"], **metrics, **r, "time/update_s": now - t1 + gap}

    def save_pretrained(self, policy: nn.Module, out_dir: str) -> None:
        """A full pipeline directory, or with LoRA the adapter alone in diffusers' format."""
        self.save_image_pipeline(policy.unet, out_dir)
