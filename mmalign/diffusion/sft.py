"""Supervised fine-tuning of a StableDiffusionPipeline-format model on (image, caption) pairs.

The plain denoising objective (see `losses.sft_loss`). Images are encoded by the VAE once, when the dataset
is built (posterior mean and std are cached; a fresh latent sample is drawn each step), and prompts are
encoded once when the text encoder is frozen: training never runs the VAE encoder again.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import v2 as T

from ..datasets.records import SkipReport, open_rgb, read_caption_folder
from .losses import per_sample_mse, sft_loss
from .pipeline import SDComponents, diffusion_target, load_sd_components, tokenize

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class ModelConfig:
    pretrained: str  # pipeline directory or hub id
    train_text_encoder: bool = False
    lora_rank: int = 0  # 0: full fine-tune of the UNet
    lora_alpha: int = 0  # 0: same as rank
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class DataConfig:
    path: str  # imagefolder: metadata.jsonl with file_name, text
    resolution: int = 0  # 0: the model's native resolution
    caption_dropout: float = 0.0  # probability of training on the empty prompt (for CFG)
    random_flip: bool = False  # off by default: a flip contradicts "left of" captions
    bad_rows: str = "skip"  # "skip" (counted, reported) or "error"
    encode_batch: int = 32


@dataclass
class SFTConfig:
    model: ModelConfig
    data: DataConfig


class Denoiser(nn.Module):
    """The trainable policy: UNet, plus the text encoder when it is trained too."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        ctx = self.text_encoder(text)[0] if self.text_encoder is not None else text
        return self.unet(noisy, t, ctx).sample


class CachedLatents(torch.utils.data.Dataset):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor, text: torch.Tensor):
        self.mean, self.std, self.text = mean, std, text

    def __len__(self):
        return len(self.mean)

    def __getitem__(self, i):
        return {"mean": self.mean[i], "std": self.std[i], "text": self.text[i]}


def add_lora(unet, cfg: ModelConfig) -> None:
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                                init_lora_weights="gaussian", target_modules=list(cfg.lora_targets)))


def save_unet_lora(pipeline_cls, unet, out_dir: str) -> None:
    """The UNet's LoRA in diffusers' format (`pipe.load_lora_weights(out_dir)`); the adapter metadata carries
    lora_alpha, without which loaders assume alpha = rank."""
    from peft.utils import get_peft_model_state_dict

    pipeline_cls.save_lora_weights(out_dir, unet_lora_layers=get_peft_model_state_dict(unet),
                                   unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())


class DiffusionSFT:
    """Method object for the core trainer (see mmalign.core.method.Method)."""

    config_class = SFTConfig

    def __init__(self, cfg: SFTConfig, output_dir: str):
        self.cfg, self.output_dir = cfg, output_dir
        self.parts: SDComponents | None = None
        self.report = SkipReport()

    def build(self, device: torch.device) -> nn.Module:
        m = self.cfg.model
        self.device = device
        self.parts = p = load_sd_components(m.pretrained)
        p.vae.to(device)
        p.text_encoder.to(device)
        p.vae.requires_grad_(False).eval()
        p.text_encoder.requires_grad_(m.train_text_encoder)
        if m.lora_rank > 0:
            add_lora(p.unet, m)
        return Denoiser(p.unet, p.text_encoder if m.train_text_encoder else None)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Token ids when the text encoder trains, else its embeddings (computed once, kept on the CPU)."""
        ids = tokenize(self.parts.tokenizer, captions)
        if self.cfg.model.train_text_encoder:
            return ids
        te = self.parts.text_encoder
        return torch.cat([te(ids[i:i + 256].to(self.device))[0].cpu() for i in range(0, len(ids), 256)])

    def dataset(self) -> CachedLatents:
        d, p = self.cfg.data, self.parts
        rows, self.report = read_caption_folder(d.path, d.bad_rows)
        res = d.resolution or p.resolution
        prep = T.Compose([T.Resize(res), T.CenterCrop(res), T.PILToTensor(), T.ToDtype(torch.float32, scale=True),
                          T.Normalize([0.5] * 3, [0.5] * 3)])
        pending, captions, means, stds = [], [], [], []

        def encode() -> None:
            x = torch.stack([px for px, _ in pending]).to(self.device)
            caps = [c for _, c in pending]
            if d.random_flip:  # both orientations become rows: sampling rows samples flips
                x, caps = torch.cat([x, x.flip(-1)]), caps + caps
            with torch.no_grad():
                post = p.vae.encode(x).latent_dist
            means.append(post.mean.cpu())
            stds.append(post.std.cpu())
            captions.extend(caps)
            pending.clear()

        self.report.kept = 0
        for r in rows:  # decode everything now, so a bad image is a counted skip, never a crash mid-epoch
            im = open_rgb(r.image_path, self.report, d.bad_rows, str(r.image_path))
            if im is None:
                continue
            self.report.kept += 1
            pending.append((prep(im), r.caption))
            if len(pending) == d.encode_batch:
                encode()
        if pending:
            encode()
        if not means:
            raise ValueError(f"{d.path}: no usable rows ({self.report.summary()})")
        Path(self.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.output_dir) / "data_report.json").write_text(json.dumps(self.report.to_dict(), indent=1))
        print(f"data: {self.report.summary()}")
        self.empty_text = self.encode_text([""])[0]
        return CachedLatents(torch.cat(means), torch.cat(stds), self.encode_text(captions))

    def collate(self, rows: list[dict]) -> dict:
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def loss(self, policy: nn.Module, batch: dict):
        p = self.parts
        scale = p.vae.config.scaling_factor
        latents = (batch["mean"] + batch["std"] * torch.randn_like(batch["std"])) * scale
        text = batch["text"]
        if self.cfg.data.caption_dropout > 0:
            drop = torch.rand(len(text), device=text.device) < self.cfg.data.caption_dropout
            empty = self.empty_text.to(text.device).expand_as(text)
            text = torch.where(drop.view(-1, *[1] * (text.dim() - 1)), empty, text)
        noise = torch.randn_like(latents)
        t = torch.randint(0, p.noise_scheduler.config.num_train_timesteps, (len(latents),), device=latents.device)
        noisy = p.noise_scheduler.add_noise(latents, noise, t)
        pred = policy(noisy, t, text)
        return sft_loss(per_sample_mse(pred, diffusion_target(p.noise_scheduler, latents, noise, t)))

    def save_pretrained(self, policy: nn.Module, out_dir: str) -> None:
        """A full pipeline directory (loads with StableDiffusionPipeline.from_pretrained); with LoRA, the
        adapter alone in diffusers' LoRA format (loads with pipe.load_lora_weights(out_dir))."""
        from diffusers import StableDiffusionPipeline

        p = self.parts
        if self.cfg.model.lora_rank > 0:
            save_unet_lora(StableDiffusionPipeline, policy.unet, out_dir)
            return
        pipe = StableDiffusionPipeline.from_pretrained(self.cfg.model.pretrained, unet=policy.unet,
                                                       text_encoder=te if (te := policy.text_encoder) is not None
                                                       else p.text_encoder,
                                                       safety_checker=None, requires_safety_checker=False)
        pipe.save_pretrained(out_dir)
