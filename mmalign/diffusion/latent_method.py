"""What every latent-diffusion training method shares (image SFT, the pair objectives, the video methods): frozen
encoders placed once, fresh posterior samples from cached (mean, std), caption dropout, timestep draws (every
draw per row, from a `core.row_rng.RowRandom`: the same in any batch/process layout), the reference, batches,
and the export of an image pipeline. A method subclasses `LatentDiffusionMethod` and defines `build`, `dataset` and
`loss` (see mmalign.core.method.Method); its policy subclasses `UNetPolicy`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from ..core.config import ConfigError
from ..core.reference import make_reference
from ..core.row_rng import RowRandom
from .lora import save_unet_lora
from .pipeline import (BASE_NOTES, SDComponents, absent_parts, load_sd_components, pipeline_class, read_format,
                       read_index, training_latents)


class UNetPolicy(nn.Module):
    """The trainable policy around `self.unet`; the adapters-off reference switches the UNet's LoRA off and on."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def disable_adapters(self):
        self.unet.disable_adapters()

    def enable_adapters(self):
        self.unet.enable_adapters()


class LatentDiffusionMethod:
    """Shared plumbing. `self.empty`: the empty caption's conditioning, by the keys of the method's caption
    conditioning (set by `dataset()`); `self.ref`: the reference strategy (`attach_reference`)."""

    needs_reference = False
    # why a rectified-flow (SD3/FLUX) pipeline is refused (a ConfigError at build); None: the method supports it
    flow_refusal: str | None = "it is written for UNet (epsilon/v-prediction) pipelines only"
    wants_row_seed = True  # the trainer attaches batch["row_seed"]: every draw is per row (core.row_rng)

    def __init__(self, cfg, output_dir: str):
        self.cfg, self.output_dir = cfg, output_dir
        self.parts: SDComponents | None = None
        self.empty: dict[str, torch.Tensor] = {}
        self.ref = None
        self._latents: str | None = None

    # --- models --------------------------------------------------------------------------------------------

    def load_parts(self, pretrained: str, device: torch.device, dtype: torch.dtype = torch.float32) -> SDComponents:
        """Load the pipeline's components; the VAE and text encoders go to `device`, frozen, in eval mode."""
        self.device = device
        fmt = read_format(pretrained)
        if fmt in ("sd3", "flux") and self.flow_refusal:
            raise ConfigError(f"model.pretrained {pretrained}: a rectified-flow ({fmt.upper()}) pipeline, and "
                              f"{type(self).__name__} cannot train it: {self.flow_refusal}")
        self.parts = load_sd_components(pretrained, dtype)
        for enc in self.encoders():
            enc.to(device).requires_grad_(False).eval()
        return self.parts

    def encoders(self) -> list[nn.Module]:
        p = self.parts
        return [enc for enc in (p.vae, p.text_encoder, p.text_encoder_2, p.text_encoder_3) if enc is not None]

    def attach_reference(self, kind: str, policy: nn.Module) -> None:
        """`self.ref` = the reference strategy `kind` (core.reference.make_reference), when the method needs one."""
        self.ref = make_reference(kind, policy) if self.needs_reference else None

    def ref_forward(self, *args) -> torch.Tensor:
        return self.ref(lambda model: model(*args))

    def data_resolution(self) -> int:
        """The training resolution: `data.resolution`, or the model's native one when 0. Call after `load_parts`,
        before encoding: a size the VAE cannot encode or far above native is a ConfigError, another size a
        warning (off-native sizes cost encode time and quality)."""
        native, asked = self.parts.resolution, self.cfg.data.resolution
        if not asked or asked == native:
            return native
        factor = self.parts.pixel_factor
        if asked % factor:
            patches = " with the transformer's 2x2 patches" if getattr(self.parts, "flow", None) else ""
            raise ConfigError(f"data.resolution: {asked} is not a multiple of the VAE's factor{patches} {factor} "
                              f"(the model's native size is {native}; 0 uses it)")
        if asked > 4 * native:
            raise ConfigError(f"data.resolution: {asked} is more than 4x the model's native {native} px; "
                              f"set data.resolution={native} or 0 (native)")
        print(f"warning: data.resolution: training at {asked} px, the model's native size is {native} px")
        return asked

    # --- batches -------------------------------------------------------------------------------------------

    def collate(self, rows: list[dict]) -> dict:
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def latent_source(self) -> str:
        """"sample" or "mean": `data.latents`, or with "auto" what the base declares (`pipeline.training_latents`:
        a denoiser trained on posterior means sees off-distribution x0 in samples, and in a flow model's velocity
        target v = eps - x0 that posterior noise is unpredictable error)."""
        if self._latents is None:
            asked = self.cfg.data.latents
            self._latents = training_latents(self.cfg.model.pretrained) if asked == "auto" else asked
            if asked == "auto" and self._latents != "sample":
                print(f"data.latents: {self._latents} (declared by the base's {BASE_NOTES})")
        return self._latents

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor, rows: RowRandom,
                       name: str = "latent") -> torch.Tensor:
        """A fresh sample of the cached VAE posterior (draw `name`; with `latent_source()` "mean", the mean), minus
        the VAE's shift factor (SD3/FLUX VAEs have one), times its scaling factor."""
        vae = self.parts.vae.config
        if self.latent_source() == "sample":
            mean = mean + std * rows.randn(name, std.shape[1:], std.device, std.dtype)
        return (mean - (vae.shift_factor or 0.0)) * vae.scaling_factor

    def drop_captions(self, cond: dict[str, torch.Tensor], p: float, rows: RowRandom,
                      name: str = "caption_dropout") -> dict[str, torch.Tensor]:
        """Each row's caption (every key of `self.empty` in `cond`, together) replaced by the empty caption's
        with probability `p`: one draw per row (draw `name`; none when p <= 0)."""
        if p <= 0:
            return cond
        first = next(iter(cond.values()))
        drop = rows.rand(name, first.device) < p
        return {k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), self.empty[k].to(v), v) if k in self.empty
                else v for k, v in cond.items()}

    def sample_t(self, rows: RowRandom, device: torch.device | None = None, shape: tuple = (),
                 low: int = 0) -> torch.Tensor:
        """Training timesteps [n, *shape], uniform over [low, the scheduler's range) (draw "t"); for a flow
        pipeline the draw indexes its sigma table: float t = σ·N (`flow.FlowMatchForward.train_timesteps`)."""
        sched = self.parts.noise_scheduler
        t = rows.randint("t", low, sched.config.num_train_timesteps, self.device if device is None else device, shape)
        return sched.train_timesteps(t) if self.parts.is_flow else t

    # --- data and export -----------------------------------------------------------------------------------

    def require_rows(self, report, source: str) -> None:
        """A clear error when no row is usable (the dataset could not even be built empty)."""
        if report.kept == 0:
            raise ValueError(f"{source}: no usable rows ({report.summary()})")

    def save_image_pipeline(self, unet: nn.Module, out_dir: str, **components) -> None:
        """A full pipeline directory with `unet` (SD3/FLUX: the transformer; and `components`) in place of the
        pretrained ones; with LoRA (`cfg.model.lora_rank`), the adapter alone in diffusers' format
        (`pipe.load_lora_weights(out_dir)`)."""
        cls, slot = pipeline_class(self.parts), "transformer" if self.parts.is_flow else "unet"
        if self.cfg.model.lora_rank > 0:
            save_unet_lora(cls, unet, out_dir, base=self.cfg.model.pretrained, method=type(self).__name__, slot=slot)
            return
        sd15 = not (self.parts.is_sdxl or self.parts.is_flow)
        extra = {"safety_checker": None, "requires_safety_checker": False} if sd15 else {}
        absent = absent_parts(read_index(self.cfg.model.pretrained))  # e.g. an SD3 base saved without T5
        cls.from_pretrained(self.cfg.model.pretrained, **{**absent, slot: unet, **components, **extra}
                            ).save_pretrained(out_dir)
        self.copy_base_notes(out_dir)

    def copy_base_notes(self, out_dir: str) -> None:
        """The base's mmalign_base.json goes with a full export: training on from it keeps the base's latents."""
        notes = Path(self.cfg.model.pretrained) / BASE_NOTES
        if notes.is_file():
            shutil.copyfile(notes, Path(out_dir) / BASE_NOTES)
