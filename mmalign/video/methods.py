"""Video methods for the core trainer: temporal-layer training and Video Diffusion-DPO on an image SD pipeline
inflated with motion modules (temporal.py).

Both encode every clip once (the image VAE, frame by frame; posterior mean and std cached as (C, F, h, w)) and
every caption once (the frozen text encoder), into a sharded on-disk cache read lazily (video/data.py). A step
draws one t per video and noise of the video's shape.

| method         | data                                   | loss                                                    |
|----------------|----------------------------------------|---------------------------------------------------------|
| video_temporal | (caption, clip)                        | sft_loss: err = mean over (C, F, H, W) of (pred - eps)^2 |
| video_dpo      | (caption, preferred clip, rejected)    | diffusion_dpo_loss on per-video errors over (C, F, H, W),|
|                |                                        | ONE t and noise per pair shared by both videos           |

The Video-DPO reference is the model before DPO: a frozen copy of the trainable parts (core.reference's
`SharedFrozenCopy`: the frozen image weights are shared, not duplicated) or, when the video model trains through
LoRA, the policy with its adapters off.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..core.config import ConfigError, bounded, not_identity
from ..core.row_rng import RowRandom
from ..datasets.records import SkipReport
from ..diffusion.latent_method import LatentDiffusionMethod, UNetPolicy
from ..diffusion.lora import add_lora
from ..diffusion.losses import diffusion_dpo_loss, per_sample_mse, sft_loss
from ..diffusion.pipeline import LatentChoice, diffusion_target, encode_prompts
from .temporal import LORA_PLACEMENTS, MotionSpec, add_alpha_blend, inflate, repeat_per_frame, set_trainable


@dataclass
class VideoModelConfig:
    pretrained: str  # SD1.5-format image pipeline (directory or hub id); its weights stay frozen
    motion_adapter: str = ""  # MotionAdapter directory or hub id; "" = fresh, sized to the UNet, outputs zeroed
    motion_heads: int = bounded(8, 1)  # fresh adapter: heads per motion module
    motion_layers: int = bounded(1, 1)  # fresh adapter: temporal transformer layers per motion module
    max_frames: int = bounded(32, 1)  # fresh adapter: frame-position table length
    blend: Literal["none", "alpha"] = "none"  # alpha (Video-LDM): alpha*z_spatial + (1-alpha)*z_temporal, learned
    alpha_init: float = bounded(0.5, 0, 1, lo_open=True, hi_open=True)  # blend: alpha; learned as sigmoid(param)
    train_motion: bool = True  # the motion modules' own weights train (false: only LoRA / alpha)
    lora_rank: int = bounded(0, 0)  # 0: no LoRA
    lora_where: Literal["spatial", "cross", "temporal", "both"] = "spatial"  # temporal.LORA_PLACEMENTS
    reference: Literal["frozen_copy", "adapters_off"] = "frozen_copy"  # video_dpo; adapters_off: LoRA-only training


@dataclass
class VideoDataConfig:
    path: str = ""  # video_temporal: metadata.jsonl folder (file_name: clip, text); video_dpo: read_video_pairs
    shapeworld_clips: int = bounded(0, 0)  # video_temporal without `path`: this many ShapeWorld clips (sample_clip)
    seed: int = bounded(0, 0)  # ShapeWorld clips' seed
    num_frames: int = bounded(8, 1)
    resolution: int = bounded(0, 0)  # 0: the model's native resolution
    caption_dropout: float = bounded(0.0, 0, 1)  # per video (per pair for DPO: both videos together)
    latents: LatentChoice = "auto"  # VAE posterior samples or means (pipeline.LatentChoice)
    ties: Literal["drop", "error"] = "drop"
    bad_rows: Literal["skip", "error"] = "skip"
    encode_batch: int = bounded(64, 1, identity=False)  # frames per VAE call
    cache_dir: str = not_identity("")  # the encoded clips' sharded cache; "": <output_dir>/data_cache
    shard_rows: int = bounded(32, 1, identity=False)  # source rows per cache shard (cache key); decoded at once
    encode_workers: int = bounded(0, 0, identity=False)  # processes decoding clips while the main one encodes


@dataclass
class VideoObjectiveConfig:
    beta: float = bounded(5000.0, 0, lo_open=True)  # Diffusion-DPO, SDXL/Salesforce convention (the 1/2 inside)


@dataclass
class VideoConfig:
    model: VideoModelConfig
    data: VideoDataConfig = field(default_factory=VideoDataConfig)
    objective: VideoObjectiveConfig = field(default_factory=VideoObjectiveConfig)


class VideoDenoiser(UNetPolicy):
    """The policy: video latents (B, C, F, h, w), one timestep per video (B,), captions (B, L, D)."""

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, repeat_per_frame(ctx.to(x_t), x_t.shape[2])).sample


class VideoMethod(LatentDiffusionMethod):
    """Shared machinery (models, what trains, reference, caches, export); a subclass defines `dataset()` and
    `loss(policy, batch)`. `data`: in-memory rows instead of `cfg.data` (see the subclasses)."""

    config_class = VideoConfig

    def __init__(self, cfg: VideoConfig, output_dir: str, data: list | None = None):
        super().__init__(cfg, output_dir)
        self.data = data
        self.text_source = ""  # the motion adapter directory whose text_encoder/ replaced the base's, if any
        m = cfg.model
        if m.reference == "adapters_off" and self.needs_reference and (m.lora_rank == 0 or m.train_motion
                                                                       or m.blend != "none"):
            raise ConfigError("model.reference: adapters_off needs everything that trains to be LoRA "
                              "(model.lora_rank > 0, model.train_motion: false, model.blend: none)")
        if not (m.train_motion or m.lora_rank or m.blend != "none"):
            raise ConfigError("nothing would train: set model.train_motion, model.lora_rank or model.blend")

    def build(self, device: torch.device) -> nn.Module:
        from diffusers import MotionAdapter

        m = self.cfg.model
        p = self.load_parts(m.pretrained, device)
        adapter = MotionAdapter.from_pretrained(m.motion_adapter) if m.motion_adapter else None
        if m.motion_adapter:
            from .sampling import shipped_spatial_unet
            from .text import shipped_text_encoder

            p.unet = shipped_spatial_unet(m.motion_adapter) or p.unet  # the adapter's own (fused) image UNet
            te = shipped_text_encoder(m.motion_adapter)  # the video model's own text encoder (frozen here)
            if te is not None:
                p.text_encoder = te.to(device).requires_grad_(False).eval()
                self.text_source = m.motion_adapter
        unet = inflate(p.unet, adapter, MotionSpec(m.motion_heads, m.motion_layers, m.max_frames))
        if m.blend == "alpha":
            add_alpha_blend(unet, m.alpha_init, learned=True)
        if m.lora_rank:
            add_lora(unet, m.lora_rank, targets=LORA_PLACEMENTS[m.lora_where])
        self.trainable = set_trainable(unet, motion=m.train_motion)
        policy = VideoDenoiser(unet)
        # the frozen copy shares the frozen image weights with the policy instead of duplicating them
        self.attach_reference("adapters_off" if m.reference == "adapters_off" else "shared_frozen_copy", policy)
        return policy

    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        """Text embeddings (N, L, D) of `captions` (and the empty caption's, for caption dropout)."""
        self.empty = {"ctx": encode_prompts(self.parts, [""], self.device)["ctx"][0]}
        return encode_prompts(self.parts, captions, self.device)["ctx"]

    @functools.cached_property
    def resolution(self) -> int:
        return self.data_resolution()  # checked once, after the models load

    def latents(self, batch: dict, rows: RowRandom, side: str = "") -> torch.Tensor:
        """A fresh posterior sample, scaled: (B, C, F, h, w) (draw "latent<side>")."""
        return self.sample_latents(batch[f"mean{side}"], batch[f"std{side}"], rows, f"latent{side}")

    def captions(self, batch: dict, rows: RowRandom) -> torch.Tensor:
        return self.drop_captions({"ctx": batch["ctx"]}, self.cfg.data.caption_dropout, rows)["ctx"]

    def save_pretrained(self, policy: nn.Module, out_dir: str) -> None:
        """`out_dir/motion_adapter` (MotionAdapter; with the video model's own text encoder when it has one) and
        `out_dir/pipeline` (AnimateDiffPipeline directory)."""
        from .sampling import save_video_model

        save_video_model(self.cfg.model.pretrained, policy.unet, out_dir, text_encoder=self.parts.text_encoder)


class VideoTemporalTraining(VideoMethod):
    """Denoising loss on video latents; only the temporal parameters (motion modules, alpha, LoRA) train.
    In-memory data: `data=[(caption, frames), ...]`."""

    def dataset(self) -> tuple[torch.utils.data.Dataset, SkipReport]:
        """Rows {mean, std, ctx}: sharded on disk, or TensorRows for in-memory data (video/data.py)."""
        from .data import temporal_dataset

        return temporal_dataset(self)

    def loss(self, policy, batch):
        rows = RowRandom.of(batch)  # per-row draws (core.row_rng)
        x0 = self.latents(batch, rows)
        noise = rows.randn("noise", x0.shape[1:], x0.device, x0.dtype)
        t = self.sample_t(rows, x0.device)
        sched = self.parts.noise_scheduler
        pred = policy(sched.add_noise(x0, noise, t), t, self.captions(batch, rows))
        return sft_loss(per_sample_mse(pred, diffusion_target(sched, x0, noise, t)))


def video_dpo_errors(policy_fn, ref_fn, scheduler, lat_w: torch.Tensor, lat_l: torch.Tensor, ctx: torch.Tensor,
                     t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-video errors (policy, reference), each [2B] = [winners; losers], at the pair's shared t (B,) and noise
    (B, C, F, h, w): err = mean over (C, F, H, W) of (pred - target)^2. One policy call over both halves."""
    x0 = torch.cat([lat_w, lat_l])
    eps, tt, cc = noise.repeat(2, 1, 1, 1, 1), t.repeat(2), ctx.repeat(2, 1, 1)
    x_t = scheduler.add_noise(x0, eps, tt)
    target = diffusion_target(scheduler, x0, eps, tt)
    return per_sample_mse(policy_fn(x_t, tt, cc), target), per_sample_mse(ref_fn(x_t, tt, cc), target)


class VideoDiffusionDPO(VideoMethod):
    """Video Diffusion-DPO. Data: `data.path` read by `mmalign.datasets.video.read_video_pairs`, or in memory
    `data=[(caption, frames_w, frames_l), ...]`."""

    needs_reference = True

    def dataset(self) -> tuple[torch.utils.data.Dataset, SkipReport]:
        """Rows {mean_w, std_w, mean_l, std_l, ctx}: sharded on disk, or TensorRows for in-memory data."""
        from .data import pair_dataset

        return pair_dataset(self)

    def loss(self, policy, batch):
        rows = RowRandom.of(batch)  # per-row draws (core.row_rng)
        lat_w, lat_l = self.latents(batch, rows, "_w"), self.latents(batch, rows, "_l")
        t = self.sample_t(rows, lat_w.device)
        noise = rows.randn("noise", lat_w.shape[1:], lat_w.device, lat_w.dtype)  # shared by the pair
        err, ref_err = video_dpo_errors(policy, self.ref_forward, self.parts.noise_scheduler,
                                        lat_w, lat_l, self.captions(batch, rows), t, noise)
        return diffusion_dpo_loss(*err.chunk(2), *ref_err.chunk(2), beta=self.cfg.objective.beta)

