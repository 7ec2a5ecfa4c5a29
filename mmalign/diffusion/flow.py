"""Rectified-flow pipelines (SD3 format: `StableDiffusion3Pipeline`; FLUX format: `FluxPipeline`) in the same code
path as SD1.5/SDXL. `pipeline.load_sd_components` puts the transformer in the components' `unet` slot (the
denoiser the methods train) and a `FlowMatchForward` in `noise_scheduler`; `pipeline.denoise` and
`pipeline.encode_prompts` dispatch here.

Forward process (Esser et al. 2024, SD3; the FLUX convention too):

    x_σ = (1 − σ)·x0 + σ·ε,   σ ∈ (0, 1] (σ = 1 is pure noise),   target v = ε − x0   (velocity)

Training timesteps are in the model's units, t = σ·N (N = num_train_timesteps, 1000), as the pipelines pass
`scheduler.timesteps` to the transformer. A method draws an integer index i uniform over [0, N) and takes
σ = the scheduler's own training table at i (its `sigmas`, ascending: σ_i = shift((i + 1)/N) with
shift(s) = a·s / (1 + (a − 1)·s), a = the config's `shift`, 3.0 for SD3). With `use_dynamic_shifting` (FLUX) the
table is unshifted: the shift there depends on the image size and is applied at sampling only. This is the table
diffusers' SD3/FLUX training scripts index; uniform indices (no logit-normal density weighting) keep every
method's t draw the same as for the SD pipelines.
"""
from __future__ import annotations

import torch

FLOW_TRANSFORMERS = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
FLOW_PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
# joint attention: image-stream projections and the text stream's (SD3/FLUX transformers)
FLOW_ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                              "to_add_out"]
MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}  # T5 tokens: the pipelines' __call__ defaults, so sampling matches
FLUX_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size (latent pixels; its transformer config has none)
FLUX_TRAIN_GUIDANCE = 3.5  # guidance-distilled FLUX (guidance_embeds): embedded guidance while training, as
#                            FluxPipeline's default guidance_scale


def flow_format(index: dict) -> str | None:
    """"sd3" or "flux" from a model_index.json's transformer entry; None without a transformer (a UNet pipeline)."""
    entry = index.get("transformer")
    if not (isinstance(entry, (list, tuple)) and entry[0] is not None):
        return None
    if entry[1] not in FLOW_TRANSFORMERS:
        raise ValueError(f"unsupported pipeline {index.get('_class_name')!r} (transformer {entry[1]}): mmalign trains "
                         f"SD1.5/SDXL (UNet), SD3 (SD3Transformer2DModel) and FLUX (FluxTransformer2DModel) pipelines")
    return FLOW_TRANSFORMERS[entry[1]]


class FlowMatchForward:
    """The training-time forward process of a flow pipeline, with the interface the methods use on DDPMScheduler:
    `config.num_train_timesteps`, `add_noise(x0, noise, t)`, and (through `pipeline.diffusion_target`) `target`.
    `scheduler`: the pipeline's FlowMatchEulerDiscreteScheduler (its training table)."""

    def __init__(self, scheduler):
        self.scheduler, self.config = scheduler, scheduler.config
        self.sigmas = scheduler.sigmas.flip(0).float()  # ascending: index i -> σ_i

    def train_timesteps(self, index: torch.Tensor) -> torch.Tensor:
        """Integer indices in [0, N) -> timesteps t = σ_i·N (float32), the model's units."""
        return self.sigmas.to(index.device)[index] * self.config.num_train_timesteps

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """σ = t / N, shaped to broadcast over `like`."""
        s = t.to(like.device, torch.float32) / self.config.num_train_timesteps
        return s.view(-1, *[1] * (like.dim() - 1)).to(like.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self.sigma(t, x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity v = ε − x0 (d x_σ / dσ)."""
        return noise - x0


def load_flow_parts(source: str, index: dict, fmt: str, dtype: torch.dtype) -> dict:
    """Keyword arguments of `pipeline.SDComponents` for an SD3 or FLUX pipeline (directory or hub id).
    SD3: CLIP-L and CLIP-G (both with projection) + T5 (text_encoder_3; may be absent: zeros, as the pipeline);
    FLUX: CLIP-L (pooled) + T5 (text_encoder_2). The VAE stays fp32."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel,
                           SD3Transformer2DModel)
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    def present(name: str) -> bool:
        entry = index.get(name)
        return isinstance(entry, (list, tuple)) and entry[0] is not None

    def text(name: str, cls):
        return (AutoTokenizer.from_pretrained(source, subfolder=name.replace("text_encoder", "tokenizer")),
                cls.from_pretrained(source, subfolder=name, dtype=dtype))

    if fmt == "sd3":
        encoders = {"": CLIPTextModelWithProjection, "_2": CLIPTextModelWithProjection, "_3": T5EncoderModel}
        transformer_cls = SD3Transformer2DModel
    else:
        encoders = {"": CLIPTextModel, "_2": T5EncoderModel}
        transformer_cls = FluxTransformer2DModel
    parts = {}
    for suffix, cls in encoders.items():
        if present(f"text_encoder{suffix}"):
            parts[f"tokenizer{suffix}"], parts[f"text_encoder{suffix}"] = text(f"text_encoder{suffix}", cls)
        elif suffix != "_3":
            raise FileNotFoundError(f"{source}: a {FLOW_PIPELINES[fmt]} needs text_encoder{suffix}")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler")
    if fmt == "flux" and scheduler.config.num_train_timesteps != 1000:
        raise ValueError(f"{source}: FLUX's transformer takes t / 1000 (FluxPipeline); the scheduler has "
                         f"num_train_timesteps={scheduler.config.num_train_timesteps}")
    return {"source": source, "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch.float32),
            "unet": transformer_cls.from_pretrained(source, subfolder="transformer", torch_dtype=dtype),
            "noise_scheduler": FlowMatchForward(scheduler), "flow": fmt, **parts}


def is_flow_model(model) -> bool:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    return isinstance(model, (SD3Transformer2DModel, FluxTransformer2DModel))


def flow_input_dtype(model) -> torch.dtype:
    """The dtype of the transformer's input layer (its patch embedding)."""
    from diffusers import SD3Transformer2DModel

    return (model.pos_embed.proj if isinstance(model, SD3Transformer2DModel) else model.x_embedder).weight.dtype


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> FLUX's tokens [B, H/2·W/2, 4C]: 2x2 patches, row-major, channels then patch row/col."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: latent size {h}x{w} must be even")
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * c)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents of size h x w."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def latent_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """FLUX's image position ids [h/2·w/2, 3] = (0, row, col) of each packed token."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).view(-1, 3).to(device, dtype)


def flow_denoise(model, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """The transformer's velocity for x_t [B, C, H, W] at timesteps t = σ·N [B]; cond = {"ctx", "pooled"}."""
    from diffusers import SD3Transformer2DModel

    missing = [k for k in ("ctx", "pooled") if k not in cond]
    if missing:
        raise KeyError(f"a flow transformer needs cond keys {missing} (encode_prompts)")
    ctx, pooled = (cond[k].to(x_t.device, x_t.dtype) for k in ("ctx", "pooled"))
    t = t.to(x_t.device, torch.float32).expand(len(x_t))
    if isinstance(model, SD3Transformer2DModel):
        return model(hidden_states=x_t, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled,
                     return_dict=False)[0]
    h, w = x_t.shape[-2:]
    guidance = torch.full((len(x_t),), FLUX_TRAIN_GUIDANCE, device=x_t.device) if model.config.guidance_embeds \
        else None
    out = model(hidden_states=pack_latents(x_t), timestep=t / 1000, guidance=guidance, pooled_projections=pooled,
                encoder_hidden_states=ctx, txt_ids=torch.zeros(ctx.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
                img_ids=latent_ids(h, w, x_t.device, x_t.dtype), return_dict=False)[0]
    return unpack_latents(out, h, w)


def prompt_pipeline(parts):
    """A pipeline object around the text encoders only, to call its own `encode_prompt`."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    text = {"tokenizer": parts.tokenizer, "text_encoder": parts.text_encoder, "tokenizer_2": parts.tokenizer_2,
            "text_encoder_2": parts.text_encoder_2}
    if parts.flow == "sd3":  # the transformer gives the T5 width when text_encoder_3 is absent
        return StableDiffusion3Pipeline(transformer=parts.unet, scheduler=None, vae=None, **text,
                                        tokenizer_3=parts.tokenizer_3, text_encoder_3=parts.text_encoder_3)
    return FluxPipeline(transformer=None, scheduler=None, vae=None, **text)


@torch.no_grad()
def encode_flow_prompts(parts, captions: list[str], device, batch: int = 256) -> dict[str, torch.Tensor]:
    """{"ctx", "pooled"}, CPU fp32, exactly as the pipeline's `encode_prompt` (no CFG, no clip_skip).
    SD3: ctx = [CLIP-L ‖ CLIP-G penultimate hidden states, zero-padded to T5's width ; T5 states] along the
    sequence, pooled = [CLIP-L ‖ CLIP-G projected pooled]. FLUX: ctx = T5 states, pooled = CLIP-L pooled output."""
    pipe, n = prompt_pipeline(parts), MAX_SEQUENCE_LENGTH[parts.flow]
    ctx, pooled = [], []
    for i in range(0, len(captions), batch):
        chunk = captions[i:i + batch]
        if parts.flow == "sd3":
            c, _, p, _ = pipe.encode_prompt(chunk, None, None, device=device, do_classifier_free_guidance=False,
                                            max_sequence_length=n)
        else:
            c, p, _ = pipe.encode_prompt(chunk, None, device=device, max_sequence_length=n)
        ctx.append(c.float().cpu())
        pooled.append(p.float().cpu())
    return {"ctx": torch.cat(ctx), "pooled": torch.cat(pooled)}
