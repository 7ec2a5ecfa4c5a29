#!/usr/bin/env python3
"""Inflate the shipped ShapeWorld image base (mmalign/assets/shapeworld_sd) with fresh motion modules (outputs
zeroed, so training starts from the image model) and train only the temporal layers on ShapeWorld motion clips
("a red circle moving left", 8 frames, 32 px) with the `video_temporal` method and the core trainer; then
sample held-out seeds and measure direction accuracy with the exact motion scorer (`score_motion`).

    python scripts/train_shapeworld_motion.py --out mmalign/assets/shapeworld_motion

Writes the MotionAdapter (config.json + safetensors), train_log.jsonl and eval.json into --out. Options for the
direction-following attempts (README): --init-adapter (continue an adapter), --lora-rank (spatial attention LoRA
trained jointly, fused and written to --out/unet), --t-min (train on high-noise timesteps only), --train-text
(the text encoder trained jointly, written to --out/text_encoder; --sep-weight adds a hinge separating captions
that differ only in the direction word; --contrast-weight adds video.text.caption_contrast_loss, with
--text-frozen keeping the text encoder as it is). --sep-only / --gap-only / --eval-only: the diagnostics alone.
scripts/build_shapeworld_motion.sh holds the exact command that built the shipped adapter.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from mmalign.core.config import Experiment, TrainConfig
from mmalign.core.trainer import train
from mmalign.datasets.shapeworld.video import motion_caption, parse_motion_caption, score_motion
from mmalign.diffusion.losses import per_sample_mse
from mmalign.diffusion.pipeline import diffusion_target
from mmalign.core.stats import bootstrap_ci
from mmalign.video.clips import shapeworld_clips
from mmalign.video.methods import VideoConfig, VideoDataConfig, VideoModelConfig, VideoTemporalTraining
from mmalign.video.sampling import sample_videos, video_pipeline
from mmalign.video.text import VideoTextTemporalTraining, shipped_text_encoder, token_ids

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "mmalign/assets/shapeworld_sd"
EVAL_SEED = 90_000  # held-out clip seeds (training clips use --seed)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class HighNoiseMixin:
    """video_temporal with t drawn from [t_min, T): the trajectory (hence the direction) is decided at high noise;
    at low noise x_t already shows where the object is."""

    def __init__(self, *args, t_min: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.t_min = t_min

    def sample_t(self, rows, device=None, shape=(), low: int = 0) -> torch.Tensor:
        return super().sample_t(rows, device, shape, max(low, self.t_min))


class HighNoiseTraining(HighNoiseMixin, VideoTemporalTraining):
    pass


class HighNoiseTextTraining(HighNoiseMixin, VideoTextTemporalTraining):
    """The same with the text encoder trained jointly (--train-text)."""


@torch.no_grad()
def text_separation(adapter_dir: str, base=BASE) -> dict:
    """How far apart the text encoder (the adapter's own, else the base's) puts captions that differ only in the
    direction word: |e(c) - e(c')| / |e(c)| at the direction token and over the whole sequence, mean over the
    colour x shape grid, per direction pair; "red" vs "blue" (colour token) for scale."""
    from transformers import AutoTokenizer, CLIPTextModel
    from mmalign.datasets.shapeworld.scene import COLOURS, SHAPES

    te = (shipped_text_encoder(adapter_dir) if adapter_dir else None) or CLIPTextModel.from_pretrained(
        base, subfolder="text_encoder")
    tok = AutoTokenizer.from_pretrained(base, subfolder="tokenizer")

    def rel(words_a, words_b, word_pos):
        a, b = te(token_ids(tok, words_a))[0], te(token_ids(tok, words_b))[0]
        tok_d = ((a - b)[:, word_pos].norm(dim=-1) / a[:, word_pos].norm(dim=-1)).mean().item()
        seq_d = ((a - b).flatten(1).norm(dim=-1) / a.flatten(1).norm(dim=-1)).mean().item()
        return {"token": round(tok_d, 4), "sequence": round(seq_d, 4)}

    grid = [(c, s) for c in COLOURS for s in SHAPES]
    pos = len(token_ids(tok, ["a red circle moving"])[0].nonzero()) - 1  # <bos> a red circle moving |dir|
    out = {f"{d1}-{d2}": rel([motion_caption(c, s, d1) for c, s in grid], [motion_caption(c, s, d2) for c, s in grid],
                             pos)
           for d1, d2 in (("left", "right"), ("up", "down"), ("left", "up"))}
    out["red-blue"] = rel([motion_caption("red", s, "left") for s in SHAPES],
                          [motion_caption("blue", s, "left") for s in SHAPES], 2)
    return out


def evaluate(adapter_dir: str, n: int, steps: int, guidance: float, seed: int = EVAL_SEED,
             spacing: str | None = None, base=BASE) -> dict:
    """Direction accuracy (and the other score_motion fields) of n seeded samples for held-out clip captions
    (initial noise drawn on the CPU from each seed, so a GPU evaluates the same clips); `spacing`: the
    sampler's timestep spacing (None: the base scheduler's own)."""
    captions = [c for c, _ in shapeworld_clips(n, seed, 8, 32)]
    pipe = video_pipeline(base, adapter_dir).to(DEVICE)
    seeds = [seed + i for i in range(n)]
    clips = sample_videos(pipe, captions, seeds, num_frames=8, steps=steps, guidance=guidance,
                          timestep_spacing=spacing)
    scores = [score_motion(c, cap) for c, cap in zip(clips, captions)]
    out = {"n": n, "steps": steps, "guidance": guidance, "seed": seed,
           "spacing": spacing or pipe.scheduler.config.timestep_spacing}
    for key in ("direction_ok", "correct", "colour_consistent", "shape_consistent", "object_found_frac"):
        mean, lo, hi = bootstrap_ci([float(s[key]) for s in scores])
        out[key] = {"mean": round(mean, 4), "ci95": [round(lo, 4), round(hi, 4)]}
    return out


OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


@torch.no_grad()
def direction_gap(adapter_dir: str, n: int, seed: int = EVAL_SEED,
                  timesteps=(300, 500, 700, 900, 950, 980, 999), base=BASE) -> dict:
    """Does the model read the direction word? Denoising error on n held-out ground-truth clips with the true
    caption vs with the opposite direction ("left" <-> "right"), same x_t and noise: per t, the relative gap
    (wrong - true) / true. About 0 when the caption's direction never reaches the prediction. Below t = 900 even
    the best denoiser gains nothing from the word (x_t shows the motion; benchmarks/motion_direction_signal.py),
    so the high timesteps are where a reading model shows a gap."""
    clips = shapeworld_clips(n, seed, 8, 32)
    swapped = [motion_caption(colour, shape, OPPOSITE[d]) for colour, shape, d in
               (parse_motion_caption(c) for c, _ in clips)]
    cfg = VideoConfig(VideoModelConfig(pretrained=str(base), motion_adapter=adapter_dir),
                      VideoDataConfig(num_frames=8))
    with tempfile.TemporaryDirectory() as tmp:  # the method's output_dir (nothing is written there)
        method = VideoTemporalTraining(cfg, tmp, data=clips)
        policy = method.build(DEVICE)
        rows, _ = method.dataset()
    batch = {k: v.to(method.device) for k, v in method.collate([rows[i] for i in range(len(rows))]).items()}
    x0 = batch["mean"] * method.parts.vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
    ctx = {"true": batch["ctx"], "swapped": method.encode_captions(swapped)}
    sched, out = method.parts.noise_scheduler, {}
    for t in timesteps:
        tt = torch.full((n,), t, device=x0.device)
        x_t, target = sched.add_noise(x0, noise, tt), diffusion_target(sched, x0, noise, tt)
        err = {k: per_sample_mse(policy(x_t, tt, c), target).mean().item() for k, c in ctx.items()}
        out[str(t)] = round((err["swapped"] - err["true"]) / err["true"], 4)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "mmalign/assets/shapeworld_motion"))
    ap.add_argument("--work", default="runs/shapeworld_motion", help="trainer output (checkpoints, final/)")
    ap.add_argument("--base", default=str(BASE), help="the frozen image pipeline the motion layers go on")
    ap.add_argument("--clips", type=int, default=2000, help="training clips (sample_clip, seeded)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=1, help="temporal transformer layers per motion module")
    ap.add_argument("--max-minutes", type=float, default=0.0, help="stop training after this long (0: no limit)")
    ap.add_argument("--init-adapter", default="", help="start from this MotionAdapter directory (default: fresh)")
    ap.add_argument("--lora-rank", type=int, default=0, help="LoRA on the spatial attention, trained jointly")
    ap.add_argument("--lora-where", default="spatial", choices=("spatial", "cross"),
                    help="spatial: self- and cross-attention; cross: the caption cross-attention only")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--t-min", type=int, default=0, help="train on timesteps in [t-min, T) only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-n", type=int, default=64)
    ap.add_argument("--eval-steps", type=int, default=10)
    ap.add_argument("--eval-guidance", type=float, default=4.0)
    ap.add_argument("--eval-spacing", default=None, choices=("leading", "trailing", "linspace"),
                    help="the evaluation sampler's timestep spacing (default: the base scheduler's, leading)")
    ap.add_argument("--gap-timesteps", default="300,500,700,900,950,980,999",
                    help="comma-separated timesteps for the direction gap")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-text", action="store_true", help="train the text encoder jointly (ships text_encoder/)")
    ap.add_argument("--sep-weight", type=float, default=0.0, help="--train-text: direction-separation hinge weight")
    ap.add_argument("--sep-margin", type=float, default=0.5, help="--train-text: the hinge's relative distance")
    ap.add_argument("--contrast-weight", type=float, default=0.0,
                    help="--train-text: weight of the caption-contrast term (video.text.caption_contrast_loss)")
    ap.add_argument("--text-frozen", action="store_true",
                    help="--train-text without training the text encoder (for --contrast-weight alone)")
    ap.add_argument("--contrast-temp", type=float, default=0.01, help="its temperature (relative error gap)")
    ap.add_argument("--gap-only", default="", help="only print direction_gap for this adapter directory")
    ap.add_argument("--sep-only", default=None, help="only print text_separation for this adapter dir ('': base)")
    ap.add_argument("--eval-only", default="", help="only evaluate this adapter directory (prints the result)")
    a = ap.parse_args()
    if (a.sep_weight or a.contrast_weight or a.text_frozen) and not a.train_text:
        ap.error("--sep-weight, --contrast-weight and --text-frozen need --train-text")
    torch.set_num_threads(a.threads)
    try:
        gap_ts = tuple(int(t) for t in a.gap_timesteps.split(","))
    except ValueError:
        ap.error(f"--gap-timesteps must be comma-separated integers, got {a.gap_timesteps!r}")
    if a.gap_only:
        print(json.dumps(direction_gap(a.gap_only, a.eval_n, timesteps=gap_ts, base=a.base)))
        return
    if a.sep_only is not None:
        print(json.dumps(text_separation(a.sep_only, base=a.base)))
        return
    if a.eval_only:
        print(json.dumps(evaluate(a.eval_only, a.eval_n, a.eval_steps, a.eval_guidance, spacing=a.eval_spacing,
                                  base=a.base)))
        return
    t0 = time.time()
    cfg = VideoConfig(VideoModelConfig(pretrained=a.base, motion_heads=a.heads, motion_layers=a.layers,
                                      max_frames=32,
                                      motion_adapter=a.init_adapter, lora_rank=a.lora_rank, lora_where=a.lora_where),
                      VideoDataConfig(shapeworld_clips=a.clips, seed=a.seed, num_frames=8))
    exp = Experiment("video_temporal", a.work, TrainConfig(lr=a.lr, max_steps=a.steps, batch_size=a.batch,
                                                            warmup_steps=a.warmup, log_every=10, seed=a.seed,
                                                            max_minutes=a.max_minutes, resume="never"), cfg)
    method = (HighNoiseTextTraining(cfg, a.work, data=shapeworld_clips(a.clips, a.seed, 8, 32), t_min=a.t_min,
                                    sep_weight=a.sep_weight, sep_margin=a.sep_margin,
                                    contrast_weight=a.contrast_weight, contrast_temp=a.contrast_temp,
                                    text_trainable=not a.text_frozen) if a.train_text
              else HighNoiseTraining(cfg, a.work, t_min=a.t_min))
    summary = train(exp, method)
    train_s = time.time() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # the MotionAdapter, plus unet/ (the image UNet with the spatial LoRA fused) when a spatial LoRA trained
    shutil.copytree(Path(a.work) / "final/motion_adapter", out, dirs_exist_ok=True)
    shutil.copy(Path(a.work) / "metrics.jsonl", out / "train_log.jsonl")
    result = {"train": {"base": a.base, "steps": summary["step"], "max_steps": a.steps,
                        "stopped": summary.get("stopped", ""),
                        "layers": a.layers, "device": DEVICE.type,
                        "batch": a.batch, "clips": a.clips, "lr": a.lr, "heads": a.heads,
                        "init_adapter": a.init_adapter, "lora_rank": a.lora_rank, "lora_where": a.lora_where,
                        "warmup": a.warmup, "t_min": a.t_min,
                        "train_text": a.train_text, "sep_weight": a.sep_weight, "sep_margin": a.sep_margin,
                        "contrast_weight": a.contrast_weight, "contrast_temp": a.contrast_temp,
                        "text_frozen": a.text_frozen,
                        "seed": a.seed, "threads": a.threads, "seconds": round(train_s, 1),
                        "final_metrics": summary["metrics"]},
              "eval": evaluate(str(out), a.eval_n, a.eval_steps, a.eval_guidance, spacing=a.eval_spacing, base=a.base)
              if a.eval_n else {}}
    if a.eval_n:
        result["eval"]["direction_gap"] = direction_gap(str(out), a.eval_n, timesteps=gap_ts, base=a.base)
        result["eval"]["text_separation"] = text_separation(str(out), base=a.base)
    result["eval"]["seconds"] = round(time.time() - t0 - train_s, 1)
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
