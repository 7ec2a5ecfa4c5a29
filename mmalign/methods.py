"""The methods `mmalign train` knows, by the name a recipe's `method:` key uses (a flat dict)."""
from __future__ import annotations


def _diffusion_sft():
    from .diffusion.sft import DiffusionSFT
    return DiffusionSFT


METHODS = {"diffusion_sft": _diffusion_sft}


def method_class(name: str):
    if name not in METHODS:
        from .core.config import ConfigError
        raise ConfigError(f"method: unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]()
