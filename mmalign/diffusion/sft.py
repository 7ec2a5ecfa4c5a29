"""Supervised fine-tuning of a StableDiffusionPipeline-format model on (image, caption) pairs.

The plain denoising objective (see `losses.sft_loss`). Images are encoded by the VAE once, when the dataset
is built (posterior mean and std are cached; a fresh latent sample is drawn each step), and prompts are
encoded once when the text encoder is frozen: training never runs the VAE encoder again.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..core.config import bounded, not_identity
from ..core.row_rng import RowRandom
from ..datasets.records import SkipReport
from .caption_tensors import CachedLatents, build_caption_latents
from .latent_method import LatentDiffusionMethod, UNetPolicy
from .lora import ATTENTION_PROJECTIONS, add_lora
from .losses import per_sample_mse, sft_loss
from .pipeline import LatentChoice, diffusion_target, tokenize


@dataclass
class ModelConfig:
    pretrained: str  # pipeline directory or hub id
    train_text_encoder: bool = False
    lora_rank: int = bounded(0, 0)  # 0: full fine-tune of the UNet
    lora_alpha: int = bounded(0, 0)  # 0: same as rank
    lora_targets: list[str] = field(default_factory=lambda: list(ATTENTION_PROJECTIONS))


@dataclass
class DataConfig:
    path: str  # imagefolder: metadata.jsonl with file_name, text
    resolution: int = bounded(0, 0)  # 0: the model's native resolution
    caption_dropout: float = bounded(0.0, 0, 1)  # probability of training on the empty prompt (for CFG)
    random_flip: bool = False  # off by default: a flip contradicts "left of" captions
    latents: LatentChoice = "auto"  # VAE posterior samples or means (pipeline.LatentChoice)
    bad_rows: Literal["skip", "error"] = "skip"  # skip: counted, reported
    encode_batch: int = bounded(32, 1, identity=False)  # images per VAE call
    cache_dir: str = not_identity("")  # the encoded cache; "": <output_dir>/data_cache
    shard_rows: int = bounded(256, 1, identity=False)  # source rows per shard of the encoded cache (in its key)
    encode_workers: int = bounded(0, 0, identity=False)  # processes decoding images while the main one encodes


@dataclass
class SFTConfig:
    model: ModelConfig
    data: DataConfig


class Denoiser(UNetPolicy):
    """The trainable policy: UNet, plus the text encoder when it is trained too."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None):
        super().__init__(unet)
        self.text_encoder = text_encoder

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        ctx = self.text_encoder(text)[0] if self.text_encoder is not None else text
        return self.unet(noisy, t, ctx).sample


class DiffusionSFT(LatentDiffusionMethod):
    """Method object for the core trainer (see mmalign.core.method.Method)."""

    config_class = SFTConfig

    def build(self, device: torch.device) -> nn.Module:
        m = self.cfg.model
        p = self.load_parts(m.pretrained, device)
        if m.train_text_encoder:
            p.text_encoder.requires_grad_(True)
        if m.lora_rank > 0:
            add_lora(p.unet, m.lora_rank, m.lora_alpha, m.lora_targets)
        return Denoiser(p.unet, p.text_encoder if m.train_text_encoder else None)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Token ids when the text encoder trains, else its embeddings (computed once, kept on the CPU)."""
        ids = tokenize(self.parts.tokenizer, captions)
        if self.cfg.model.train_text_encoder:
            return ids
        te = self.parts.text_encoder
        return torch.cat([te(ids[i:i + 256].to(self.device))[0].cpu() for i in range(0, len(ids), 256)])

    def dataset(self) -> tuple[CachedLatents, SkipReport]:
        """Rows read lazily from a sharded cache in data.cache_dir or <output_dir>/data_cache (`caption_tensors`):
        mean, std and text (embeddings, or token ids when the text encoder trains); with random_flip, each image's
        two orientations are rows 2k, 2k + 1."""
        d, p = self.cfg.data, self.parts
        res = self.data_resolution()
        data, report = build_caption_latents(
            p, d.path, res, d.random_flip, d.bad_rows, "ids" if self.cfg.model.train_text_encoder else "embeddings",
            self.encode_text, self.device, d.cache_dir or os.path.join(self.output_dir, "data_cache"), d.encode_batch,
            d.shard_rows, d.encode_workers)
        self.require_rows(report, d.path)
        self.empty = {"text": self.encode_text([""])[0]}
        return data, report

    def loss(self, policy: nn.Module, batch: dict):
        sched, rows = self.parts.noise_scheduler, RowRandom.of(batch)  # per-row draws (core.row_rng)
        latents = self.sample_latents(batch["mean"], batch["std"], rows)
        text = self.drop_captions({"text": batch["text"]}, self.cfg.data.caption_dropout, rows)["text"]
        noise = rows.randn("noise", latents.shape[1:], latents.device, latents.dtype)
        t = self.sample_t(rows, latents.device)
        pred = policy(sched.add_noise(latents, noise, t), t, text)
        return sft_loss(per_sample_mse(pred, diffusion_target(sched, latents, noise, t)))

    def save_pretrained(self, policy: nn.Module, out_dir: str) -> None:
        """A full pipeline directory (loads with StableDiffusionPipeline.from_pretrained); with LoRA, the
        adapter alone in diffusers' LoRA format (loads with pipe.load_lora_weights(out_dir))."""
        te = policy.text_encoder
        self.save_image_pipeline(policy.unet, out_dir, text_encoder=te if te is not None else self.parts.text_encoder)
