"""Build a tiny StableDiffusionPipeline- or StableDiffusionXLPipeline-format model from an architecture file
(configs/models/*.yaml).

Used by the ShapeWorld base-training script and by tests; a user's real checkpoint is loaded with
`from_pretrained` instead and never goes through here.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..datasets.shapeworld import vocabulary
from .tokenizers import word_level_tokenizer


def load_architecture(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"architecture file not found: {path}")
    return yaml.safe_load(path.read_text())


def build_pipeline(arch: dict, seed: int = 0, tokenizer=None) -> StableDiffusionPipeline:
    """Randomly initialised pipeline: word-level ShapeWorld tokenizer unless `tokenizer` is given."""
    torch.manual_seed(seed)
    te_cfg = arch["text_encoder"]
    tok = tokenizer or word_level_tokenizer(vocabulary(), model_max_length=te_cfg["max_position_embeddings"])
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **te_cfg))
    vae = AutoencoderKL(**arch["vae"])
    unet = UNet2DConditionModel(**arch["unet"])
    scheduler = DDIMScheduler(**arch["scheduler"], clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_sdxl_pipeline(arch: dict, seed: int = 0, tokenizer=None, addition_time_embed_dim: int = 8
                        ) -> StableDiffusionXLPipeline:
    """Randomly initialised SDXL-format pipeline from the same architecture dict: two CLIP text encoders with
    the text-encoder config (encoder 2 with projection; both use one tokenizer), the UNet's cross-attention
    width = hidden_1 + hidden_2 and SDXL's "text_time" added conditioning (pooled text + 6 size/crop ids)."""
    torch.manual_seed(seed)
    te_cfg = arch["text_encoder"]
    tok = tokenizer or word_level_tokenizer(vocabulary(), model_max_length=te_cfg["max_position_embeddings"])
    cfg = CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **te_cfg)
    text_encoder, text_encoder_2 = CLIPTextModel(cfg), CLIPTextModelWithProjection(cfg)
    vae = AutoencoderKL(**arch["vae"])
    unet = UNet2DConditionModel(**{
        **arch["unet"], "cross_attention_dim": 2 * te_cfg["hidden_size"], "addition_embed_type": "text_time",
        "addition_time_embed_dim": addition_time_embed_dim,
        "projection_class_embeddings_input_dim": 6 * addition_time_embed_dim + te_cfg["projection_dim"]})
    scheduler = EulerDiscreteScheduler(**arch["scheduler"], steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)

