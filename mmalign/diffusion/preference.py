"""Preference training of SD1.5/SDXL-format pipelines, and of SD3/FLUX (rectified flow, flow.py: the transformer in the
UNet's place, velocity errors in place of noise errors), from pairs: the shared machinery (models, reference,
cached pair tensors, per-pair augmentation, export). The objectives live in `objectives.py`.

Every method trains the UNet (full or LoRA) against frozen, cached text and image encodings; one recipe key,
`method:`, picks the objective. The reference is a frozen copy or the policy with its adapters off.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..core.config import ConfigError, bounded, not_identity
from ..core.row_rng import RowRandom
from ..datasets.records import SkipReport
from .latent_method import LatentDiffusionMethod, UNetPolicy
from .lora import ATTENTION_PROJECTIONS, add_lora
from .pair_tensors import PairTensors, build_pair_tensors
from .flow import FLOW_ATTENTION_PROJECTIONS
from .pipeline import LatentChoice, denoise, input_dtype, make_time_ids

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class PrefModelConfig:
    pretrained: str  # pipeline directory or hub id (SD1.5-, SDXL-, SD3- or FLUX-format; detected)
    lora_rank: int = bounded(0, 0)  # 0: full fine-tune of the UNet
    lora_alpha: int = bounded(0, 0)  # 0: same as rank
    # module-name suffixes; the default on SD3/FLUX also takes the joint attention's add_{q,k,v}_proj, to_add_out
    lora_targets: list[str] = field(default_factory=lambda: list(ATTENTION_PROJECTIONS))
    reference: Literal["frozen_copy", "adapters_off"] = "frozen_copy"  # adapters_off needs lora_rank > 0
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # frozen weights' dtype; below fp32 LoRA only (adapters, VAE fp32)


@dataclass
class PairDataConfig:
    path: str  # Pick-a-Pic-format pairs: jsonl / parquet / folder / HF datasets dir or hub id
    resolution: int = bounded(0, 0)  # 0: the model's native resolution
    ties: Literal["drop", "error"] = "drop"  # drop: counted
    bad_rows: Literal["skip", "error"] = "skip"  # skip: counted, reported
    caption_dropout: float = bounded(0.0, 0, 1)  # per pair: both images lose the caption together (Salesforce: 0.2)
    random_flip: bool = False  # per pair: both images flipped together
    latents: LatentChoice = "auto"  # VAE posterior samples or means (pipeline.LatentChoice)
    cache_dir: str = not_identity(".cache/mmalign")  # encoded pairs (sharded); "": <output_dir>/data_cache, this run's
    encode_batch: int = bounded(8, 1, identity=False)  # pairs per VAE call (x2 images, x2 again with flips): mind 1024 px
    # source rows per cache shard (in the cache key): memory while encoding ~ (1 + 2 x encode_workers) shards of pixels
    shard_rows: int = bounded(256, 1, identity=False)  # (6 MB a pair at 1024 px): lower it for 1024 px
    encode_workers: int = bounded(0, 0, identity=False)  # processes decoding images while the main one encodes


@dataclass
class ObjectiveConfig:
    """Knobs of the objectives; each method reads the ones it documents."""
    # DPO-family temperature, SDXL/Salesforce convention (diffusers' SD1.5 example: 2x ours)
    beta: float = bounded(5000.0, 0, lo_open=True)
    sft_weight: float = bounded(0.0, 0)  # DPO/InPO: + sft_weight * err_theta(winner) (RPO-style anchor on winners)
    cca_lambda: float = bounded(1.0, 0)  # CCA: weight of the mismatched-caption term (plays the role of the CFG scale)
    cca_uncond_ratio: float = bounded(0.1, 0, 1)  # CCA: share of positives trained on the empty caption
    inversion_grid_steps: int = bounded(10, 1)  # InPO: inverse DDIM grid 1, 101, ..., 901
    inversion_noise: float = bounded(0.1, 0)  # InPO: noise after each inverse step, x DDIM(eta=1) sigma; 0: none
    inversion_steps: int = bounded(40, 1)  # Inversion-DPO: DDIM inversion steps with the reference
    # Inversion-DPO: points per pair the policy is scored at, drawn each step by the steps' weights; 0: all of them
    inversion_points: int = bounded(0, 0)
    # Inversion-DPO: keep the reference's trajectories of posterior-MEAN latents in memory up to this size, reused
    # every epoch (trajectory_cache.py); 0: invert a fresh posterior sample every step
    inversion_cache_mb: int = bounded(0, 0)
    # Diffusion-DPO on a flow model: errors of the velocity, or of the noise it implies ((1 - sigma)^2 x the
    # velocity error: SD's epsilon weighting; a timestep-dependent beta in Flow-DPO's terms)
    flow_error: Literal["velocity", "epsilon"] = "velocity"
    bco_delta_decay: float = bounded(0.99, 0, 1, hi_open=True)  # BCO: running mean of rewards, delta


@dataclass
class PreferenceConfig:
    model: PrefModelConfig
    data: PairDataConfig
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)


class CondUNet(UNetPolicy):
    """The policy: a UNet called with a conditioning dict (ctx, and for SDXL pooled + time_ids)."""

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return denoise(self.unet, x_t.to(input_dtype(self.unet)), t, cond)  # a bf16/fp16 frozen base


def build_cond_policy(method: LatentDiffusionMethod, m: PrefModelConfig, device: torch.device) -> CondUNet:
    """`method`'s pipeline loaded (`load_parts`), LoRA added when m.lora_rank > 0 (flow pipelines default to the
    joint attention's projections as well), the denoiser wrapped as the policy and the reference attached on
    `device`. Shared by the pair methods and GRPO."""
    p = method.load_parts(m.pretrained, device, DTYPES[m.dtype])
    if m.lora_rank > 0:
        flow_default = p.is_flow and m.lora_targets == ATTENTION_PROJECTIONS  # + joint attention's text stream
        add_lora(p.unet, m.lora_rank, m.lora_alpha, FLOW_ATTENTION_PROJECTIONS if flow_default else m.lora_targets)
        for q in p.unet.parameters():
            if q.requires_grad:
                q.data = q.data.float()  # trainable adapters in fp32 over a low-precision frozen base
    policy = CondUNet(p.unet)
    method.attach_reference(m.reference, policy)
    if method.ref is not None and hasattr(method.ref, "model"):
        method.ref.model.to(device)
    return policy


class DiffusionPreference(LatentDiffusionMethod):
    """Base of the pair methods; a subclass defines `loss(policy, batch)` (see objectives.py)."""

    config_class = PreferenceConfig
    needs_reference = True
    flow_refusal = None  # SD3/FLUX train through the same path (see objectives.py for the ones that refuse)

    def __init__(self, cfg: PreferenceConfig, output_dir: str):
        super().__init__(cfg, output_dir)
        m = cfg.model
        if m.reference == "adapters_off" and m.lora_rank == 0:
            raise ConfigError("model.reference: adapters_off needs LoRA (model.lora_rank > 0)")
        if m.dtype != "fp32" and m.lora_rank == 0:
            raise ConfigError(f"model.dtype: {m.dtype!r} only with LoRA (a full fine-tune keeps fp32 master weights; "
                              f"use train.mixed_precision)")

    def build(self, device: torch.device) -> nn.Module:
        policy = build_cond_policy(self, self.cfg.model, device)
        p = self.parts
        self.abar = None if p.is_flow else p.noise_scheduler.alphas_cumprod.to(device)  # DDIM inversion's
        return policy

    def dataset(self) -> tuple[PairTensors, SkipReport]:
        d = self.cfg.data
        res = self.data_resolution()
        cache = d.cache_dir or os.path.join(self.output_dir, "data_cache")  # never in memory: 1 M pairs are ~1 TB
        self.data, report = build_pair_tensors(self.parts, d.path, res, d.random_flip, d.ties, d.bad_rows,
                                               self.device, cache, d.encode_batch, shard_rows=d.shard_rows,
                                               encode_workers=d.encode_workers)
        self.resolution = res
        self.empty = self.data.empty_cond()
        for enc in self.encoders():  # everything they produce is cached: free the accelerator's memory
            enc.to("cpu")
        return self.data, report

    # --- per-pair augmentation and conditioning ------------------------------------------------------------

    def pair_latents(self, batch: dict, rows: RowRandom | None = None, posterior_mean: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fresh posterior samples of winner and loser (`posterior_mean`: the means), both in the same
        orientation; returns the view too. `rows`: the batch's RowRandom (default: a new one from `batch`)."""
        rows = RowRandom.of(batch) if rows is None else rows
        n, views = batch["mean_w"].shape[:2]
        view = rows.randint("view", 0, views, batch["mean_w"].device)
        pick = lambda x: x[torch.arange(n, device=x.device), view]  # noqa: E731
        lat = []
        for s in ("w", "l"):
            std = pick(batch[f"std_{s}"])
            lat.append(self.sample_latents(pick(batch[f"mean_{s}"]), torch.zeros_like(std) if posterior_mean else std,
                                           rows, f"latent_{s}"))
        return lat[0], lat[1], view

    def pair_cond(self, batch: dict, view: torch.Tensor, rows: RowRandom | None = None) -> tuple[dict, dict]:
        """(cond of winners, cond of losers): the same caption (dropped for both with caption_dropout) and, for
        SDXL, each image's own original size and crop. `rows`: as in `pair_latents`."""
        rows = RowRandom.of(batch) if rows is None else rows
        n = len(view)
        cond = self.drop_captions({k: batch[k] for k in ("ctx", "pooled") if k in batch},
                                  self.cfg.data.caption_dropout, rows)
        if not self.parts.is_sdxl:  # SD1.5, SD3, FLUX: no size/crop conditioning
            return cond, dict(cond)
        target = (self.resolution, self.resolution)
        idx = torch.arange(n, device=view.device)
        ids = [make_time_ids(batch[f"size_{s}"], batch[f"crop_{s}"][idx, view], target).to(cond["ctx"])
               for s in ("w", "l")]
        return {**cond, "time_ids": ids[0]}, {**cond, "time_ids": ids[1]}

    # --- export --------------------------------------------------------------------------------------------

    def save_pretrained(self, policy: nn.Module, out_dir: str) -> None:
        """A full pipeline directory, or with LoRA the adapter alone in diffusers' format
        (`pipe.load_lora_weights(out_dir)`)."""
        self.save_image_pipeline(policy.unet, out_dir)


def cat_cond(*conds: dict) -> dict:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
