"""Loading Stable Diffusion components (SD1.5-style, SDXL, or the rectified-flow SD3/FLUX formats of flow.py; local
directory or hub id, same code path), and the conditioning interface every training method uses, so that methods
are family-agnostic:

    cond = encode_prompts(parts, captions, device)          # {"ctx"} or {"ctx", "pooled"}, CPU fp32
    cond["time_ids"] = make_time_ids(orig, crop, (R, R))    # SDXL only, from `preprocess`'s info
    pred = denoise(unet, x_t, t, cond)                      # a flow transformer in the `unet` slot: its velocity
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from .flow import (FLUX_SAMPLE_SIZE, FlowMatchForward, encode_flow_prompts, flow_denoise,
                   flow_format, flow_input_dtype, is_flow_model, load_flow_parts)


@dataclass
class SDComponents:
    source: str
    tokenizer: object
    text_encoder: CLIPTextModel | None  # None only for SDXL pipelines with encoder 2 alone (the refiner)
    vae: AutoencoderKL
    unet: UNet2DConditionModel  # SD3/FLUX: the transformer
    noise_scheduler: DDPMScheduler | FlowMatchForward  # the training-time forward process (from the pipeline's)
    tokenizer_2: object = None
    text_encoder_2: CLIPTextModelWithProjection | None = None  # FLUX: the T5 encoder
    tokenizer_3: object = None  # SD3 only
    text_encoder_3: object = None  # SD3's T5 encoder (None when the pipeline has none)
    flow: str = ""  # "sd3" or "flux" for rectified-flow pipelines (flow.py); "" for SD1.5/SDXL

    @property
    def resolution(self) -> int:
        size = FLUX_SAMPLE_SIZE if self.flow == "flux" else self.unet.config.sample_size
        return size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def pixel_factor(self) -> int:
        """Pixels per latent position the denoiser needs whole: the VAE's factor (x2 for SD3/FLUX 2x2 patches)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) * (2 if self.flow else 1)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None and not self.flow

    @property
    def is_flow(self) -> bool:
        return bool(self.flow)


def absent_parts(index: dict) -> dict:
    """{name: None} for each component model_index.json lists as [null, null] (an SD3 pipeline saved without T5):
    diffusers' from_pretrained refuses such a folder unless they are passed explicitly."""
    return {k: None for k, v in index.items()
            if not k.startswith("_") and isinstance(v, (list, tuple)) and len(v) == 2 and v[0] is None}


BASE_NOTES = "mmalign_base.json"  # what a base declares about its own training, e.g. {"latents": "mean"}
LATENT_SOURCES = ("sample", "mean")
# data.latents: "sample" (fresh posterior samples), "mean" (posterior means), "auto": what the base declares in its
# mmalign_base.json (training_latents), else "sample"
LatentChoice = Literal["auto", "sample", "mean"]


def training_latents(source: str) -> str:
    """How the base's denoiser was trained on VAE latents: "mean" (posterior means) when its directory's
    mmalign_base.json says so (the ShapeWorld flow base), else "sample" (fresh posterior samples, as diffusers'
    training scripts do). Methods train the same way by default (`data.latents: auto`)."""
    notes = Path(source) / BASE_NOTES
    if not notes.is_file():
        return "sample"
    try:
        value = json.loads(notes.read_text()).get("latents", "sample")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{notes}: not a JSON object ({e})") from e
    if value not in LATENT_SOURCES:
        raise ValueError(f"{notes}: latents must be one of {LATENT_SOURCES}, got {value!r}")
    return value


def read_index(source: str) -> dict:
    """A pipeline's model_index.json (directory or hub id); FileNotFoundError when it is neither."""
    from diffusers import DiffusionPipeline

    if "/" not in source and not Path(source).exists():
        raise FileNotFoundError(f"pipeline not found: {source!r} is neither a directory nor a hub id (owner/name)")
    if Path(source).exists() and not (Path(source) / "model_index.json").is_file():
        raise FileNotFoundError(f"{source} is not a diffusers pipeline directory (no model_index.json)")
    return DiffusionPipeline.load_config(source)


def read_format(source: str) -> str:
    """"sd3" or "flux" (rectified flow), else "unet" (SD1.5/SDXL), from the pipeline's model_index.json alone."""
    return flow_format(read_index(source)) or "unet"


def load_sd_components(source: str, dtype: torch.dtype = torch.float32) -> SDComponents:
    """Load tokenizer(s), text encoder(s), VAE, UNet and scheduler from a pipeline directory or hub id.
    SD3/FLUX-format pipelines (a `transformer` in model_index.json): `flow.load_flow_parts`.

    SDXL (model_index.json's `_class_name` contains "XL", or it lists a `text_encoder_2`) also gets
    tokenizer_2 / text_encoder_2. The VAE stays in fp32 whatever `dtype` is (fp16 VAEs overflow; SDXL's NaNs);
    the scheduler used for training is a DDPMScheduler built from the pipeline's own scheduler config (same
    betas, prediction type)."""
    index = read_index(source)
    fmt = flow_format(index)
    if fmt:
        return SDComponents(**load_flow_parts(source, index, fmt, dtype))

    def present(name: str) -> bool:  # "text_encoder": [null, null] in SDXL-refiner-style indexes
        entry = index.get(name)
        return isinstance(entry, (list, tuple)) and entry[0] is not None

    sdxl = "XL" in index.get("_class_name", "") or present("text_encoder_2")
    tok = te = tok2 = te2 = None
    if present("text_encoder") or not sdxl:
        tok = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
        te = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype)
    if sdxl:
        tok2 = AutoTokenizer.from_pretrained(source, subfolder="tokenizer_2")
        te2 = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", dtype=dtype)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype)
    sched = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    return SDComponents(source, tok, te, vae, unet, sched, tok2, te2)


def pipeline_class(parts: SDComponents):
    """The diffusers pipeline class for exports and sampling."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if parts.is_flow:
        return {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[parts.flow]
    return StableDiffusionXLPipeline if parts.is_sdxl else StableDiffusionPipeline


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_prompts(parts: SDComponents, captions: list[str], device, batch: int = 256) -> dict[str, torch.Tensor]:
    """Text conditioning as the diffusers pipelines compute it (no CFG, no clip_skip), CPU fp32.

    SD1.5: {"ctx": last hidden state}. SDXL (StableDiffusionXLPipeline.encode_prompt): {"ctx": penultimate
    hidden states of encoder 1 and encoder 2 concatenated, "pooled": encoder 2's projected pooled output
    (`text_embeds`)}. SD3/FLUX: `flow.encode_flow_prompts`."""
    if parts.is_flow:
        return encode_flow_prompts(parts, captions, device, batch)
    ctx, pooled = [], []
    for i in range(0, len(captions), batch):
        chunk = captions[i:i + batch]
        if not parts.is_sdxl:
            te = parts.text_encoder
            enc = parts.tokenizer(chunk, padding="max_length", max_length=parts.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt")
            mask = enc.attention_mask.to(device) if getattr(te.config, "use_attention_mask", False) else None
            ctx.append(te(enc.input_ids.to(device), attention_mask=mask)[0].float().cpu())
            continue
        hidden = []
        for tok, te in ((parts.tokenizer, parts.text_encoder), (parts.tokenizer_2, parts.text_encoder_2)):
            if te is None:
                continue
            out = te(tokenize(tok, chunk).to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        ctx.append(torch.cat(hidden, dim=-1).float().cpu())
        pooled.append(out.text_embeds.float().cpu())  # `out` is text_encoder_2's
    cond = {"ctx": torch.cat(ctx)}
    if pooled:
        cond["pooled"] = torch.cat(pooled)
    return cond


def preprocess(image, resolution: int, flip: bool = False) -> tuple[torch.Tensor, dict]:
    """PIL image -> [3, R, R] tensor in [-1, 1]: resize the shorter side to R (bilinear, antialiased), center
    crop (offsets as torchvision's CenterCrop and diffusers' SDXL example: round((size - R) / 2)), optionally
    mirror. Returns SDXL's size info: `original_size` = (h, w) of the input, `crop_top_left` = (top, left) of
    the crop in the resized image -- with `flip`, in the mirrored resized image (left' = W - left - R), so it
    always describes the crop the model actually sees."""
    from torchvision.transforms.v2 import functional as F

    image = image.convert("RGB")
    w, h = image.size
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = resolution, int(resolution * long / short)  # torchvision's Resize(int) rule
    rh, rw = (new_short, new_long) if h <= w else (new_long, new_short)
    image = F.resize(image, [rh, rw], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    top, left = int(round((rh - resolution) / 2.0)), int(round((rw - resolution) / 2.0))
    image = F.crop(image, top, left, resolution, resolution)
    if flip:
        image, left = F.horizontal_flip(image), rw - left - resolution
    x = F.pil_to_tensor(image).float().div(127.5).sub(1.0)
    return x, {"original_size": (h, w), "crop_top_left": (top, left)}


def make_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: tuple[int, int]
                  ) -> torch.Tensor:
    """SDXL's micro-conditioning, [N, 6] = (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    original_size, crop_top_left = torch.as_tensor(original_size), torch.as_tensor(crop_top_left)
    target = torch.tensor(target_size).expand(len(original_size), 2)
    return torch.cat([original_size, crop_top_left, target], dim=1).float()


def unet_kwargs(cond: dict[str, torch.Tensor]) -> dict:
    """A batch's cond dict -> UNet keyword arguments."""
    kwargs = {"encoder_hidden_states": cond["ctx"]}
    if "pooled" in cond:
        if "time_ids" not in cond:
            raise KeyError("SDXL conditioning has 'pooled' but no 'time_ids': add "
                           "cond['time_ids'] = make_time_ids(original_size, crop_top_left, (R, R))")
        kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
    return kwargs


def denoise(unet, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """The UNet's prediction for x_t at timesteps t; cond tensors are moved to x_t's device and dtype. A flow
    transformer (SD3/FLUX): its velocity at t = σ·N (`flow.flow_denoise`)."""
    if is_flow_model(unet):
        return flow_denoise(unet, x_t, t, cond)
    cond = {k: v.to(x_t.device, x_t.dtype) for k, v in cond.items()}
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        missing = [k for k in ("pooled", "time_ids") if k not in cond]
        if missing:
            raise KeyError(f"SDXL UNet needs cond keys {missing} (pooled: encode_prompts; "
                           "time_ids: make_time_ids)")
        if cond["time_ids"].shape != (len(x_t), 6):
            raise ValueError(f"time_ids must be [N, 6] = [{len(x_t)}, 6], got {tuple(cond['time_ids'].shape)}")
    return unet(x_t, t, **unet_kwargs(cond)).sample


def input_dtype(denoiser) -> torch.dtype:
    """The dtype the denoiser's input layer takes (a bf16/fp16 frozen base under fp32 adapters)."""
    return flow_input_dtype(denoiser) if is_flow_model(denoiser) else denoiser.conv_in.weight.dtype


def diffusion_target(scheduler: DDPMScheduler | FlowMatchForward, latents: torch.Tensor, noise: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict: the noise (epsilon) or the velocity (v-prediction); for a flow
    pipeline the rectified-flow velocity noise - latents."""
    if isinstance(scheduler, FlowMatchForward):
        return scheduler.target(latents, noise)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")


def reparameterize(pipe, prediction_type: str | None = None, zero_terminal_snr: bool = False):
    """Switch a pipeline's scheduler to another parametrization before training it on: `prediction_type`
    (epsilon / v_prediction; None keeps the current one) and, with `zero_terminal_snr`, betas rescaled so that
    abar_T = 0 (Lin et al., 2024, "Common Diffusion Noise Schedules and Sample Steps Are Flawed") with trailing
    timesteps, so sampling starts from pure noise at t = T - 1. Zero terminal SNR needs v-prediction: at abar = 0
    the input is the noise itself, and epsilon carries nothing to learn there. Rebuilds the scheduler (a
    changed config alone would not recompute the betas); returns the pipeline."""
    kind = prediction_type or pipe.scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be epsilon or v_prediction, got {kind!r}")
    if zero_terminal_snr and kind != "v_prediction":
        raise ValueError("zero terminal SNR needs prediction_type v_prediction (epsilon is undefined at SNR 0)")
    extra = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if zero_terminal_snr else {}
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=kind, **extra)
    return pipe
