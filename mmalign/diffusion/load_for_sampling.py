"""What `mmalign sample` loads: a full pipeline (SD1.5, SDXL, SD3, FLUX or AnimateDiff; directory or hub id), a LoRA
export with its base (given, or named in the export's metadata), or a video training export -> one ready pipeline.

    pipe = load_for_sampling(model="runs/x/final")                  # LoRA export: base from its metadata
    pipe = load_for_sampling(model="sd15", lora="runs/x/final")     # the same LoRA on a base of your choice
"""
from __future__ import annotations

import json
from pathlib import Path

from ..core.config import ConfigError
from ..core.paths import looks_like_hub_id
from .lora import EXPORT_INFO, LORA_WEIGHTS
from .pipeline import absent_parts

INDEX = "model_index.json"
VIDEO_PIPELINE = "pipeline"  # a video training export's full AnimateDiffPipeline (video.sampling.save_video_model)


def export_kind(path: str | Path, option: str = "--model") -> str:
    """"pipeline" (a model_index.json, or a hub id), "lora" (LORA_WEIGHTS, no model_index.json) or "video"
    (VIDEO_PIPELINE/model_index.json); anything else is a FileNotFoundError naming what was expected."""
    p = Path(path)
    if not p.exists():
        if looks_like_hub_id(str(path)):
            return "pipeline"
        raise FileNotFoundError(f"{option} {path}: no such directory, and not a hub id (owner/name)")
    if (p / INDEX).is_file():
        return "pipeline"
    if (p / LORA_WEIGHTS).is_file():
        return "lora"
    if (p / VIDEO_PIPELINE / INDEX).is_file():
        return "video"
    raise FileNotFoundError(f"{option} {path}: not a pipeline directory ({INDEX}), a LoRA export ({LORA_WEIGHTS}) "
                            f"or a video export ({VIDEO_PIPELINE}/{INDEX})")


def lora_base(export: str | Path, option: str = "--lora") -> str:
    """The pipeline a LoRA export was trained on: its EXPORT_INFO, else the training run's config.yaml beside it
    (`model.pretrained`; exports written before EXPORT_INFO existed)."""
    import yaml

    info, run_config = Path(export) / EXPORT_INFO, Path(export).resolve().parent / "config.yaml"
    if info.is_file():
        try:
            base = json.loads(info.read_text()).get("base")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ConfigError(f"{option} {export}: unreadable {EXPORT_INFO} ({e}); give the base with --base") from e
        if isinstance(base, str) and base:
            return base
    if run_config.is_file():
        base = ((yaml.safe_load(run_config.read_text()) or {}).get("model") or {}).get("pretrained")
        if isinstance(base, str) and base:
            return base
    raise ConfigError(f"{option} {export}: the LoRA export does not name its base (no {EXPORT_INFO} in it, no run "
                      f"config.yaml beside it); give it with --base DIR|HUB_ID")


def load_pipeline(source: str | Path, option: str = "--model"):
    """A full pipeline of the class its model_index.json names (a video export's VIDEO_PIPELINE), safety checker
    off where the class has one."""
    from diffusers import DiffusionPipeline

    kind = export_kind(source, option)
    if kind == "video":
        source = Path(source) / VIDEO_PIPELINE
    elif kind == "lora":
        raise ConfigError(f"{option} {source} is a LoRA export, not a full pipeline")
    try:
        index = DiffusionPipeline.load_config(str(source))
        extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
        return DiffusionPipeline.from_pretrained(str(source), **{**absent_parts(index), **extra})
    except OSError as e:  # a hub id that is not there (or no network), a folder with missing parts
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"{option} {source}: cannot load the pipeline ({first})") from e


def load_for_sampling(model: str | Path | None = None, lora: str | Path | None = None,
                      base: str | Path | None = None):
    """The pipeline to sample. `model`: a full pipeline, a video export, or a LoRA export (then it is the LoRA and
    `base` or its metadata the base); `lora`: a LoRA export put on `model` (or, without `model`, on `base` or the
    base its metadata names). `base` only applies to a LoRA: with a full `model` it is an error."""
    if model is None and lora is None:
        raise ConfigError("give --model (a pipeline or an export) or --lora (a LoRA export)")
    if model is not None and export_kind(model, "--model") == "lora":
        if lora is not None:
            raise ConfigError(f"--model {model} is a LoRA export and --lora {lora} another: give one LoRA, and its "
                              f"base with --base")
        model, lora = None, model
    elif model is not None and base is not None:
        raise ConfigError(f"--base applies to a LoRA export only; --model {model} is a full pipeline"
                          + (" (and the base of --lora)" if lora is not None else ""))
    if lora is not None and export_kind(lora, "--lora") != "lora":
        raise ConfigError(f"--lora {lora}: not a LoRA export (no {LORA_WEIGHTS}; a full pipeline goes to --model)")
    if model is None:
        model, option = (base, "--base") if base is not None else (lora_base(lora), f"the base recorded by {lora}")
        try:
            pipe = load_pipeline(model, option)
        except FileNotFoundError as e:
            hint = "" if base is not None else "; give the base with --base DIR|HUB_ID"
            raise FileNotFoundError(f"--lora {lora}: its base cannot be loaded: {e}{hint}") from e
    else:
        pipe = load_pipeline(model)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe


def is_video_pipeline(pipe) -> bool:
    """True for pipelines that return clips (AnimateDiff's: they have a motion adapter slot)."""
    return "motion_adapter" in pipe.components
