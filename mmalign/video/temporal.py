"""Turning an image `UNet2DConditionModel` into a video model with diffusers' own parts.

AnimateDiff-style: a `MotionAdapter` sized to the UNet (one temporal transformer after every spatial layer,
diffusers' `AnimateDiffTransformer3D`: attention over the frames at each pixel, sinusoidal frame positions)
and `UNetMotionModel.from_unet2d`. Each motion module computes `x + proj_out(T(x))`; diffusers initialises
`proj_out` randomly, we zero it, so a fresh video model is exactly the image model applied frame by frame.
Spatial weights are frozen; LoRA on the spatial attention (or on the motion modules) is optional
(`LORA_PLACEMENTS`, through `mmalign.diffusion.lora.add_lora`; then `set_trainable`).

Video-LDM-style option (Blattmann et al. 2023): each motion module's output is merged with its input by a
learnable alpha, `z = alpha * z_spatial + (1 - alpha) * z_temporal` (diffusers' `AlphaBlender`, strategy
"learned": alpha = sigmoid(mix_factor); "fixed": alpha itself). alpha = 1 is exactly the image model.
Because `z_temporal = z_spatial + proj_out(T(z_spatial))`, the merge equals scaling proj_out by (1 - alpha):
`fold_alpha_blend` does that, so an exported adapter is a plain `MotionAdapter`.

Layouts: diffusers video latents are (B, C, F, H, W). The image UNet and the VAE see frames as a batch of
images, (B*F, C, H, W), the F frames of each video contiguous (video-major). Frame readers give (B, F, C, H, W).
`UNetMotionModel` (diffusers 0.42.1) takes sample (B, C, F, H, W), one timestep per video (B,), and
encoder_hidden_states already repeated per frame, (B*F, L, D) (`repeat_per_frame`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.models.resnet import AlphaBlender
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D
from torch import nn

ATTN = r"(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
# where a LoRA goes (diffusion.lora.add_lora's `targets`; peft full-matches a string target): the spatial
# transformers' attention, their caption cross-attention only, the motion modules' attention, or both kinds
LORA_PLACEMENTS = {
    "spatial": rf"^(?!.*motion_modules).*{ATTN}$",
    "cross": r"^(?!.*motion_modules).*attn2\.(to_q|to_k|to_v|to_out\.0)$",  # the caption's way in
    "temporal": rf"^.*motion_modules.*{ATTN}$",
    "both": rf"^.*{ATTN}$",
}


# --- layouts ----------------------------------------------------------------------------------------------

def to_frame_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B*F, C, H, W), row b*F + f = frame f of video b."""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def from_frame_batch(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B*F, C, H, W) -> (B, C, F, H, W); the inverse of `to_frame_batch`."""
    bf, c, h, w = x.shape
    if bf % num_frames:
        raise ValueError(f"{bf} frames do not split into videos of {num_frames} frames")
    return x.reshape(bf // num_frames, num_frames, c, h, w).permute(0, 2, 1, 3, 4)


def bfchw_to_bcfhw(x: torch.Tensor) -> torch.Tensor:
    """(B, F, C, H, W) (frames as a reader gives them) -> (B, C, F, H, W) (diffusers video latents)."""
    return x.permute(0, 2, 1, 3, 4)


def bcfhw_to_bfchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 1, 3, 4)


def repeat_per_frame(ctx: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Text embeddings (B, L, D) -> (B*F, L, D) in the video-major frame order of `to_frame_batch`."""
    return ctx.repeat_interleave(num_frames, dim=0)


# --- inflation --------------------------------------------------------------------------------------------

@dataclass
class MotionSpec:
    """Size of fresh motion modules (the UNet fixes channels, layers per block and norm groups)."""
    heads: int = 8  # attention heads per motion module (must divide every block's channels)
    transformer_layers: int = 1  # temporal transformer layers per motion module
    max_frames: int = 32  # sinusoidal frame-position table length
    mid_block: bool = True  # a motion module in the UNet's middle block too


def motion_adapter_for(unet: UNet2DConditionModel, spec: MotionSpec | None = None) -> MotionAdapter:
    """A randomly initialised MotionAdapter that fits `unet` (channels, layers per block, norm groups)."""
    spec = spec or MotionSpec()
    c = unet.config
    bad = [ch for ch in c.block_out_channels if ch % spec.heads]
    if bad:
        raise ValueError(f"motion heads {spec.heads} must divide every block's channels {list(c.block_out_channels)}")
    return MotionAdapter(block_out_channels=tuple(c.block_out_channels), motion_layers_per_block=c.layers_per_block,
                         motion_transformer_layers_per_block=spec.transformer_layers,
                         motion_transformer_layers_per_mid_block=spec.transformer_layers,
                         motion_num_attention_heads=spec.heads, motion_norm_num_groups=c.norm_num_groups,
                         motion_max_seq_length=spec.max_frames, use_motion_mid_block=spec.mid_block)


def motion_modules(model: nn.Module) -> list[tuple[str, AnimateDiffTransformer3D]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AnimateDiffTransformer3D)]


@torch.no_grad()
def zero_motion_outputs(model: nn.Module) -> int:
    """Zero every motion module's proj_out (weight and bias): each module becomes the identity. Returns the count."""
    mods = motion_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no motion modules")
    for _, m in mods:
        m.proj_out.weight.zero_()
        m.proj_out.bias.zero_()
    return len(mods)


def inflate(unet: UNet2DConditionModel, adapter: MotionAdapter | None = None, spec: MotionSpec | None = None,
            zero_init: bool | None = None) -> UNetMotionModel:
    """The video model: `UNetMotionModel.from_unet2d(unet, adapter)` with spatial weights frozen
    (`freeze_unet2d_params`). Without `adapter`, a fresh one sized by `spec`; `zero_init` (default: only for a
    fresh adapter) zeroes the motion outputs so the model starts as the image model."""
    fresh = adapter is None
    model = UNetMotionModel.from_unet2d(unet, adapter if adapter is not None else motion_adapter_for(unet, spec))
    if zero_init if zero_init is not None else fresh:
        zero_motion_outputs(model)
    model.freeze_unet2d_params()
    return model


# --- Video-LDM merge --------------------------------------------------------------------------------------

class BlendedMotion(nn.Module):
    """alpha * input + (1 - alpha) * motion(input): the spatial output merged with the temporal one."""

    def __init__(self, motion: AnimateDiffTransformer3D, blender: AlphaBlender):
        super().__init__()
        self.motion, self.blender = motion, blender

    def forward(self, hidden_states, *args, **kwargs):
        return self.blender(hidden_states, self.motion(hidden_states, *args, **kwargs))

    def alpha(self) -> torch.Tensor:
        b = self.blender
        return b.mix_factor if b.merge_strategy == "fixed" else torch.sigmoid(b.mix_factor)


def add_alpha_blend(model: nn.Module, alpha: float = 0.5, learned: bool = True) -> int:
    """Wrap every motion module in a `BlendedMotion`; alpha learned (sigmoid of a parameter, so 0 < alpha < 1)
    or fixed (any value in [0, 1]; 1 = the image model). Returns the number wrapped."""
    if learned and not 0 < alpha < 1:
        raise ValueError(f"a learned alpha is sigmoid(parameter): the initial alpha must lie in (0, 1), got {alpha}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    mods = motion_modules(model)
    for name, m in mods:
        parent, attr = _parent(model, name)
        if isinstance(parent, BlendedMotion):
            raise ValueError(f"{name} is already blended")
        blender = (AlphaBlender(math.log(alpha / (1 - alpha)), "learned") if learned
                   else AlphaBlender(alpha, "fixed"))
        setattr(parent, attr, BlendedMotion(m, blender.to(m.proj_out.weight)))
    return len(mods)


@torch.no_grad()
def fold_alpha_blend(model: nn.Module) -> int:
    """Replace each `BlendedMotion` by its motion module with proj_out scaled by (1 - alpha): the same function
    (x + (1-a) proj_out(T(x))), as a plain motion module. Returns the number folded."""
    blends = [(n, m) for n, m in model.named_modules() if isinstance(m, BlendedMotion)]
    for name, b in blends:
        keep = (1 - b.alpha()).to(b.motion.proj_out.weight)
        b.motion.proj_out.weight.mul_(keep)
        b.motion.proj_out.bias.mul_(keep)
        parent, attr = _parent(model, name)
        setattr(parent, attr, b.motion)
    return len(blends)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


# --- what trains ------------------------------------------------------------------------------------------

def set_trainable(model: nn.Module, motion: bool = True) -> list[str]:
    """Trainable = LoRA weights (if any), the alpha blenders, and the motion modules' own weights when `motion`.
    Everything else (the image model) is frozen. Returns the trainable parameter names."""
    for name, p in model.named_parameters():
        lora = "lora_" in name
        p.requires_grad_(lora or "blender" in name or (motion and "motion_modules" in name))
    return [n for n, p in model.named_parameters() if p.requires_grad]


def exportable(model: nn.Module) -> UNetMotionModel:
    """A copy of the video UNet as a plain `UNetMotionModel`: alpha blends folded, LoRA merged and removed."""
    model = copy.deepcopy(model)
    fold_alpha_blend(model)
    if getattr(model, "peft_config", None):
        model.fuse_lora()
        model.unload_lora()
    return model


def extract_adapter(model: UNetMotionModel) -> MotionAdapter:
    """The motion modules of a video UNet as a `MotionAdapter` (the full config, unlike diffusers'
    `save_motion_modules`, which drops the transformer depth); blends folded and LoRA merged first."""
    model = exportable(model)
    c = model.config
    adapter = MotionAdapter(block_out_channels=tuple(c.block_out_channels), motion_layers_per_block=c.layers_per_block,
                            motion_transformer_layers_per_block=c.temporal_transformer_layers_per_block,
                            motion_transformer_layers_per_mid_block=c.temporal_transformer_layers_per_mid_block,
                            motion_num_attention_heads=c.motion_num_attention_heads,
                            motion_norm_num_groups=c.norm_num_groups, motion_max_seq_length=c.motion_max_seq_length,
                            use_motion_mid_block=c.use_motion_mid_block)
    state = {k: v for k, v in model.state_dict().items() if "motion_modules" in k}
    adapter.load_state_dict(state, strict=True)
    return adapter.to(next(model.parameters()).dtype)
