"""Video pipelines and seeded sampling: an image SD pipeline directory + a motion adapter (or a trained video
UNet) -> diffusers' `AnimateDiffPipeline`; clips drawn so that clip i depends only on (prompt_i, seed_i)."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AnimateDiffPipeline, MotionAdapter, StableDiffusionPipeline, UNet2DConditionModel, UNetMotionModel
from PIL import Image
from transformers import CLIPTextModel
from tqdm.auto import tqdm

from .temporal import exportable, extract_adapter
from .text import TEXT_ENCODER, shipped_text_encoder, text_encoder_differs

SPATIAL_UNET = "unet"  # optional sub-folder of an adapter directory: the image UNet it was trained with


def shipped_spatial_unet(motion_dir: str | Path) -> UNet2DConditionModel | None:
    """The image UNet an adapter directory ships in its `unet/` sub-folder (its spatial LoRA, fused), else None."""
    path = Path(motion_dir) / SPATIAL_UNET
    return UNet2DConditionModel.from_pretrained(path) if (path / "config.json").is_file() else None


def spatial_unet_from_video(video_unet: UNetMotionModel | str | Path,
                            base_unet: UNet2DConditionModel | str | Path) -> UNet2DConditionModel:
    """The image UNet inside a video UNet (e.g. spatial LoRA fused in by `exportable`): `base_unet`'s config
    with every non-motion weight of `video_unet` (both name their spatial parts alike)."""
    if isinstance(video_unet, (str, Path)):
        video_unet = UNetMotionModel.from_pretrained(video_unet)
    video_unet = exportable(video_unet)
    if isinstance(base_unet, (str, Path)):
        base_unet = UNet2DConditionModel.from_pretrained(base_unet)
    unet = UNet2DConditionModel.from_config(base_unet.config)
    unet.load_state_dict({k: v for k, v in video_unet.state_dict().items() if "motion_modules" not in k},
                         strict=True)
    return unet.to(next(video_unet.parameters()).dtype)


def video_pipeline(image_pipeline: str | Path | StableDiffusionPipeline,
                   motion: MotionAdapter | UNetMotionModel | str | Path,
                   text_encoder: torch.nn.Module | None = None) -> AnimateDiffPipeline:
    """An AnimateDiffPipeline from an SD1.5-format image pipeline (directory or loaded) and either a
    MotionAdapter (object or directory: the pipeline inflates the image UNet with it; a directory with a
    `unet/` sub-folder supplies that image UNet instead of the pipeline's, one with a `text_encoder/` sub-folder
    that text encoder) or a video UNet built by `temporal.inflate` (used as is, after folding blends and merging
    LoRA). `text_encoder`: use this one instead of the pipeline's (or the directory's)."""
    img = (image_pipeline if isinstance(image_pipeline, StableDiffusionPipeline)
           else StableDiffusionPipeline.from_pretrained(image_pipeline, safety_checker=None,
                                                        requires_safety_checker=False))
    unet, te = img.unet, img.text_encoder
    if isinstance(motion, (str, Path)):
        unet = shipped_spatial_unet(motion) or unet
        te = shipped_text_encoder(motion) or te
        motion = MotionAdapter.from_pretrained(motion)
    if isinstance(motion, MotionAdapter):
        adapter = motion
    elif isinstance(motion, UNetMotionModel):
        unet, adapter = exportable(motion), None
    else:
        raise TypeError(f"motion must be a MotionAdapter, a UNetMotionModel or a directory, "
                        f"got {type(motion).__name__}")
    pipe = AnimateDiffPipeline(vae=img.vae, text_encoder=text_encoder or te, tokenizer=img.tokenizer, unet=unet,
                               motion_adapter=adapter, scheduler=img.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_video_model(image_pipeline: str | Path, video_unet: UNetMotionModel, out_dir: str | Path,
                     text_encoder: torch.nn.Module | None = None) -> dict:
    """Write `out_dir/motion_adapter` (MotionAdapter.from_pretrained; plus its `unet/`, the image UNet, when the
    video UNet's spatial weights differ from the pipeline's: spatial LoRA fused; plus `text_encoder/` when
    `text_encoder` differs from the pipeline's) and `out_dir/pipeline` (a full AnimateDiffPipeline directory:
    AnimateDiffPipeline.from_pretrained). Returns the two paths."""
    out = Path(out_dir)
    extract_adapter(video_unet).save_pretrained(out / "motion_adapter")
    if text_encoder is not None:
        base_te = CLIPTextModel.from_pretrained(image_pipeline, subfolder="text_encoder")
        if text_encoder_differs(text_encoder, base_te):
            text_encoder.save_pretrained(out / "motion_adapter" / TEXT_ENCODER)
        else:
            text_encoder = None
    pipe = video_pipeline(image_pipeline, video_unet, text_encoder)  # the UNet holds the motion modules
    base = UNet2DConditionModel.from_pretrained(image_pipeline, subfolder="unet")
    spatial = spatial_unet_from_video(pipe.unet, base)
    if any(not torch.equal(v, spatial.state_dict()[k]) for k, v in base.state_dict().items()):
        spatial.save_pretrained(out / "motion_adapter" / SPATIAL_UNET)  # spatial weights trained: ship them too
    pipe.save_pretrained(out / "pipeline")
    return {"motion_adapter": str(out / "motion_adapter"), "pipeline": str(out / "pipeline")}


@torch.no_grad()
def sample_videos(pipe: AnimateDiffPipeline, prompts: list[str], seeds: list[int], num_frames: int = 8,
                  steps: int = 25, guidance: float = 4.0, batch_size: int = 16, decode_chunk: int = 64,
                  resolution: int | None = None, timestep_spacing: str | None = None) -> list[list[Image.Image]]:
    """One clip (a list of `num_frames` PIL frames) per (prompt, seed); the VAE decodes `decode_chunk` frames
    at a time. `timestep_spacing` ("leading", "trailing", "linspace"; None: the scheduler's own) places the
    inference steps: with SD's "leading" and 10 steps the first is t = 901, with "trailing" t = 999, where the
    caption still decides the layout (and a clip's motion) rather than the noise."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    res = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    clips: list[list[Image.Image]] = []
    scheduler = pipe.scheduler
    if timestep_spacing is not None:
        if timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"timestep_spacing must be leading, trailing or linspace, got {timestep_spacing!r}")
        pipe.scheduler = type(scheduler).from_config(scheduler.config, timestep_spacing=timestep_spacing)
    pipe.set_progress_bar_config(disable=True)  # one bar over clips instead of one per batch
    try:
        with tqdm(total=len(prompts), desc="sample videos", unit="clip") as bar:
            for i in range(0, len(prompts), batch_size):
                gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds[i:i + batch_size]]
                out = pipe(prompts[i:i + batch_size], num_frames=num_frames, num_inference_steps=steps,
                           guidance_scale=guidance, height=res, width=res, generator=gens, output_type="pil",
                           decode_chunk_size=decode_chunk)
                clips.extend(list(frames) for frames in out.frames)
                bar.update(len(out.frames))
    finally:
        pipe.scheduler = scheduler
    return clips
