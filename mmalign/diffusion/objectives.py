"""The pair objectives for diffusion models, each a `DiffusionPreference` with its own `loss`.

| method                   | what the policy sees                                   | loss (losses.py / inversion_dpo.py)|
|--------------------------|--------------------------------------------------------|------------------------------------|
| diffusion_dpo            | one t and noise per pair, shared by winner and loser   | diffusion_dpo_loss                 |
| diffusion_sft_winners    | winners only, plain denoising                          | sft_loss                           |
| diffusion_inpo           | x_t from DDIM inversion of each image by the policy    | diffusion_dpo_loss on inpo_target  |
| diffusion_inversion_dpo  | the reference's deterministic inversion trajectory     | inversion_dpo_loss                 |
| diffusion_cca            | winners under their caption and a rolled caption       | cca_loss                           |
| diffusion_bco            | winners desirable, losers undesirable, unpaired        | bco_loss                           |
"""
from __future__ import annotations

import torch

from ..core.config import ConfigError
from ..core.row_rng import RowRandom, split_pairs
from .inversion import Trajectory, ddim_invert, eps_from_prediction, inversion_grid, inversion_trajectory
from .inversion_dpo import inversion_dpo_loss, inversion_weights, weighted_points
from .losses import bco_loss, cca_loss, diffusion_dpo_loss, inpo_target, per_sample_mse, sft_loss
from .pipeline import diffusion_target
from .preference import DiffusionPreference, cat_cond
from .trajectory_cache import TrajectoryCache


class DiffusionDPO(DiffusionPreference):
    def build(self, device: torch.device):
        policy = super().build(device)
        if self.cfg.objective.flow_error != "velocity" and not self.parts.is_flow:
            raise ConfigError(f"objective.flow_error: {self.cfg.objective.flow_error!r} is for flow (SD3/FLUX) bases; "
                              f"{self.cfg.model.pretrained} predicts noise or v already (leave it at 'velocity')")
        return policy

    def loss(self, policy, batch):
        rows = RowRandom.of(batch)
        lat_w, lat_l, view = self.pair_latents(batch, rows)
        cond_w, cond_l = self.pair_cond(batch, view, rows)
        noise = rows.randn("noise", lat_w.shape[1:], lat_w.device, lat_w.dtype).repeat(2, 1, 1, 1)
        t = self.sample_t(rows, lat_w.device).repeat(2)
        x0 = torch.cat([lat_w, lat_l])
        x_t = self.parts.noise_scheduler.add_noise(x0, noise, t)
        cond = cat_cond(cond_w, cond_l)
        target = diffusion_target(self.parts.noise_scheduler, x0, noise, t)
        err = per_sample_mse(policy(x_t, t, cond), target)  # one forward over [winners; losers]
        ref_err = per_sample_mse(self.ref_forward(x_t, t, cond), target)
        if self.parts.is_flow and self.cfg.objective.flow_error == "epsilon":
            w = (1 - self.parts.noise_scheduler.sigma(t, err)) ** 2
            err, ref_err = err * w, ref_err * w
        return with_sft_term(diffusion_dpo_loss(*err.chunk(2), *ref_err.chunk(2), beta=self.cfg.objective.beta),
                             err.chunk(2)[0], self.cfg.objective.sft_weight)


def with_sft_term(loss_metrics, err_w, weight: float):
    """loss + weight * mean err_theta(winners): keeps the winners' likelihood from falling with the margin."""
    loss, metrics = loss_metrics
    if weight == 0:
        return loss, metrics
    sft = err_w.mean()
    return loss + weight * sft, {**metrics, "dpo_loss": loss.detach(), "sft_err_w": sft.detach()}


class DiffusionSFTWinners(DiffusionPreference):
    needs_reference = False

    def loss(self, policy, batch):
        rows = RowRandom.of(batch)
        lat_w, _, view = self.pair_latents(batch, rows)
        cond_w, _ = self.pair_cond(batch, view, rows)
        noise = rows.randn("noise", lat_w.shape[1:], lat_w.device, lat_w.dtype)
        t = self.sample_t(rows, lat_w.device)
        sched = self.parts.noise_scheduler
        pred = policy(sched.add_noise(lat_w, noise, t), t, cond_w)
        return sft_loss(per_sample_mse(pred, diffusion_target(sched, lat_w, noise, t)))


class EpsModel:
    """Adapts a policy/reference call to the eps-predictor interface of inversion.py."""

    def __init__(self, fn, cond, prediction_type, abar):
        self.fn, self.cond, self.kind, self.abar = fn, cond, prediction_type, abar

    def __call__(self, x, t, rows=None):
        cond = self.cond if rows is None else {k: v[rows] for k, v in self.cond.items()}
        return eps_from_prediction(self.kind, self.fn(x, t, cond), x, t, self.abar)


class InPO(DiffusionPreference):
    """Each image's x_t is its DDIM inversion by the current policy (no grad, conditioned, no CFG), through the
    inverse grid below each pair's own t; the target is the noise that explains x_t given x0."""

    flow_refusal = ("InPO inverts images with DDIM steps and re-parametrises the noise target with the alpha-bar "
                    "schedule of an epsilon/v-prediction UNet; a rectified-flow model has neither. Use diffusion_dpo, "
                    "diffusion_sft_winners, diffusion_cca or diffusion_bco")

    def loss(self, policy, batch):
        o, sched = self.cfg.objective, self.parts.noise_scheduler
        rows = RowRandom.of(batch)
        lat_w, lat_l, view = self.pair_latents(batch, rows)
        cond = cat_cond(*self.pair_cond(batch, view, rows))
        grid = inversion_grid(sched.config.num_train_timesteps, o.inversion_grid_steps)
        t = self.sample_t(rows, self.device, low=int(grid[0])).repeat(2)  # one t per pair, above the grid's start
        x0 = torch.cat([lat_w, lat_l])
        noise = split_pairs(rows.randn("inversion_noise", (2, len(grid) + 1, *x0.shape[1:]), x0.device)) \
            if o.inversion_noise else None  # each image its own
        with torch.no_grad():
            eps_policy = EpsModel(policy, cond, sched.config.prediction_type, self.abar)
            x_t = ddim_invert(eps_policy, x0, t, self.abar, grid, noise_scale=o.inversion_noise, noise=noise,
                              rows_aware=True)
        eps_hat = inpo_target(x_t, x0, self.abar[t])
        target = diffusion_target(sched, x0, eps_hat, t)
        err = per_sample_mse(policy(x_t, t, cond), target)
        ref_err = per_sample_mse(self.ref_forward(x_t, t, cond), target)
        return with_sft_term(diffusion_dpo_loss(*err.chunk(2), *ref_err.chunk(2), beta=o.beta), err.chunk(2)[0],
                             o.sft_weight)


class InversionDPO(DiffusionPreference):
    """The reference's deterministic DDIM inversion (inversion_steps) of both images; the policy is evaluated at
    the stored points (all, or inversion_points of them per pair) with per-step activation checkpointing (memory
    flat in the number of steps). inversion_cache_mb > 0 inverts posterior means once and reuses them."""

    flow_refusal = ("Inversion-DPO replays the reference's DDIM inversion, weighted by 1/(2 alpha-bar_t) of an "
                    "epsilon/v-prediction schedule; a rectified-flow model has neither. Use diffusion_dpo, "
                    "diffusion_sft_winners, diffusion_cca or diffusion_bco")

    def __init__(self, cfg, output_dir: str):
        super().__init__(cfg, output_dir)
        o = cfg.objective
        if o.inversion_points > o.inversion_steps:
            raise ConfigError(f"objective.inversion_points ({o.inversion_points}) cannot exceed "
                              f"objective.inversion_steps ({o.inversion_steps})")
        self.trajectories = TrajectoryCache(o.inversion_cache_mb * 2 ** 20) if o.inversion_cache_mb else None

    def loss(self, policy, batch):
        o, sched = self.cfg.objective, self.parts.noise_scheduler
        rows = RowRandom.of(batch)
        lat_w, lat_l, view = self.pair_latents(batch, rows, posterior_mean=self.trajectories is not None)
        cond_w, cond_l = self.pair_cond(batch, view, rows)
        kind, n = sched.config.prediction_type, len(lat_w)
        both, x0 = cat_cond(cond_w, cond_l), torch.cat([lat_w, lat_l])

        def invert(idx):  # the reference's trajectories of rows idx, winners and losers in one batch
            return inversion_trajectory(EpsModel(self.ref_forward, {k: v[idx] for k, v in both.items()}, kind,
                                                 self.abar), x0[idx], self.abar, o.inversion_steps,
                                        sched.config.num_train_timesteps)
        traj = invert(torch.arange(len(x0), device=x0.device)) if self.trajectories is None \
            else self.trajectories.get(x0, both, invert)
        traj_w, traj_l = (Trajectory(traj.xs[:, k], traj.ts, traj.eps_ref[:, k]) for k in (slice(0, n), slice(n, None)))
        points = None
        if o.inversion_points:  # drawn with probability w~_i / N, the same for a pair's winner and loser
            points = weighted_points(inversion_weights(self.abar, traj.ts),
                                     rows.rand("inversion_points", lat_w.device, (o.inversion_points,)))
        policy_eps = EpsModel(policy, both, kind, self.abar)
        loss, metrics = inversion_dpo_loss(policy_eps, traj_w, traj_l, lat_w, lat_l, self.abar, beta=o.beta,
                                           points=points, drawn_by_weight=points is not None)
        if self.trajectories is not None:
            metrics.update({k: torch.tensor(v) for k, v in self.trajectories.stats().items()})
        return loss, metrics


class DiffusionCCA(DiffusionPreference):
    """Winners under their own caption (positives; a share under the empty caption) and under the caption of
    the next pair (negatives, captions rolled by one, SDXL pooled embeds with them, time_ids kept); one shared
    t and noise per image for policy, reference, positive and negative."""

    def loss(self, policy, batch):
        o, sched = self.cfg.objective, self.parts.noise_scheduler
        rows = RowRandom.of(batch)
        lat, _, view = self.pair_latents(batch, rows)
        pos, _ = self.pair_cond(batch, view, rows)
        n = len(lat)
        if n < 2:
            raise ValueError("diffusion_cca needs batch_size >= 2 (negatives are the other rows' captions)")
        neg = {k: (v if k == "time_ids" else v.roll(-1, dims=0)) for k, v in pos.items()}
        # null-condition positives (time_ids kept); a draw of its own, apart from caption_dropout
        pos = self.drop_captions(pos, o.cca_uncond_ratio, rows, "cca_uncond")
        noise = rows.randn("noise", lat.shape[1:], lat.device, lat.dtype).repeat(2, 1, 1, 1)
        t = self.sample_t(rows, lat.device).repeat(2)
        x0 = lat.repeat(2, 1, 1, 1)
        x_t = sched.add_noise(x0, noise, t)
        cond = cat_cond(pos, neg)
        target = diffusion_target(sched, x0, noise, t)
        err = per_sample_mse(policy(x_t, t, cond), target)
        ref_err = per_sample_mse(self.ref_forward(x_t, t, cond), target)
        e_pos, e_neg = err.chunk(2)
        r_pos, r_neg = ref_err.chunk(2)
        return cca_loss(e_pos, r_pos, e_neg, r_neg, beta=o.beta, lam=o.cca_lambda)


class DiffusionBCO(DiffusionPreference):
    """Unpaired: every winner is a thumbs-up sample, every loser a thumbs-down one, each with its own t and
    noise; delta is the running mean of the implicit rewards."""

    def __init__(self, cfg, output_dir):
        super().__init__(cfg, output_dir)
        self.delta = 0.0

    def loss(self, policy, batch):
        o, sched = self.cfg.objective, self.parts.noise_scheduler
        rows = RowRandom.of(batch)
        lat_w, lat_l, view = self.pair_latents(batch, rows)
        cond = cat_cond(*self.pair_cond(batch, view, rows))
        x0 = torch.cat([lat_w, lat_l])
        noise = split_pairs(rows.randn("noise", (2, *x0.shape[1:]), x0.device, x0.dtype))  # each image its own
        t = split_pairs(self.sample_t(rows, x0.device, shape=(2,)))
        x_t = sched.add_noise(x0, noise, t)
        target = diffusion_target(sched, x0, noise, t)
        err = per_sample_mse(policy(x_t, t, cond), target)
        ref_err = per_sample_mse(self.ref_forward(x_t, t, cond), target)
        label = torch.cat([torch.ones(len(lat_w)), torch.zeros(len(lat_l))]).to(err)
        loss, metrics = bco_loss(err, ref_err, label, beta=o.beta, delta=self.delta)
        self.delta = o.bco_delta_decay * self.delta + (1 - o.bco_delta_decay) * float(metrics["reward_mean"])
        return loss, {**metrics, "delta": self.delta}

