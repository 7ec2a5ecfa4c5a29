from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from mmalign.core.config import (ConfigError, TrainConfig, apply_overrides, from_dict, load_experiment, load_yaml,
                                 read_method_name, save_resolved)


@dataclass
class Model:
    path: str
    lora_rank: Optional[int] = None


@dataclass
class Loss:
    beta: float = 0.1
    kind: Literal["sigmoid", "hinge"] = "sigmoid"
    weights: list[float] = field(default_factory=lambda: [1.0, 2.0])
    extra: dict[str, int] = field(default_factory=dict)


@dataclass
class DemoConfig:
    model: Model
    loss: Loss = field(default_factory=Loss)


GOOD = """
method: demo
output_dir: runs/demo
train: {lr: 1, max_steps: 5, mixed_precision: no}
model: {path: some/model}
loss: {beta: 0.5, weights: [1, 2.5]}
"""


def write(tmp_path, text, name="x.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load(tmp_path, text, overrides=()):
    return load_experiment(write(tmp_path, text), overrides, DemoConfig)


def test_good_config_types_and_defaults(tmp_path):
    exp = load(tmp_path, GOOD)
    assert exp.method == "demo" and exp.train.max_steps == 5 and exp.train.batch_size == 8
    assert isinstance(exp.train.lr, float) and exp.train.lr == 1.0  # int accepted for a float field
    assert exp.train.mixed_precision == "no"  # not YAML 1.1's False
    assert exp.args.model == Model("some/model") and exp.args.loss.weights == [1.0, 2.5]


@pytest.mark.parametrize("edit, message", [
    ("train: {lrr: 1}", "train.lrr: unknown key (known: lr, max_steps,"),
    ("train: {max_steps: ten}", "train.max_steps: expected int, got str 'ten'"),
    ("train: {max_steps: true}", "train.max_steps: expected int, got bool"),
    ("train: {mixed_precision: fp8}", "train.mixed_precision: expected one of ['no', 'fp16', 'bf16']"),
    ("train: {adam_betas: [0.9]}", "train.adam_betas: expected 2 items"),
    ("loss: {weights: [1, x]}", "loss.weights[1]: expected float"),
    ("loss: {extra: {a: 1.5}}", "loss.extra.a: expected int"),
    ("model: {lora_rank: 2.5}", "model.lora_rank: expected int"),
    ("model: {}", "model.path: missing required key"),
    ("modle: {}", "modle: unknown key (known: model, loss)"),
])
def test_validation_errors_name_file_and_key(tmp_path, edit, message):
    path = write(tmp_path, GOOD + edit + "\n")
    with pytest.raises(ConfigError) as err:
        load_experiment(path, (), DemoConfig)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_missing_section_and_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="x.yaml: model: missing required key"):
        load(tmp_path, "method: demo\noutput_dir: o\n")
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_yaml(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_yaml(write(tmp_path, "train: {lr: [1, 2\n", "bad.yaml"))


def test_overrides(tmp_path):
    exp = load(tmp_path, GOOD, ["train.lr=1e-5", "loss.kind=hinge", "model.lora_rank=4", "train.adam_betas=[0.8, 0.9]"])
    assert exp.train.lr == 1e-5 and isinstance(exp.train.lr, float)
    assert exp.args.loss.kind == "hinge" and exp.args.model.lora_rank == 4 and exp.train.adam_betas == (0.8, 0.9)
    with pytest.raises(ConfigError, match="malformed override 'train.lr'"):
        load(tmp_path, GOOD, ["train.lr"])
    with pytest.raises(ConfigError, match=r"train.lrr: unknown key .*from override 'train.lrr=3'"):
        load(tmp_path, GOOD, ["train.lrr=3"])
    with pytest.raises(ConfigError, match="x.yaml: train.lr: expected float, got str 'fast'.*override"):
        load(tmp_path, GOOD, ["train.lr=fast"])
    raw = {}
    apply_overrides(raw, ["a.b.c=1.5e3", "a.d=no"])
    assert raw == {"a": {"b": {"c": 1500.0}, "d": "no"}}
    assert read_method_name(write(tmp_path, GOOD), ["method=other"]) == "other"


def test_resolved_config_round_trips(tmp_path):
    exp = load(tmp_path, GOOD, ["train.lr=3e-6", "model.lora_rank=8"])
    out = str(tmp_path / "config.yaml")
    save_resolved(exp, out)
    assert load_experiment(out, (), lambda name: DemoConfig) == exp
    assert "lr: 3.0e-06" in open(out).read()


def test_from_dict_direct():
    assert from_dict(TrainConfig, {"seed": 3}, "here").seed == 3
    with pytest.raises(ConfigError, match="here: train.seed: expected int"):
        from_dict(TrainConfig, {"seed": "a"}, "here", prefix="train")
