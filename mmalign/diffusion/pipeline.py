"""Loading StableDiffusionPipeline-format components (local directory or hub id, same code path) and
encoding prompts."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel


@dataclass
class SDComponents:
    source: str
    tokenizer: object
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler  # the training-time forward process, from the pipeline's scheduler config

    @property
    def resolution(self) -> int:
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)


def load_sd_components(source: str, dtype: torch.dtype = torch.float32) -> SDComponents:
    """Load tokenizer, text encoder, VAE, UNet and scheduler from a pipeline directory or hub id.

    The VAE stays in fp32 whatever `dtype` is (fp16 VAEs overflow); the scheduler used for training is a
    DDPMScheduler built from the pipeline's own scheduler config (same betas, prediction type)."""
    if "/" not in source and not Path(source).exists():
        raise FileNotFoundError(f"pipeline not found: {source!r} is neither a directory nor a hub id (owner/name)")
    if Path(source).exists() and not (Path(source) / "model_index.json").is_file():
        raise FileNotFoundError(f"{source} is not a diffusers pipeline directory (no model_index.json)")
    tok = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype)
    sched = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    return SDComponents(source, tok, te, vae, unet, sched)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def diffusion_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict: the noise (epsilon) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")
