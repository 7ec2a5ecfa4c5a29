import dataclasses
import re
import typing
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
    section = edit.split(":")[0] + ":"  # the edit replaces GOOD's line for that section (a repeated key is an error)
    path = write(tmp_path, "".join(ln + "\n" for ln in GOOD.splitlines() if not ln.startswith(section)) + edit + "\n")
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


# --- value ranges (bounded fields), duplicate keys, the trainer's pre-build checks --------------------------------

@pytest.mark.parametrize("override, message", [
    ("train.max_steps=-5", "train.max_steps: must be >= 1, got -5"),
    ("train.lr=-1", "train.lr: must be > 0, got -1.0"),
    ("train.lr=0", "train.lr: must be > 0, got 0.0"),
    ("train.lr=.nan", "train.lr: must be a finite number > 0, got nan"),
    ("train.lr=.inf", "train.lr: must be a finite number > 0, got inf"),
    ("train.num_workers=-1", "train.num_workers: must be >= 0, got -1"),
    ("train.batch_size=0", "train.batch_size: must be >= 1, got 0"),
    ("train.grad_accum=0", "train.grad_accum: must be >= 1, got 0"),
    ("train.save_every=-1", "train.save_every: must be >= 0, got -1"),
    ("train.keep_last=-1", "train.keep_last: must be >= 0, got -1"),
    ("train.warmup_steps=-10", "train.warmup_steps: must be >= 0, got -10"),
    ("train.max_minutes=-1", "train.max_minutes: must be >= 0, got -1.0"),
    ("train.max_grad_norm=-1", "train.max_grad_norm: must be >= 0, got -1.0"),
    ("train.adam_betas=[0.9, 1]", "train.adam_betas[1]: must be in [0, 1), got 1.0"),
    ("train.seed=-1", "train.seed: must be in [0, 4294967295], got -1"),
])
def test_train_ranges_checked_on_load(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, GOOD, [override])
    assert str(err.value) == f"{tmp_path / 'x.yaml'}: {message} (from override '{override}')"


def test_ranges_in_the_file_and_edges(tmp_path):
    with pytest.raises(ConfigError, match=r"x.yaml: train.warmup_steps: must be >= 0, got -10$"):
        load(tmp_path, GOOD.replace("mixed_precision: no}", "mixed_precision: no, warmup_steps: -10}"))
    exp = load(tmp_path, GOOD, ["train.max_grad_norm=null", "train.save_every=0", "train.adam_betas=[0, 0.5]"])
    assert exp.train.max_grad_norm is None and exp.train.adam_betas == (0.0, 0.5)


def test_bounded_helper():
    from mmalign.core.config import Range, bounded

    assert [str(Range(0, 1)), str(Range(0, 0.5, hi_open=True)), str(Range(0, lo_open=True)), str(Range(hi=3)),
            str(Range())] == ["in [0, 1]", "in [0, 0.5)", "> 0", "<= 3", "a finite number"]
    assert Range(0, 1).admits(1) and not Range(0, 1, hi_open=True).admits(1.0) and not Range().admits(float("nan"))
    assert not Range(0).admits(True) and not Range(0).admits("1")

    @dataclass
    class Knobs:
        ratio: float = bounded(0.5, 0, 1)
        anchor: float = bounded(0.0)
        free: float = 2.0  # no range: not checked

    assert from_dict(Knobs, {"ratio": 1, "anchor": -3, "free": float("nan")}, "k.yaml").ratio == 1.0
    with pytest.raises(ConfigError, match=r"^k.yaml: o.ratio: must be in \[0, 1\], got 1.5$"):
        from_dict(Knobs, {"ratio": 1.5}, "k.yaml", prefix="o")
    with pytest.raises(ConfigError, match=r"^k.yaml: anchor: must be a finite number, got -inf$"):
        from_dict(Knobs, {"anchor": float("-inf")}, "k.yaml")


def test_check_ranges_on_configs_built_in_python():
    from mmalign.core.config import check_ranges

    check_ranges(TrainConfig(), "train")
    with pytest.raises(ConfigError, match=r"^train.lr: must be a finite number > 0, got nan$"):
        check_ranges(TrainConfig(lr=float("nan")), "train")
    with pytest.raises(ConfigError, match=r"^train.keep_last: must be >= 0, got -1$"):
        check_ranges(TrainConfig(keep_last=-1), "train")


def _config_classes():
    """Every dataclass the loader builds: TrainConfig and each registered method's config sections."""
    from mmalign.core.registry import METHODS, method_class

    todo, seen = [TrainConfig] + [method_class(name).config_class for name in METHODS], []
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo += [t for t in typing.get_type_hints(cls).values() if dataclasses.is_dataclass(t)]
    return seen


def _numeric(tp) -> bool:
    args = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
    return tp in (int, float) or bool(args) and all(_numeric(a) for a in args)


def test_every_numeric_setting_has_a_range_that_admits_its_default():
    missing, bad_defaults = [], []
    for cls in _config_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            rng = f.metadata.get("range")
            if _numeric(hints[f.name]) and rng is None:
                missing.append(f"{cls.__name__}.{f.name}")
            default = f.default if isinstance(f.default, (tuple, int, float)) else None
            if rng is not None and default is not None:
                if not all(rng.admits(v) for v in (default if isinstance(default, tuple) else [default])):
                    bad_defaults.append(f"{cls.__name__}.{f.name}")
    assert not missing, f"numeric settings without a range (use config.bounded): {missing}"
    assert not bad_defaults, f"defaults outside their own range: {bad_defaults}"


@pytest.mark.parametrize("recipe, override, message", [
    ("shapeworld_diffusion_dpo", "objective.beta=-1", "objective.beta: must be > 0, got -1.0"),
    ("shapeworld_diffusion_dpo", "data.caption_dropout=1.5", "data.caption_dropout: must be in [0, 1], got 1.5"),
    ("shapeworld_diffusion_bco", "objective.bco_delta_decay=1", "objective.bco_delta_decay: must be in [0, 1)"),
    ("shapeworld_diffusion_cca", "objective.cca_uncond_ratio=-0.1", "objective.cca_uncond_ratio: must be in [0, 1]"),
    ("shapeworld_diffusion_inpo", "objective.inversion_grid_steps=0", "objective.inversion_grid_steps: must be >= 1"),
    ("shapeworld_sft", "model.lora_rank=-4", "model.lora_rank: must be >= 0, got -4"),
    ("shapeworld_video_dpo", "objective.beta=0", "objective.beta: must be > 0, got 0.0"),
    ("shapeworld_video_temporal", "data.num_frames=0", "data.num_frames: must be >= 1, got 0"),
    ("shapeworld_mllm_dpo", "objective.beta=-0.1", "objective.beta: must be > 0, got -0.1"),
    ("shapeworld_mllm_dpo", "objective.label_smoothing=0.5", "objective.label_smoothing: must be in [0, 0.5)"),
    ("shapeworld_mllm_dpo", "model.lora_dropout=1", "model.lora_dropout: must be in [0, 1), got 1.0"),
])
def test_method_ranges_checked_on_load(recipe, override, message):
    from mmalign.core.registry import RECIPES, load_recipe

    path = str(RECIPES / f"{recipe}.yaml")
    with pytest.raises(ConfigError) as err:
        load_recipe(path, [override])
    assert str(err.value).startswith(f"{path}: {message}") and f"(from override '{override}')" in str(err.value)


def test_mdpo_crop_order_still_checked():
    from mmalign.mllm.dpo import DPOObjective, MLLMmDPO, VLDPOConfig, VLPairDataConfig
    from mmalign.mllm.models import VLModelConfig

    cfg = VLDPOConfig(VLModelConfig("m"), VLPairDataConfig("d"), DPOObjective(crop_min=0.5, crop_max=0.2))
    with pytest.raises(ConfigError, match=r"objective.crop_min: must be <= objective.crop_max, got 0.5 > 0.2"):
        MLLMmDPO(cfg, "out")


@pytest.mark.parametrize("text, line, first", [
    ("method: demo\noutput_dir: o\ntrain:\n  max_steps: 2\n  max_steps: 5000\nmodel: {path: m}\n", 5, 4),
    ("method: demo\noutput_dir: o\nmodel: {path: m}\nmethod: other\n", 4, 1),
    ("method: demo\noutput_dir: o\nmodel: {path: m, path: n}\n", 3, 3),
])
def test_duplicate_keys_are_an_error_naming_file_and_line(tmp_path, text, line, first):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_experiment(path, (), DemoConfig)
    msg = str(err.value)
    assert msg.startswith(f"{path}: line {line}: duplicate key ") and f"first set on line {first}" in msg


def test_merge_keys_may_override_and_overrides_refuse_duplicates(tmp_path):
    data = load_yaml(write(tmp_path, "base: &b {a: 1, b: 2}\nother:\n  <<: *b\n  a: 3\n"))
    assert data["other"] == {"a": 3, "b": 2}
    with pytest.raises(ConfigError, match=r"override 'loss.extra=\{a: 1, a: 2\}': invalid YAML value: .*key 'a'"):
        apply_overrides({}, ["loss.extra={a: 1, a: 2}"])
    with pytest.raises(ConfigError, match=r"override 'train.lr=\[1': invalid YAML value"):
        apply_overrides({}, ["train.lr=[1"])


class _NeverBuilt:
    """A method whose build must not run: the trainer's checks come first."""
    def build(self, device):
        raise AssertionError("build ran before the config checks")


@pytest.mark.parametrize("train, message", [
    (dict(max_steps=-5), "train.max_steps: must be >= 1, got -5"),
    (dict(lr=float("nan")), "train.lr: must be a finite number > 0, got nan"),
    (dict(batch_size=0), "train.batch_size: must be >= 1, got 0"),
    (dict(resume="runs/nowhere/checkpoints/step-00000100"), "train.resume: runs/nowhere/checkpoints/step-00000100 "
                                                            "is not a checkpoint directory"),
])
def test_trainer_refuses_before_building(tmp_path, train, message):
    from mmalign.core.config import Experiment
    from mmalign.core.trainer import train as run_training

    exp = Experiment("toy", str(tmp_path / "run"), TrainConfig(**train), None)
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        run_training(exp, _NeverBuilt())
    assert not (tmp_path / "run").exists()


def test_trainer_refuses_fp16_without_cuda(tmp_path, monkeypatch):
    import torch

    from mmalign.core.config import Experiment
    from mmalign.core.trainer import train as run_training

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    exp = Experiment("toy", str(tmp_path / "run"), TrainConfig(mixed_precision="fp16"), None)
    with pytest.raises(ConfigError, match="train.mixed_precision: fp16 needs a CUDA GPU"):
        run_training(exp, _NeverBuilt())
