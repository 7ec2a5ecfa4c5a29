#!/usr/bin/env python3
"""Train a small SD3-format (rectified-flow, `StableDiffusion3Pipeline`) ShapeWorld text-to-image base from scratch
and save it with `save_pretrained`: the flow counterpart of scripts/train_shapeworld_base.py.

No VAE phase: the shipped ShapeWorld VAE (mmalign/assets/shapeworld_sd/vae: 32 px -> 4 x 16 x 16 latents) goes into
the SD3 pipeline with shift_factor 0.0, so x0 = (z - shift_factor) * scaling_factor in training and the pipeline
decodes z = x0 / scaling_factor + shift_factor. The latents of the ShapeWorld training renders are cached once; the
SD3 transformer and the text encoders (CLIP-L, CLIP-G and, unless --no-t5, T5; word-level ShapeWorld tokenizers)
are trained jointly on the rectified-flow loss

    x_s = (1 - s) x0 + s eps,   target eps - x0,   s = sigmoid(n), n ~ N(--logit-mean, --logit-std),

with the transformer called at t = s * 1000 (the pipeline's units), prompts encoded by the pipeline's own
`encode_prompt` (so training and sampling see the same context, T5 padding or its zeros included), caption dropout
to "" for classifier-free guidance, AdamW, EMA weights for the saved model, optional cosine decay. The sampler is
FlowMatchEulerDiscreteScheduler with shift 1.0.

Three choices the shipped recipe makes (measured: the model card, mmalign/assets/shapeworld_sd3/README.md):
- --latents mean: this VAE's posterior std (0.63 in the SD base's scaled units) is nearly the spread of the
  posterior means (0.73), so posterior samples are 43 % white noise by variance; a transformer trained on them does
  not learn the low-noise end. On the means (scaling_factor set to 1 / their std) it does.
- --logit-mean 1.0 (the second stage): SD3's N(0, 1) puts 1.4 % of the draws at s > 0.9; then restoring an image
  from s <= 0.6 works while sampling from pure noise gives fragments. Training the high-noise end more fixes that.
- --no-t5 and --clip-init: no T5 encoder (the pipeline fills its place with zeros), CLIP-L starts from the SD base's
  trained text encoder.

Every --eval-every steps it samples --eval-prompts captions of the "validation" split (held out from training; the
"test" half stays untouched) with fixed seeds, scores them with the exact ShapeWorld scorer, prints one JSON line,
appends it to <out>/train_log.jsonl and saves the pipeline, so an interrupted run still leaves a usable model.

    python scripts/train_shapeworld_flow.py --out mmalign/assets/shapeworld_sd3
    python scripts/train_shapeworld_flow.py --init DIR --out DIR2 --decay cosine ...   # continue

scripts/build_shapeworld_flow.sh holds the exact commands that build the shipped pipeline. Reproducible from --seed.
No horizontal flips: they would contradict "left of" / "right of" captions.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusion3Pipeline
from transformers import AutoTokenizer, CLIPTextModelWithProjection

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_shapeworld_base import evaluate, to_pixels  # noqa: E402  (the SD base's shared helpers)

from mmalign.datasets.shapeworld import render_scene, sample_scenes  # noqa: E402
from mmalign.diffusion.flow import MAX_SEQUENCE_LENGTH, flow_denoise  # noqa: E402
from mmalign.diffusion.load_for_sampling import load_pipeline  # noqa: E402
from mmalign.diffusion.losses import per_sample_mse  # noqa: E402
from mmalign.diffusion.pipeline import BASE_NOTES  # noqa: E402
from mmalign.diffusion.tiny_flow import build_sd3_pipeline, merged  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 32
# Overrides of tiny_flow.SD3_TINY. CLIP-L and CLIP-G: hidden 32 each, concatenated to 64 = T5's width =
# joint_attention_dim; pooled = 2 x projection_dim = pooled_projection_dim. Transformer: 4 joint blocks of width
# 4 x 16 = 64 (= caption_projection_dim), 2x2 patches of the 16x16 latents -> 64 image tokens.
ARCH = {
    "clip": {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "projection_dim": 32, "max_position_embeddings": 16},
    "t5": {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 1, "num_heads": 4,
           "relative_attention_num_buckets": 8, "dropout_rate": 0.0},
    "transformer": {"sample_size": 16, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 4,
                    "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": 64,
                    "caption_projection_dim": 64, "pooled_projection_dim": 64, "pos_embed_max_size": 16},
    "scheduler": {"num_train_timesteps": 1000, "shift": 1.0},
}
TRAINED = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def build(arch: dict, vae_dir: str | Path, seed: int, with_t5: bool = True,
          clip_init: str | Path | None = None) -> StableDiffusion3Pipeline:
    """A fresh SD3 pipeline of `arch` with the VAE loaded from `vae_dir` (shift_factor 0.0 if it has none).

    `with_t5=False` leaves text_encoder_3 out: the pipeline then puts zeros in T5's place (as many as the
    max_sequence_length it is called with; identical tokens in the joint attention). `clip_init`: a trained
    CLIPTextModel directory (the SD base's text_encoder, with its tokenizer in the sibling tokenizer/) that CLIP-L
    starts from (its text projection is new); CLIP-G stays `arch["clip"]`."""
    tokenizer = None
    if clip_init is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(Path(clip_init).parent / "tokenizer"))
    pipe = build_sd3_pipeline(arch, seed=seed, tokenizer=tokenizer, with_t5=with_t5)
    if clip_init is not None:
        clip_l = CLIPTextModelWithProjection.from_pretrained(str(clip_init))
        if clip_l.config.vocab_size != pipe.text_encoder_2.config.vocab_size:
            raise ValueError(f"{clip_init}: vocabulary {clip_l.config.vocab_size} != the ShapeWorld tokenizer's "
                             f"{pipe.text_encoder_2.config.vocab_size}")
        pipe.register_modules(text_encoder=clip_l)
    vae = AutoencoderKL.from_pretrained(str(vae_dir))
    if vae.config.shift_factor is None:
        vae.register_to_config(shift_factor=0.0)
    pipe.register_modules(vae=vae)
    pipe.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if pipe.transformer.config.in_channels != vae.config.latent_channels:
        raise ValueError(f"transformer in_channels {pipe.transformer.config.in_channels} != VAE latent channels "
                         f"{vae.config.latent_channels}")
    return pipe


def trained_modules(pipe) -> dict[str, torch.nn.Module]:
    return {n: getattr(pipe, n) for n in TRAINED if getattr(pipe, n, None) is not None}


def encode(pipe, captions: list[str]) -> dict[str, torch.Tensor]:
    """{"ctx", "pooled"} from the pipeline's own `encode_prompt` (with gradients to the text encoders), at the
    T5 length the pipeline samples with."""
    ctx, _, pooled, _ = pipe.encode_prompt(captions, None, None, device=torch.device("cpu"),
                                           do_classifier_free_guidance=False,
                                           max_sequence_length=MAX_SEQUENCE_LENGTH["sd3"])
    return {"ctx": ctx, "pooled": pooled}


def flow_loss(pipe, x0: torch.Tensor, captions: list[str], g: torch.Generator,
              logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """Rectified-flow loss of a batch of scaled latents x0: s logit-normal, x_s = (1-s) x0 + s eps, target eps - x0."""
    noise = torch.randn(x0.shape, generator=g)
    s = torch.sigmoid(logit_mean + logit_std * torch.randn(len(x0), generator=g))
    sv = s.view(-1, 1, 1, 1)
    pred = flow_denoise(pipe.transformer, (1 - sv) * x0 + sv * noise,
                        s * pipe.scheduler.config.num_train_timesteps, encode(pipe, captions))
    return per_sample_mse(pred, noise - x0).mean()


@torch.no_grad()
def cache_latents(vae, pixels: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (the VAE encoder never runs again)."""
    posts = [vae.encode(pixels[i:i + chunk]).latent_dist for i in range(0, len(pixels), chunk)]
    return torch.cat([p.mean for p in posts]), torch.cat([p.std for p in posts])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "mmalign/assets/shapeworld_sd3"))
    ap.add_argument("--vae", default=str(ROOT / "mmalign/assets/shapeworld_sd/vae"),
                    help="AutoencoderKL directory to reuse (ignored with --init: the saved pipeline's VAE)")
    ap.add_argument("--arch-overrides", default=None,
                    help="JSON {section: {key: value}} applied on top of this script's ARCH (tests use it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-images", type=int, default=20000)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--eval-every", type=int, default=400)
    ap.add_argument("--eval-prompts", type=int, default=128)
    ap.add_argument("--eval-steps", type=int, default=25, help="sampler steps at evaluation")
    ap.add_argument("--eval-guidance", type=float, default=4.0)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", help="continue from this saved StableDiffusion3Pipeline")
    ap.add_argument("--latents", choices=["sample", "mean"], default="sample",
                    help="train on VAE posterior samples (SD's convention) or on the posterior means; 'mean' also "
                         "sets the pipeline VAE's scaling_factor to 1 / std of the means (a fresh pipeline only)")
    ap.add_argument("--logit-mean", type=float, default=0.0,
                    help="mean of the logit-normal noise share s (SD3: 0; > 0 trains the high-noise end more)")
    ap.add_argument("--logit-std", type=float, default=1.0)
    ap.add_argument("--no-t5", action="store_true", help="no T5 encoder (the pipeline uses zeros in its place)")
    ap.add_argument("--clip-init", default=None,
                    help="CLIPTextModel directory CLIP-L starts from, e.g. mmalign/assets/shapeworld_sd/text_encoder")
    ap.add_argument("--decay", choices=["none", "cosine"], default="none", help="learning-rate decay")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="stop (evaluate and save) after this many steps of the --steps schedule")
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "train_log.jsonl", "w")

    def emit(rec):
        print(json.dumps(rec), flush=True)
        log.write(json.dumps(rec) + "\n")
        log.flush()

    if a.init:
        pipe = load_pipeline(a.init, "--init")  # also a folder saved without T5
    else:
        pipe = build(merged(ARCH, json.loads(a.arch_overrides) if a.arch_overrides else None), a.vae, a.seed,
                     with_t5=not a.no_t5, clip_init=a.clip_init)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(a.seed)
    g = torch.Generator().manual_seed(a.seed)
    t0 = time.time()

    vae = pipe.vae.eval().requires_grad_(False)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor
    scenes = sample_scenes(a.seed + 1, a.train_images, split="train")
    mean, std = cache_latents(vae, to_pixels([render_scene(s, RESOLUTION) for s in scenes]))
    if a.latents == "mean":
        std = torch.zeros_like(std)  # the loop still draws the noise, so the RNG stream is the same either way
        if not a.init:
            scale = 1.0 / float((mean - shift).std())
            vae.register_to_config(scaling_factor=scale)
    captions = [s.caption for s in scenes]
    eval_scenes = sample_scenes(10_000 + a.seed, a.eval_prompts, split="validation")
    eval_seeds = list(range(len(eval_scenes)))
    modules = trained_modules(pipe)
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()}
    emit({"phase": "setup", "params": n_params, "scaling_factor": scale, "shift_factor": shift,
          "latent_std": round(float(((mean - shift) * scale).std()), 4), "images": len(scenes),
          "s": round(time.time() - t0)})

    params = []
    for m in modules.values():
        m.train().requires_grad_(True)
        params += list(m.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=1e-2)

    def lr_factor(s):
        decay = 0.5 * (1 + np.cos(np.pi * s / a.steps)) if a.decay == "cosine" else 1.0
        return min(1.0, (s + 1) / max(a.warmup, 1)) * decay
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    ema = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in modules.items()}
    last = min(a.steps, a.stop_after or a.steps)
    for step in range(1, last + 1):
        idx = torch.randint(0, len(mean), (a.batch,), generator=g)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        drop = (torch.rand(a.batch, generator=g) < a.caption_dropout).tolist()
        batch_caps = ["" if d else captions[i] for d, i in zip(drop, idx.tolist())]
        loss = flow_loss(pipe, (z - shift) * scale, batch_caps, g, a.logit_mean, a.logit_std)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            d = min(a.ema, (1 + step) / (10 + step))
            for k, m in modules.items():
                for p, q in zip(m.parameters(), ema[k].parameters()):
                    q.lerp_(p, 1 - d)
        if step % a.log_every == 0:
            emit({"phase": "train", "step": step, "loss": round(loss.item(), 5), "s": round(time.time() - t0)})
        if step % a.eval_every == 0 or step == last:
            live = trained_modules(pipe)
            for k, m in ema.items():
                setattr(pipe, k, m)
            acc = evaluate(pipe, eval_scenes, eval_seeds, steps=a.eval_steps, guidance=a.eval_guidance)
            pipe.save_pretrained(out)
            if a.latents == "mean":  # the methods then train on means too (data.latents: auto)
                (out / BASE_NOTES).write_text(json.dumps({"latents": "mean"}) + "\n")
            for k, m in live.items():
                setattr(pipe, k, m)
            emit({"phase": "eval", "step": step, "validation": acc, "n": len(eval_scenes),
                  "s": round(time.time() - t0)})
    log.close()
    return out


if __name__ == "__main__":
    main()
