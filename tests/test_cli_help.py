"""Help that teaches (defaults on every verb, `train --show-config`) and recipe traps refused early: a
data.resolution far from the model's native size, a dataset smaller than one global batch."""
import argparse
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from mmalign.cli import HelpFormatter, build_parser, main
from mmalign.core.config import ConfigError, TrainConfig, bounded
from mmalign.core.config_docs import config_keys, field_docs
from mmalign.core.registry import METHODS, method_class, recipes
from mmalign.datasets.row_count import count_rows

ROOT = Path(__file__).resolve().parent.parent


def verbs(parser: argparse.ArgumentParser, path=()):
    """(argv prefix, parser) of every verb, nested ones included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from verbs(sub, (*path, name))
                if not any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield (*path, name), sub


def help_text(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


ALL_VERBS = list(verbs(build_parser()))


def test_the_verbs_are_found():
    names = {" ".join(v) for v, _ in ALL_VERBS}
    assert {"train", "list", "data shapeworld", "data pairs", "data best-of-n", "demo", "eval images"} <= names


@pytest.mark.parametrize("argv,parser", ALL_VERBS, ids=[" ".join(v) for v, _ in ALL_VERBS])
def test_every_verb_shows_its_defaults(argv, parser, capsys):
    fmt = HelpFormatter("x")
    with_default = [a for a in parser._actions if fmt._shows_default(a)]
    out = help_text(argv, capsys)
    if with_default:
        assert "(default:" in out
    assert "(default: None)" not in out and "(default: False)" not in out
    shown = {a.dest: (fmt._get_help_string(a) % defaultdict(str, default=a.default)).lower() for a in parser._actions}
    for action in parser._actions:  # never twice: a help text that states its default keeps it
        assert shown[action.dest].count("(default") <= 1, action.option_strings
    for action in with_default:  # every option with a default shows it
        assert "(default" in shown[action.dest], action.option_strings


@pytest.mark.parametrize("argv", [("train",), ("list",), ("data", "shapeworld"), ("data", "pairs"),
                                  ("data", "best-of-n"), ("demo",)])
def test_cli_verbs_have_help_on_every_option(argv):
    parser = dict(ALL_VERBS)[argv]
    bare = [a.option_strings or a.dest for a in parser._actions if not a.help]
    assert not bare


def test_demo_help_shows_values(capsys):
    out = help_text(["demo"], capsys)
    assert "(default: runs/demo)" in out and "(default: 512)" in out


def test_train_help_points_to_list_and_show_config(capsys):
    out = help_text(["train"], capsys)
    assert "mmalign list" in out and "--show-config" in out and "key=value" in out


def show_config(argv, capsys) -> str:
    main(["train", "--show-config", *argv])
    return capsys.readouterr().out


def test_show_config_prints_value_default_range_and_doc(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = show_config(["configs/shapeworld_diffusion_dpo.yaml", "objective.beta=2000"], capsys)
    beta = next(ln for ln in out.splitlines() if ln.startswith("objective.beta = "))
    assert beta.startswith("objective.beta = 2000.0  (default: 5000.0; must be > 0)")
    assert "DPO-family temperature" in beta
    lines = {ln.split(" = ")[0]: ln for ln in out.splitlines()}
    assert "one of: frozen_copy, adapters_off" in lines["model.reference"]
    assert "(default: 8; must be >= 1)  # per device, per micro-batch" in lines["train.batch_size"]
    assert lines["train.batch_size"].startswith("train.batch_size = 32 ")  # the recipe's value
    assert "(required)" in lines["data.path"]


def test_show_config_refuses_a_bad_override(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--show-config", str(ROOT / "configs/shapeworld_diffusion_dpo.yaml"), "objective.beta=-1"])
    assert str(e.value.code).startswith("error: ") and "objective.beta" in str(e.value.code)


RECIPE_OF = {}
for _path, _name in recipes():
    RECIPE_OF.setdefault(_name, _path)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_show_config_for_every_method(name, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert name in RECIPE_OF, f"no shipped recipe uses {name}"
    out = show_config([RECIPE_OF[name]], capsys)
    cls = method_class(name).config_class
    keys = [k.key for k in config_keys(cls)]
    printed = [ln.split(" = ")[0] for ln in out.splitlines()]
    assert printed == ["method", "output_dir"] + [f"train.{k.key}" for k in config_keys(TrainConfig)] + keys
    assert all("default" in ln or "(required)" in ln for ln in out.splitlines()[2:])
    assert any("  # " in ln for ln in out.splitlines()[2:])


@dataclass
class _Documented:
    # temperature,
    # two lines above
    beta: float = bounded(1.0, 0, lo_open=True)  # and a trailing one
    steps: int = 3  # just trailing
    plain: str = "x"
    wrapped: tuple[int, int] = (
        1, 2)  # on the last line of the field


def test_field_docs_reads_comments_above_and_after():
    docs = field_docs(_Documented)
    assert docs == {"beta": "temperature, two lines above and a trailing one", "steps": "just trailing",
                    "wrapped": "on the last line of the field"}
    beta = config_keys(_Documented)[0]
    assert (beta.key, beta.value, beta.valid) == ("beta", 1.0, "must be > 0")


# --- data.resolution against the model's native size ----------------------------------------------------------

def fake_parts(native=64, vae_levels=4):
    """What data_resolution reads of SDComponents: the native size and the pixels per latent position."""
    return SimpleNamespace(resolution=native, pixel_factor=2 ** (vae_levels - 1),
                           vae=SimpleNamespace(config=SimpleNamespace(block_out_channels=[8] * vae_levels)))


def pair_method(resolution):
    from mmalign.diffusion.objectives import DiffusionDPO
    from mmalign.diffusion.preference import PairDataConfig, PrefModelConfig, PreferenceConfig

    m = DiffusionDPO(PreferenceConfig(PrefModelConfig("m"), PairDataConfig("p", resolution=resolution)), "out")
    m.parts, m.device = fake_parts(), "cpu"
    return m


class Encoded(Exception):
    pass


@pytest.mark.parametrize("resolution,problem", [(1024, "more than 4x"), (100, "not a multiple of the VAE's factor 8")])
def test_absurd_resolution_refused_before_encoding(resolution, problem, monkeypatch):
    import mmalign.diffusion.preference as pref

    monkeypatch.setattr(pref, "build_pair_tensors", lambda *a, **k: pytest.fail("encoded"))
    with pytest.raises(ConfigError, match=rf"^data\.resolution: {resolution} .*{problem}"):
        pair_method(resolution).dataset()


def test_off_native_resolution_warns_before_encoding(monkeypatch, capsys):
    import mmalign.diffusion.preference as pref

    def encode(parts, path, res, *rest, **options):
        assert "warning: data.resolution: training at 128 px, the model's native size is 64 px" in \
            capsys.readouterr().out
        raise Encoded(res)

    monkeypatch.setattr(pref, "build_pair_tensors", encode)
    with pytest.raises(Encoded) as e:
        pair_method(128).dataset()
    assert e.value.args == (128,)


@pytest.mark.parametrize("resolution", [0, 64])
def test_native_resolution_is_silent(resolution, capsys):
    assert pair_method(resolution).data_resolution() == 64
    assert capsys.readouterr().out == ""


def test_sft_and_video_check_the_resolution_first(monkeypatch):
    import mmalign.diffusion.sft as sft
    import mmalign.video.data as video_data
    import mmalign.video.methods as video

    monkeypatch.setattr(sft, "build_caption_latents", lambda *a: pytest.fail("read before the check"))
    m = sft.DiffusionSFT(sft.SFTConfig(sft.ModelConfig("m"), sft.DataConfig("d", resolution=4096)), "out")
    m.parts = fake_parts()
    with pytest.raises(ConfigError, match="data.resolution"):
        m.dataset()
    monkeypatch.setattr(video_data, "ShapeWorldClips", lambda *a: pytest.fail("made clips before the check"))
    cfg = video.VideoConfig(video.VideoModelConfig("m"), video.VideoDataConfig(shapeworld_clips=4, resolution=36))
    v = video.VideoTemporalTraining(cfg, "out")
    v.parts = fake_parts()
    with pytest.raises(ConfigError, match="data.resolution: 36 is not a multiple"):
        v.dataset()


# --- rows against the global batch, before anything loads -----------------------------------------------------

def test_count_rows(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"x": 1}\n\n{"x": 2}\n  \n{"x": 3}')
    assert count_rows(tmp_path / "a.jsonl") == 3
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text("{}\n" * 5)
    assert count_rows(folder) == 5
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    shards = tmp_path / "shards"
    shards.mkdir()
    for i, n in enumerate((4, 6)):
        pq.write_table(pa.table({"caption": ["c"] * n}), shards / f"{i}.parquet")
    assert count_rows(shards) == 10 and count_rows(shards / "1.parquet") == 6
    (tmp_path / "broken.parquet").write_text("not parquet")
    for unknown in ("owner/dataset", tmp_path / "missing.jsonl", tmp_path / "broken.parquet", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        assert count_rows(unknown) is None


def small_pairs(tmp_path, n):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"caption": "c", "jpg_0": "a.png", "jpg_1": "b.png", "label_0": 1}) + "\n"
                            for _ in range(n)))
    return path


def train_argv(tmp_path, data, *extra):
    return ["train", "configs/shapeworld_diffusion_dpo.yaml", f"data.path={data}", f"output_dir={tmp_path}/run",
            *extra]


def test_dataset_below_the_global_batch_refused_before_any_model_loads(tmp_path, monkeypatch):
    from mmalign.diffusion.objectives import DiffusionDPO

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(DiffusionDPO, "build", lambda *a: pytest.fail("the model was built"))
    data = small_pairs(tmp_path, 5)
    with pytest.raises(SystemExit) as e:
        main(train_argv(tmp_path, data, "train.batch_size=3", "train.grad_accum=2"))
    msg = str(e.value.code)
    assert msg.startswith("error: train.batch_size: ") and str(data) in msg
    assert "at most 5 rows" in msg and "= 6" in msg and "\n" not in msg
    assert not (tmp_path / "run").exists()


def test_enough_rows_pass_the_precheck(tmp_path, monkeypatch):
    from mmalign.diffusion.objectives import DiffusionDPO

    def build(*a):
        raise Encoded("build reached")

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(DiffusionDPO, "build", build)
    with pytest.raises(Encoded):
        main(train_argv(tmp_path, small_pairs(tmp_path, 6), "train.batch_size=3", "train.grad_accum=2"))
