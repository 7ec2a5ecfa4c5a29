"""`mmalign sample`: fixed-seed samples of any pipeline or training export, as a folder every `eval` verb reads."""
from __future__ import annotations

import json
from pathlib import Path

from .core.config import ConfigError


def read_prompts(a) -> list[str]:
    prompts = list(a.prompt or [])
    if a.prompts_file:
        if not Path(a.prompts_file).is_file():
            raise FileNotFoundError(f"--prompts-file {a.prompts_file}: no such file")
        prompts += [ln.strip() for ln in Path(a.prompts_file).read_text().splitlines() if ln.strip()]
    if not prompts:
        raise ConfigError("give prompts with --prompt or --prompts-file")
    return [p for p in prompts for _ in range(a.per_prompt)]


def save_clips(out: Path, clips, prompts: list[str], seeds: list[int]) -> None:
    """samples/*.gif plus samples.jsonl (file_name, prompt, seed): what `mmalign eval videos` reads."""
    from .datasets.video import write_gif

    (out / "samples").mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w") as f:
        for i, (frames, p, s) in enumerate(zip(clips, prompts, seeds)):
            name = f"samples/{i:05d}.gif"
            write_gif(frames, out / name)
            f.write(json.dumps({"file_name": name, "prompt": p, "seed": s}) + "\n")


def cmd_sample(a) -> None:
    import torch

    from .diffusion.load_for_sampling import is_video_pipeline, load_for_sampling
    from .diffusion.sampling import sample_images, save_samples
    from .evals.grid import image_grid

    if a.per_prompt < 1 or a.steps < 1 or a.frames < 1:
        raise ConfigError("--per-prompt, --steps and --frames must be at least 1")
    prompts = read_prompts(a)
    seeds = [a.seed + i for i in range(len(prompts))]
    model = a.model if a.model or a.lora else a.default_model
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    pipe = load_for_sampling(model, a.lora, a.base).to(device)
    out = Path(a.out)
    if is_video_pipeline(pipe):
        from .video.sampling import sample_videos

        clips = sample_videos(pipe, prompts, seeds, num_frames=a.frames, steps=a.steps, guidance=a.guidance)
        save_clips(out, clips, prompts, seeds)
        firsts = [c[0] for c in clips]
        image_grid(firsts[:64], prompts[:64]).save(out / "grid.png")  # each clip's first frame
        print(f"wrote {len(clips)} clips of {a.frames} frames to {out}")
        return
    images = sample_images(pipe, prompts, seeds, steps=a.steps, guidance=a.guidance)
    save_samples(out, images, prompts, seeds)
    image_grid(images[:64], prompts[:64]).save(out / "grid.png")
    print(f"wrote {len(images)} images to {out}")


def register(sub) -> None:
    """Add the top-level `sample` verb to the `mmalign` parser's subparsers."""
    from .assets import SHAPEWORLD_SD

    p = sub.add_parser(
        "sample", help="generate images or clips for prompts with fixed seeds",
        description="Sample a pipeline (SD1.5, SDXL, AnimateDiff; directory or hub id), a LoRA export (its base "
                    "from its own metadata, or --base) or a video training export with fixed seeds, into a "
                    "folder `mmalign eval images|compare|videos` reads: samples/ and samples.jsonl.")
    p.add_argument("--model", metavar="DIR|HUB_ID", help="a pipeline directory or hub id, a training export (runs/<run>/final: full, LoRA "
                                   "or video), or, with --lora, the LoRA's base (default: the shipped ShapeWorld "
                                   "model, unless --lora is given)")
    p.add_argument("--lora", metavar="EXPORT", help="a LoRA export (pytorch_lora_weights.safetensors) to load onto --model, or onto "
                                  "the base the export names when --model is not given")
    p.add_argument("--base", metavar="DIR|HUB_ID", help="the base pipeline of a LoRA export (--model or --lora), in place of the one its "
                                  "metadata names")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="a text file, one prompt per line")
    p.add_argument("--per-prompt", type=int, default=1, help="samples per prompt, each with its own seed")
    p.add_argument("--seed", type=int, default=0, help="seed of the first sample; sample i uses seed+i")
    p.add_argument("--steps", type=int, default=25, help="denoising steps of the pipeline's scheduler")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    p.add_argument("--frames", type=int, default=8, help="frames per clip (video pipelines only)")
    p.add_argument("--device", default="auto", help="torch device, e.g. cpu or cuda (auto: cuda when available)")
    p.add_argument("--out", required=True, help="output folder: samples/, samples.jsonl and grid.png")
    p.set_defaults(fn=cmd_sample, default_model=str(SHAPEWORLD_SD))
