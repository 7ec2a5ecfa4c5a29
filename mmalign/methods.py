"""The methods `mmalign train` knows, by the name a recipe's `method:` key uses."""
from __future__ import annotations

PAIR_METHOD_NAMES = ("diffusion_dpo", "diffusion_sft_winners", "inpo", "inversion_dpo", "diffusion_cca",
                     "diffusion_bco")


def _diffusion_sft():
    from .diffusion.sft import DiffusionSFT
    return DiffusionSFT


def _pair_method(name: str):
    def load():
        from .diffusion.objectives import PAIR_METHODS
        return PAIR_METHODS[name]
    return load


def _mllm(name: str):
    def load():
        from .mllm import dpo, sft
        return {"mllm_sft": sft.MLLMSFT, "mllm_steerlm": sft.MLLMSteerLM, "mllm_dpo": dpo.MLLMDPO,
                "mllm_mdpo": dpo.MLLMmDPO}[name]
    return load


def _video(name: str):
    def load():
        from .video.methods import VIDEO_METHODS
        return VIDEO_METHODS[name]
    return load


MLLM_METHOD_NAMES = ("mllm_sft", "mllm_steerlm", "mllm_dpo", "mllm_mdpo")
VIDEO_METHOD_NAMES = ("video_temporal", "video_dpo")
METHODS = {"diffusion_sft": _diffusion_sft, **{n: _pair_method(n) for n in PAIR_METHOD_NAMES},
           **{n: _mllm(n) for n in MLLM_METHOD_NAMES}, **{n: _video(n) for n in VIDEO_METHOD_NAMES}}


def method_class(name: str):
    if name not in METHODS:
        from .core.config import ConfigError
        raise ConfigError(f"method: unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]()
