#!/usr/bin/env python3
"""Train the tiny ShapeWorld text-to-image base pipeline from scratch and save it with `save_pretrained`.

Phase 1 trains the VAE on ShapeWorld renders; phase 2 caches the latents once and trains the UNet and the
text encoder jointly on the denoising loss (caption dropout for classifier-free guidance, EMA weights).
Every --eval-every steps it samples held-out captions (never seen in training) with fixed seeds, scores them
with the exact ShapeWorld scorer and saves the pipeline, so an interrupted run still leaves a usable model.

    python scripts/train_shapeworld_base.py --out mmalign/assets/shapeworld_sd
    python scripts/train_shapeworld_base.py --init DIR --out DIR2 ...   # continue (skips the VAE phase)
    ... --init DIR --prediction-type v_prediction --zero-terminal-snr    # convert to v-prediction, SNR 0 at T

scripts/build_shapeworld_base.sh holds the exact commands that built the shipped pipeline,
scripts/build_shapeworld_base_v.sh the one that converted it to v-prediction (mmalign/assets/shapeworld_sd_v).

Reproducible from its seed; prints one JSON line per evaluation and writes train_log.jsonl next to the model.
No horizontal flips: they would contradict "left of" / "right of" captions.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image

from mmalign.datasets.shapeworld import render_scene, sample_scenes, score_image
from mmalign.diffusion.losses import per_sample_mse
from mmalign.diffusion.pipeline import diffusion_target, reparameterize
from mmalign.diffusion.sampling import sample_images, score_samples
from mmalign.diffusion.tiny import build_pipeline, load_architecture

ROOT = Path(__file__).resolve().parents[1]


def to_pixels(images) -> torch.Tensor:
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
    return x.float() / 127.5 - 1.0


def evaluate(pipe, scenes, seeds, steps, guidance) -> dict:
    """Mean per-attribute accuracy of the pipeline's samples (the demo's scoring)."""
    prompts = [s.caption for s in scenes]
    images = sample_images(pipe, prompts, seeds, steps=steps, guidance=guidance)
    return {k: v["mean"] for k, v in score_samples(images, prompts)["summary"].items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "mmalign/assets/shapeworld_sd"))
    ap.add_argument("--arch", default=str(ROOT / "configs/models/shapeworld_sd_tiny.yaml"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-images", type=int, default=20000)
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--unet-steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--eval-every", type=int, default=400)
    ap.add_argument("--eval-prompts", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", help="continue from this saved pipeline (skips the VAE phase)")
    ap.add_argument("--decay", choices=["none", "cosine"], default="none", help="UNet learning-rate decay")
    ap.add_argument("--high-noise-share", type=float, default=0.0,
                    help="share of each batch whose timesteps are drawn from [--high-noise-from, T) instead of [0, T): "
                         "the epsilon loss barely weighs the image at high noise (benchmarks/high_noise_prediction.py)")
    ap.add_argument("--high-noise-from", type=int, default=900)
    ap.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                    help="what the UNet predicts (default: the --init pipeline's, epsilon for a fresh one)")
    ap.add_argument("--zero-terminal-snr", action="store_true",
                    help="rescale the betas so the last timestep is pure noise, and sample with trailing "
                         "timesteps (needs v_prediction: epsilon is undefined at SNR 0)")
    a = ap.parse_args()
    if not 0 <= a.high_noise_share <= 1 or not 0 <= a.high_noise_from < 1000:
        ap.error("--high-noise-share must lie in [0, 1] and --high-noise-from in [0, 1000)")
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "train_log.jsonl", "w")

    def emit(rec):
        print(json.dumps(rec), flush=True)
        log.write(json.dumps(rec) + "\n")
        log.flush()

    arch = load_architecture(a.arch)
    res = arch["resolution"]
    if a.init:
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained(a.init, safety_checker=None, requires_safety_checker=False)
        torch.manual_seed(a.seed)
    else:
        pipe = build_pipeline(arch, seed=a.seed)
    try:
        reparameterize(pipe, a.prediction_type, a.zero_terminal_snr)
    except ValueError as err:
        ap.error(str(err))
    scenes = sample_scenes(a.seed + 1, a.train_images, split="train")
    pixels = to_pixels([render_scene(s, res) for s in scenes])
    eval_scenes = sample_scenes(10_000 + a.seed, a.eval_prompts, split="heldout")
    eval_seeds = list(range(len(eval_scenes)))
    g = torch.Generator().manual_seed(a.seed)
    t0 = time.time()

    # Phase 1: VAE (reconstruction + a light KL so latents stay well scaled).
    vae = pipe.vae
    opt = torch.optim.AdamW(vae.parameters(), lr=a.lr)
    for step in range(1, 0 if a.init else a.vae_steps + 1):
        x = pixels[torch.randint(0, len(pixels), (a.batch,), generator=g)]
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample(generator=g)).sample
        loss = (recon - x).pow(2).mean() + 1e-6 * post.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == a.vae_steps:
            emit({"phase": "vae", "step": step, "loss": round(loss.item(), 5), "s": round(time.time() - t0)})
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # latent cache: the VAE encoder never runs again
        posts = [vae.encode(pixels[i:i + 512]).latent_dist for i in range(0, len(pixels), 512)]
        mean = torch.cat([p.mean for p in posts])
        std = torch.cat([p.std for p in posts])
        scale = vae.config.scaling_factor
        if not a.init:
            scale = 1.0 / float((mean + std * torch.randn(mean.shape, generator=g)).std())
            vae.register_to_config(scaling_factor=scale)
        check = [render_scene(s, res) for s in eval_scenes[:64]]
        x = to_pixels(check)
        rec = ((vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1) + 1) * 127.5).round().byte()
        rec_imgs = [Image.fromarray(r.permute(1, 2, 0).numpy()) for r in rec]
        rec_acc = float(np.mean([score_image(im, s.caption)["correct"] for im, s in zip(rec_imgs, eval_scenes)]))
    emit({"phase": "vae_done", "scaling_factor": round(scale, 4), "recon_scorer_acc": rec_acc,
          "s": round(time.time() - t0)})

    # Phase 2: UNet + text encoder on cached latents.
    tok, te, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    captions = [s.caption for s in scenes]
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    te.train().requires_grad_(True)
    unet.train().requires_grad_(True)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=1e-2)
    def lr_factor(s):
        decay = 0.5 * (1 + np.cos(np.pi * s / a.unet_steps)) if a.decay == "cosine" else 1.0
        return min(1.0, (s + 1) / 200) * decay
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    T = noise_sched.config.num_train_timesteps
    for step in range(1, a.unet_steps + 1):
        idx = torch.randint(0, len(mean), (a.batch,), generator=g)
        lat = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
        batch_ids = ids[idx].clone()
        drop = torch.rand(a.batch, generator=g) < a.caption_dropout
        batch_ids[drop] = empty
        noise = torch.randn(lat.shape, generator=g)
        t = torch.randint(0, T, (a.batch,), generator=g)
        if a.high_noise_share > 0:
            high = torch.rand(a.batch, generator=g) < a.high_noise_share
            t = torch.where(high, torch.randint(a.high_noise_from, T, (a.batch,), generator=g), t)
        ctx = te(batch_ids)[0]
        pred = unet(noise_sched.add_noise(lat, noise, t), t, ctx).sample
        loss = per_sample_mse(pred, diffusion_target(noise_sched, lat, noise, t)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        warm.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            d = min(a.ema, (1 + step) / (10 + step))
            for src, dst in ((unet, ema_unet), (te, ema_te)):
                for p, q in zip(src.parameters(), dst.parameters()):
                    q.lerp_(p, 1 - d)
        if step % 100 == 0:
            emit({"phase": "unet", "step": step, "loss": round(loss.item(), 5), "s": round(time.time() - t0)})
        if step % a.eval_every == 0 or step == a.unet_steps:
            saved = pipe.unet, pipe.text_encoder
            pipe.unet, pipe.text_encoder = ema_unet, ema_te
            acc = evaluate(pipe, eval_scenes, eval_seeds, steps=25, guidance=4.0)
            pipe.save_pretrained(out)
            pipe.unet, pipe.text_encoder = saved
            emit({"phase": "eval", "step": step, "heldout": acc, "n": len(eval_scenes), "s": round(time.time() - t0)})
    log.close()


if __name__ == "__main__":
    main()
