"""`mmalign demo`: the ShapeWorld demos (diffusion, vision-language, video) and their evaluator pass.

Every demo training run is a shipped recipe, `configs/<recipe>.yaml`, plus a short list of overrides that only
place the run (model, data, cache and output paths) and size it (steps, batch size); `resume` is always never.
All other settings come from the recipe, so `mmalign train configs/<recipe>.yaml` with the same overrides is the
demo's run."""
from __future__ import annotations

import json


def load_demo_recipe(recipe: str, overrides: dict[str, object], extra: tuple[str, ...] = ()):
    """The Experiment of `configs/<recipe>.yaml` with `overrides` ({dotted key: value}) and train.resume=never.
    Values are written as JSON, which YAML reads back unchanged (a path stays a string). `extra`: "key=value"
    overrides as a user types them after `mmalign train` (calibration sweeps), applied last."""
    from ..core.registry import RECIPES, load_recipe

    path = RECIPES / f"{recipe}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the demo trains from the repository's recipes (configs/), which a bare "
                                f"wheel install lacks")
    items = [f"{k}={json.dumps(v, default=str)}" for k, v in {**overrides, "train.resume": "never"}.items()]
    items += list(extra)
    return load_recipe(path, items)
