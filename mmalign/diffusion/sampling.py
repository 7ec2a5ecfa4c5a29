"""Sampling with fixed seeds: image i of a call depends only on (prompt_i, seed_i), never on the batch; plus the
sample folder every `eval` tool reads back and the ShapeWorld scoring of a set of samples."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..core.stats import bootstrap_ci
from ..datasets.shapeworld import score_image


@torch.no_grad()
def sample_images(pipe, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 4.0,
                  batch_size: int = 64, resolution: int | None = None, desc: str = "sample") -> list[Image.Image]:
    """One image per (prompt, seed), in batches, with a progress bar over images (diffusers' per-step bar is off:
    one bar per batch would scroll)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    res = resolution or native_resolution(pipe)
    pipe.set_progress_bar_config(disable=True)
    images: list[Image.Image] = []
    with tqdm(total=len(prompts), desc=desc, unit="img") as bar:
        for i in range(0, len(prompts), batch_size):
            gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds[i:i + batch_size]]
            out = pipe(prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                       height=res, width=res, generator=gens, output_type="pil")
            images.extend(out.images)
            bar.update(len(out.images))
    return images


def native_resolution(pipe) -> int:
    """The pipeline's default image size: its UNet's sample size, or for SD3/FLUX (a transformer) the pipeline's
    default_sample_size, times the VAE's factor."""
    size = pipe.default_sample_size if "transformer" in pipe.components else pipe.unet.config.sample_size
    return size * pipe.vae_scale_factor


def save_samples(out: Path, images, prompts, seeds, scores=None) -> None:
    """samples/*.png plus samples.jsonl (file_name, prompt, seed[, scores]): what `eval` tools read back."""
    out = Path(out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w") as f:
        for i, (im, p, s) in enumerate(zip(images, prompts, seeds)):
            name = f"samples/{i:05d}.png"
            im.save(out / name)
            row = {"file_name": name, "prompt": p, "seed": s}
            if scores is not None:
                row["scores"] = scores[i]
            f.write(json.dumps(row) + "\n")


def score_samples(images: list[Image.Image], prompts: list[str]) -> dict:
    """ShapeWorld per-attribute accuracy with 95 % bootstrap CIs over distinct prompts (a prompt's samples are
    resampled together, `core.stats`), plus the per-sample scores."""
    per = [score_image(im, p) for im, p in zip(images, prompts)]
    summary = {}
    for key in sorted({k for s in per for k in s}):
        vals = [s[key] for s in per if key in s]
        mean, lo, hi = bootstrap_ci(vals, groups=[p for s, p in zip(per, prompts) if key in s])
        summary[key] = {"mean": round(mean, 4), "ci95": [round(lo, 4), round(hi, 4)], "n": len(vals)}
    return {"summary": summary, "per_sample": per}
