#!/usr/bin/env python3
"""A randomly initialised diffusers pipeline directory for throughput benchmarks (no hub, no downloads).

    python benchmarks/build_bench_pipeline.py --out /tmp/bench_tiny --size tiny
    python benchmarks/build_bench_pipeline.py --out /tmp/bench_sd15 --size sd15           # ~2 GB (fp16 files)
    python benchmarks/build_bench_pipeline.py --out /tmp/bench_sdxl --size sdxl           # ~7 GB (fp16 files)
    python benchmarks/build_bench_pipeline.py --out /tmp/bench_sdxl_s --size sdxl --shrink 8   # CPU smoke test
    python benchmarks/build_bench_pipeline.py --out - --size sdxl --meta   # configs + parameter counts only

tiny: the shipped ShapeWorld architecture (configs/models/shapeworld_sd_tiny.yaml, word-level tokenizer).
sd15: SD1.5's UNet / VAE / CLIP-L text encoder configs with the real CLIP BPE tokenizer.
sdxl: SDXL-base's UNet config, CLIP-L + OpenCLIP-bigG-sized text encoders (both CLIP BPE tokenizers).
The weights are random: speed and memory match the real models, outputs do not. `--shrink K` divides every
width by K and caps every depth at 2 (same code path, for checking the configs on a CPU). sd15/sdxl weights
are written in fp16 (`--save-dtype`); both benchmark scripts cast every module to the dtype they train in.
"""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCHED = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
             prediction_type="epsilon")
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280, max_position_embeddings=77, hidden_act="gelu")
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
           latent_channels=4, norm_num_groups=32)
SD15_UNET = dict(in_channels=4, out_channels=4, sample_size=64, layers_per_block=2,
                 block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, norm_num_groups=32)
SDXL_UNET = dict(in_channels=4, out_channels=4, sample_size=128, layers_per_block=2,
                 block_out_channels=[320, 640, 1280], transformer_layers_per_block=[1, 2, 10],
                 attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32)


def shrink_text(cfg: dict, k: int) -> dict:
    if k == 1:
        return cfg
    return {**cfg, "hidden_size": cfg["hidden_size"] // k, "intermediate_size": cfg["intermediate_size"] // k,
            "projection_dim": cfg["projection_dim"] // k, "num_hidden_layers": min(cfg["num_hidden_layers"], 2)}


def shrink_blocks(cfg: dict, k: int) -> dict:
    if k == 1:
        return cfg
    widths = [c // k for c in cfg["block_out_channels"]]
    out = {**cfg, "block_out_channels": widths, "layers_per_block": min(cfg["layers_per_block"], 2),
           "norm_num_groups": max(g for g in range(1, 33) if math.gcd(*widths) % g == 0)}
    if "transformer_layers_per_block" in cfg:
        out["transformer_layers_per_block"] = [min(n, 2) for n in cfg["transformer_layers_per_block"]]
    return out


def build(size: str, resolution: int, shrink: int, work: Path):
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from mmalign.diffusion.tiny import build_pipeline, load_architecture
    from mmalign.diffusion.tokenizers import clip_bpe_tokenizer

    torch.manual_seed(0)
    if size == "tiny":
        arch = load_architecture(ROOT / "configs/models/shapeworld_sd_tiny.yaml")
        if resolution:  # the VAE downsamples by 2 ** (blocks - 1)
            factor = 2 ** (len(arch["vae"]["block_out_channels"]) - 1)
            arch["vae"]["sample_size"], arch["unet"]["sample_size"] = resolution, resolution // factor
        return build_pipeline(arch)
    with torch.device("cpu"):  # schedulers hold real tensors even under --meta
        ddim = DDIMScheduler(**SCHED, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        euler = EulerDiscreteScheduler(**SCHED, steps_offset=1, timestep_spacing="leading")
    k, res = shrink, resolution or (512 if size == "sd15" else 1024)
    vae = AutoencoderKL(**{**shrink_blocks(VAE, k), "sample_size": res},
                        **({"scaling_factor": 0.13025, "force_upcast": True} if size == "sdxl" else {}))
    tok = clip_bpe_tokenizer(work / "tokenizer", model_max_length=77)
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    te = CLIPTextModel(CLIPTextConfig(**ids, **shrink_text(CLIP_L, k)))
    if size == "sd15":
        unet = UNet2DConditionModel(**{**shrink_blocks(SD15_UNET, k), "sample_size": res // 8,
                                       "cross_attention_dim": te.config.hidden_size})
        return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                       scheduler=ddim,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **shrink_text(CLIP_BIGG, k)))
    time_dim = SDXL_UNET["addition_time_embed_dim"] // k
    unet = UNet2DConditionModel(**{
        **shrink_blocks(SDXL_UNET, k), "sample_size": res // 8, "addition_time_embed_dim": time_dim,
        "cross_attention_dim": te.config.hidden_size + te2.config.hidden_size,
        "projection_class_embeddings_input_dim": 6 * time_dim + te2.config.projection_dim})
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=euler,
                                     add_watermarker=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", choices=["tiny", "sd15", "sdxl"], required=True)
    ap.add_argument("--resolution", type=int, default=0, help="native resolution (default: 32 / 512 / 1024)")
    ap.add_argument("--shrink", type=int, default=1, help="divide widths by K, cap depths at 2 (sd15/sdxl)")
    ap.add_argument("--save-dtype", choices=["fp16", "fp32"], default=None, help="default: fp32 tiny, else fp16")
    ap.add_argument("--meta", action="store_true", help="only construct on the meta device (no weights, no files)")
    a = ap.parse_args()
    save = a.save_dtype or ("fp32" if a.size == "tiny" else "fp16")
    with tempfile.TemporaryDirectory() as work:
        if a.meta:
            with torch.device("meta"):
                pipe = build(a.size, a.resolution, a.shrink, Path(work))
        else:
            pipe = build(a.size, a.resolution, a.shrink, Path(work))
            if save == "fp16":
                pipe.to(torch.float16)
            pipe.save_pretrained(a.out, safe_serialization=True)
    counts = {n: sum(p.numel() for p in getattr(pipe, n).parameters())
              for n in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None}
    print({"out": None if a.meta else a.out, "size": a.size, "shrink": a.shrink, "save_dtype": save,
           "params_M": {n: round(c / 1e6, 1) for n, c in counts.items()}})


if __name__ == "__main__":
    main()
