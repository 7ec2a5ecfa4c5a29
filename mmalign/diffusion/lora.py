"""LoRA on a diffusers UNet (image or video) through its peft integration, and its export in diffusers' format."""
from __future__ import annotations

from torch import nn

ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]  # every attention's projections, self and cross


def add_lora(unet: nn.Module, rank: int, alpha: int = 0, targets: list[str] | str = ATTENTION_PROJECTIONS) -> None:
    """One peft LoRA adapter ("default", gaussian init) of `rank` and `alpha` (0: alpha = rank) on `targets`:
    module-name suffixes, or one regex that peft full-matches. Only the adapter's weights train afterwards."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                target_modules=targets if isinstance(targets, str) else list(targets)))


def save_unet_lora(pipeline_cls, unet: nn.Module, out_dir: str) -> None:
    """The UNet's LoRA in diffusers' format (`pipe.load_lora_weights(out_dir)`); the adapter metadata carries
    lora_alpha, without which loaders assume alpha = rank."""
    from peft.utils import get_peft_model_state_dict

    pipeline_cls.save_lora_weights(out_dir, unet_lora_layers=get_peft_model_state_dict(unet),
                                   unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
