"""Load any AutoModelForImageTextToText + AutoProcessor checkpoint (local dir or hub id), choose what trains
(LoRA or full; vision tower frozen by default; projector optional), and export in native formats."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..core.config import ConfigError, bounded, not_identity

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VISION_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder")
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "merger", "connector")
# Linear layers of decoder LMs (Llama, Mistral, Qwen, Gemma); vision-tower layers are excluded by the regex.
LM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class VLModelConfig:
    pretrained: str  # model directory or hub id
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # weights' dtype; below fp32 only with LoRA (adapters fp32)
    lora_rank: int = bounded(0, 0)  # 0: full fine-tune of the language model
    lora_alpha: int = bounded(0, 0)  # 0: 2 x rank
    lora_dropout: float = bounded(0.0, 0, 1, hi_open=True)
    lora_targets: list[str] = field(default_factory=lambda: list(LM_LINEAR))  # language-model module names
    train_vision: bool = False
    train_projector: bool = False
    reference: Literal["", "frozen_copy", "adapters_off", "cache"] = ""  # "": adapters_off with LoRA, else frozen_copy
    gradient_checkpointing: bool = not_identity(False)  # same math, less memory
    attn_implementation: str = not_identity("")  # "" = transformers' default (sdpa where available)


def _is_under(name: str, names: tuple[str, ...]) -> bool:
    return any(part in names for part in name.split("."))


def load_vlm(source: str, dtype: str = "fp32", attn_implementation: str = ""):
    """(model, processor) from a directory or hub id; a clear error when neither exists locally offline."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype: {dtype!r} — one of {', '.join(DTYPES)}")
    kwargs = {"dtype": DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        processor = AutoProcessor.from_pretrained(source)
        model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    except OSError as e:
        where = "directory" if os.path.isdir(source) else "hub id (no local copy and no network?)"
        raise OSError(f"cannot load a vision-language model from {source!r} ({where}): {e}") from e
    return model, processor


def prepare_trainable(model: torch.nn.Module, cfg: VLModelConfig) -> torch.nn.Module:
    """Freeze/unfreeze per the config; with lora_rank > 0 wrap in a peft PeftModel (a trained projector then
    goes in `modules_to_save`, so the adapter export carries it)."""
    if cfg.dtype != "fp32" and cfg.lora_rank == 0:
        raise ConfigError("model.dtype: below fp32 only with LoRA (a full fine-tune keeps fp32 master weights; "
                          "use train.mixed_precision)")
    names = [n for n, _ in model.named_modules()]
    projector = sorted({n for n in names if n.split(".")[-1] in PROJECTOR_NAMES})
    if cfg.train_projector and not projector:
        raise ConfigError(f"model.train_projector: no projector module found (looked for {PROJECTOR_NAMES})")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if cfg.lora_rank > 0:
        from peft import LoraConfig, get_peft_model
        vision = "|".join(VISION_NAMES)
        targets = "|".join(cfg.lora_targets)
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
                          lora_dropout=cfg.lora_dropout,
                          target_modules=rf"^(?!.*\b({vision})\b).*\.({targets})$",
                          modules_to_save=[projector[0].split(".")[-1]] if cfg.train_projector else None)
        model = get_peft_model(model, lora)
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if cfg.train_vision:
            for n, p in model.named_parameters():
                if _is_under(n, VISION_NAMES):
                    p.requires_grad_(True)
        return model
    for n, p in model.named_parameters():
        if _is_under(n, VISION_NAMES):
            p.requires_grad_(cfg.train_vision)
        elif _is_under(n, PROJECTOR_NAMES):
            p.requires_grad_(cfg.train_projector)
        else:
            p.requires_grad_(True)
    return model


def reference_kind(cfg: VLModelConfig) -> str:
    kind = cfg.reference or ("adapters_off" if cfg.lora_rank > 0 else "frozen_copy")
    if kind == "adapters_off" and cfg.lora_rank == 0:
        raise ConfigError("model.reference: adapters_off needs LoRA (model.lora_rank > 0)")
    if kind == "adapters_off" and (cfg.train_projector or cfg.train_vision):
        raise ConfigError("model.reference: adapters_off would see the trained projector/vision weights; "
                          "use frozen_copy or cache")
    return kind


def save_vlm(model: torch.nn.Module, processor, out_dir: str, merge: bool = False) -> None:
    """LoRA: the adapter (loads with `PeftModel.from_pretrained(base, out_dir)`), or with `merge` a full model;
    full fine-tune: `save_pretrained` (loads with AutoModelForImageTextToText). The processor goes alongside."""
    from peft import PeftModel

    os.makedirs(out_dir, exist_ok=True)
    if isinstance(model, PeftModel) and merge:
        import copy
        copy.deepcopy(model).merge_and_unload().save_pretrained(out_dir)
    else:
        model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
