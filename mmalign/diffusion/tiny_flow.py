"""Tiny SD3-format (`StableDiffusion3Pipeline`) and FLUX-format (`FluxPipeline`) pipelines built from configs, with
random weights and offline word-level tokenizers: for tests. A user's real checkpoint is loaded with
`from_pretrained` instead and never goes through here.

The architectures are data (`SD3_TINY`, `FLUX_TINY`); `build_*` take a copy with any key overridden.
"""
from __future__ import annotations

import copy

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       SD3Transformer2DModel, StableDiffusion3Pipeline)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from ..datasets.shapeworld import vocabulary
from .tokenizers import word_level_tokenizer

# 32 px images -> VAE (factor 2, 4 channels) -> 16x16 latents -> 2x2 patches: 64 image tokens
VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 2,
       "up_block_types": ["UpDecoderBlock2D"] * 2, "block_out_channels": [8, 16], "layers_per_block": 1,
       "latent_channels": 4, "norm_num_groups": 4, "sample_size": 32, "mid_block_add_attention": False,
       "scaling_factor": 1.5, "shift_factor": 0.1, "use_quant_conv": False, "use_post_quant_conv": False}
CLIP = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "projection_dim": 16, "max_position_embeddings": 16}
T5 = {"d_model": 32, "d_kv": 8, "d_ff": 32, "num_layers": 1, "num_heads": 2, "relative_attention_num_buckets": 8}
SD3_TINY = {"vae": VAE, "clip": CLIP, "t5": T5,
            "transformer": {"sample_size": 16, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 1,
                            "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
                            "caption_projection_dim": 16, "pooled_projection_dim": 32, "pos_embed_max_size": 16},
            "scheduler": {"num_train_timesteps": 1000, "shift": 3.0}}
FLUX_TINY = {"vae": VAE, "clip": CLIP, "t5": T5,
             "transformer": {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1,
                             "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
                             "pooled_projection_dim": 16, "guidance_embeds": True, "axes_dims_rope": [2, 2, 4]},
             "scheduler": {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                           "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                           "max_image_seq_len": 4096}}


def merged(base: dict, overrides: dict | None) -> dict:
    """A deep copy of `base` with each section's keys updated from `overrides` ({section: {key: value}})."""
    arch = copy.deepcopy(base)
    for section, values in (overrides or {}).items():
        arch[section].update(values)
    return arch


def text_parts(arch: dict, tokenizer=None, t5_tokenizer=None):
    """(CLIP tokenizer, its config, T5 tokenizer, T5 encoder): word-level ShapeWorld tokenizers by default."""
    clip = arch["clip"]
    tok = tokenizer or word_level_tokenizer(vocabulary(), model_max_length=clip["max_position_embeddings"])
    tok3 = t5_tokenizer or word_level_tokenizer(vocabulary(), model_max_length=512)
    cfg = CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **clip)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok3), pad_token_id=tok3.pad_token_id,
                                 eos_token_id=tok3.eos_token_id, decoder_start_token_id=tok3.pad_token_id,
                                 **arch["t5"]))
    return tok, cfg, tok3, t5


def build_sd3_pipeline(overrides: dict | None = None, seed: int = 0, tokenizer=None, t5_tokenizer=None,
                       with_t5: bool = True) -> StableDiffusion3Pipeline:
    """Randomly initialised SD3-format pipeline: CLIP-L and CLIP-G (both with projection; pooled width 2 x
    projection_dim), T5 (omitted with `with_t5=False`: the pipeline then uses zeros), SD3 transformer, flow-match
    scheduler with SD3's shift 3.0."""
    arch = merged(SD3_TINY, overrides)
    torch.manual_seed(seed)
    tok, cfg, tok3, t5 = text_parts(arch, tokenizer, t5_tokenizer)
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**arch["transformer"]),
        scheduler=FlowMatchEulerDiscreteScheduler(**arch["scheduler"]), vae=AutoencoderKL(**arch["vae"]),
        text_encoder=CLIPTextModelWithProjection(cfg), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(cfg), tokenizer_2=tok,
        text_encoder_3=t5 if with_t5 else None, tokenizer_3=tok3 if with_t5 else None)


def build_flux_pipeline(overrides: dict | None = None, seed: int = 0, tokenizer=None,
                        t5_tokenizer=None) -> FluxPipeline:
    """Randomly initialised FLUX-format pipeline: CLIP (pooled output), T5, FLUX transformer (guidance-embedded
    by default, as FLUX.1-dev), flow-match scheduler with dynamic shifting."""
    arch = merged(FLUX_TINY, overrides)
    torch.manual_seed(seed)
    tok, cfg, tok2, t5 = text_parts(arch, tokenizer, t5_tokenizer)
    return FluxPipeline(transformer=FluxTransformer2DModel(**arch["transformer"]),
                        scheduler=FlowMatchEulerDiscreteScheduler(**arch["scheduler"]),
                        vae=AutoencoderKL(**arch["vae"]), text_encoder=CLIPTextModel(cfg), tokenizer=tok,
                        text_encoder_2=t5, tokenizer_2=tok2)
