"""The methods `mmalign train` knows: the name a recipe's `method:` key uses -> "module:Class".

The classes are imported only when a method is asked for, so `mmalign --help` and `mmalign list` stay light.
Names are `<family>_<method>`; the older short names are aliases of the same class.
"""
from __future__ import annotations

from importlib import import_module
from pathlib import Path

from .config import ConfigError, Experiment, load_experiment

METHODS: dict[str, str] = {
    "diffusion_sft": "mmalign.diffusion.sft:DiffusionSFT",
    "diffusion_dpo": "mmalign.diffusion.objectives:DiffusionDPO",
    "diffusion_sft_winners": "mmalign.diffusion.objectives:DiffusionSFTWinners",
    "diffusion_inpo": "mmalign.diffusion.objectives:InPO",
    "diffusion_inversion_dpo": "mmalign.diffusion.objectives:InversionDPO",
    "diffusion_cca": "mmalign.diffusion.objectives:DiffusionCCA",
    "diffusion_bco": "mmalign.diffusion.objectives:DiffusionBCO",
    "diffusion_grpo": "mmalign.diffusion.grpo:DiffusionGRPO",
    "mllm_sft": "mmalign.mllm.sft:MLLMSFT",
    "mllm_steerlm": "mmalign.mllm.sft:MLLMSteerLM",
    "mllm_dpo": "mmalign.mllm.dpo:MLLMDPO",
    "mllm_mdpo": "mmalign.mllm.dpo:MLLMmDPO",
    "video_temporal": "mmalign.video.methods:VideoTemporalTraining",
    "video_dpo": "mmalign.video.methods:VideoDiffusionDPO",
}
ALIASES: dict[str, str] = {"inpo": "diffusion_inpo", "inversion_dpo": "diffusion_inversion_dpo"}

# The preference-pair methods for diffusion models (one pairs dataset, one config class, `objective:` knobs).
PAIR_METHOD_NAMES = ("diffusion_dpo", "diffusion_sft_winners", "diffusion_inpo", "diffusion_inversion_dpo",
                     "diffusion_cca", "diffusion_bco")
RECIPES = Path(__file__).resolve().parents[2] / "configs"  # the repository's recipes (absent in a bare wheel)


def canonical_name(name: str) -> str:
    """The registered name for `name` (an alias resolves to its method); ConfigError for an unknown name."""
    name = ALIASES.get(name, name)
    if name not in METHODS:
        known = ", ".join(sorted(METHODS))
        raise ConfigError(f"method: unknown method {name!r} (known: {known}; aliases: "
                          f"{', '.join(f'{a} -> {c}' for a, c in sorted(ALIASES.items()))})")
    return name


def method_class(name: str) -> type:
    """The method class registered under `name` or one of its aliases (imported now)."""
    module, cls = METHODS[canonical_name(name)].split(":")
    return getattr(import_module(module), cls)


def load_recipe(path: str, overrides=()) -> Experiment:
    """A recipe plus `key=value` overrides, read once and validated against its method's config class; an alias
    in `method:` is replaced by the registered name (what config.yaml records)."""
    exp = load_experiment(str(path), list(overrides), lambda name: method_class(name).config_class)
    exp.method = canonical_name(exp.method)
    return exp


def recipes() -> list[tuple[str, str]]:
    """(recipe path, method name) for every YAML recipe in the repository's configs/ folder."""
    from .config import read_method_name

    if not RECIPES.is_dir():
        return []
    return [(str(p.relative_to(RECIPES.parent)), read_method_name(str(p))) for p in sorted(RECIPES.glob("*.yaml"))]
