"""The method registry: every name imports to a class that meets the contract, aliases resolve to the same
class, a recipe is read once with its alias replaced, and `mmalign list` prints methods and recipes."""
import dataclasses
import inspect
import subprocess
import sys

import pytest

from mmalign.core.config import ConfigError
from mmalign.core.method import Method
from mmalign.core.registry import (ALIASES, METHODS, PAIR_METHOD_NAMES, RECIPES, canonical_name, load_recipe,
                                   method_class, recipes)

CONTRACT = [name for name in vars(Method) if not name.startswith("_")]  # what the Protocol declares


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_meets_the_contract(name):
    cls = method_class(name)
    assert f"{cls.__module__}:{cls.__name__}" == METHODS[name]
    assert dataclasses.is_dataclass(cls.config_class)
    assert list(inspect.signature(cls.__init__).parameters)[1:3] == ["cfg", "output_dir"]
    for attr in CONTRACT:
        assert callable(getattr(cls, attr)), f"{name}: no {attr}"
    assert name.split("_")[0] in ("diffusion", "mllm", "video"), "names are <family>_<method>"


def test_aliases_resolve_to_the_same_class():
    assert ALIASES == {"inpo": "diffusion_inpo", "inversion_dpo": "diffusion_inversion_dpo"}
    for alias, name in ALIASES.items():
        assert canonical_name(alias) == name
        assert method_class(alias) is method_class(name)
    assert set(PAIR_METHOD_NAMES) <= set(METHODS)


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown method 'dpo'.*diffusion_dpo.*inpo -> diffusion_inpo"):
        method_class("dpo")


def test_recipe_with_an_alias_loads_once_and_records_the_registered_name(tmp_path):
    src = (RECIPES / "shapeworld_diffusion_inpo.yaml").read_text()
    path = tmp_path / "old_name.yaml"
    path.write_text(src.replace("method: diffusion_inpo", "method: inpo"))
    exp = load_recipe(str(path), ["objective.beta=123", "train.max_steps=7"])
    assert exp.method == "diffusion_inpo"
    assert exp.args.objective.beta == 123 and exp.train.max_steps == 7
    assert type(exp.args) is method_class("inpo").config_class
    with pytest.raises(ConfigError, match="objective.bogus"):
        load_recipe(str(path), ["objective.bogus=1"])


def test_literal_choice_is_checked_by_the_loader(tmp_path):
    with pytest.raises(ConfigError, match=r"model.reference.*expected one of"):
        load_recipe(str(RECIPES / "shapeworld_diffusion_dpo.yaml"), ["model.reference=frozen"])
    with pytest.raises(ConfigError, match=r"objective.loss_type.*expected one of"):
        load_recipe(str(RECIPES / "llava15_mllm_dpo.yaml"), ["objective.loss_type=kto"])


def test_mmalign_list_prints_methods_and_recipes():
    out = subprocess.run([sys.executable, "-m", "mmalign.cli", "list"], capture_output=True, text=True, check=True)
    for name in METHODS:
        assert f"  {name} " in out.stdout
    assert "(alias: inpo)" in out.stdout
    found = recipes()
    assert len(found) >= 20 and all(m in METHODS for _, m in found)
    assert "configs/shapeworld_diffusion_dpo.yaml" in out.stdout
