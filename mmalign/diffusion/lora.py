"""LoRA on a diffusers UNet (image or video) or SD3/FLUX transformer through its peft integration, and its export in
diffusers' format."""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]  # every attention's projections, self and cross
# SD3/FLUX joint attention adds the text stream's projections (flow.FLOW_ATTENTION_PROJECTIONS)
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file diffusers' save_lora_weights writes
EXPORT_INFO = "mmalign_export.json"  # beside it: {"kind": "lora", "base": ..., "method": ...}


def add_lora(unet: nn.Module, rank: int, alpha: int = 0, targets: list[str] | str = ATTENTION_PROJECTIONS) -> None:
    """One peft LoRA adapter ("default", gaussian init) of `rank` and `alpha` (0: alpha = rank) on `targets`:
    module-name suffixes, or one regex that peft full-matches. Only the adapter's weights train afterwards."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                target_modules=targets if isinstance(targets, str) else list(targets)))


def save_unet_lora(pipeline_cls, unet: nn.Module, out_dir: str, base: str | None = None,
                   method: str | None = None, slot: str = "unet") -> None:
    """The UNet's LoRA in diffusers' format (`pipe.load_lora_weights(out_dir)`); the adapter metadata carries
    lora_alpha, without which loaders assume alpha = rank. `slot`: the pipeline's name for the denoiser ("unet",
    or "transformer" for SD3/FLUX). With `base`, EXPORT_INFO names the pipeline it was trained on (a local path
    made absolute), so `mmalign sample` finds it."""
    from peft.utils import get_peft_model_state_dict

    pipeline_cls.save_lora_weights(out_dir, **{f"{slot}_lora_layers": get_peft_model_state_dict(unet),
                                               f"{slot}_lora_adapter_metadata": unet.peft_config["default"].to_dict()})
    if base is not None:
        base = str(Path(base).resolve()) if Path(base).exists() else str(base)
        info = {"kind": "lora", "base": base, "method": method}
        (Path(out_dir) / EXPORT_INFO).write_text(json.dumps(info) + "\n")
