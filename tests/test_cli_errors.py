"""Issue 15, defect 7: every user error of `mmalign train` is one `error:` line naming the key, file or row,
found before any model loads where the config alone shows it; `--debug` gives the traceback instead."""
import json

import pytest
from PIL import Image

import mmalign.core.trainer as trainer
from mmalign.cli import main
from mmalign.core.config import ConfigError
from mmalign.core.paths import check_location, looks_like_hub_id
from mmalign.datasets.pairs import read_pairs, write_pairs_jsonl
from mmalign.datasets.records import DataError


@pytest.fixture
def recipe(tmp_path, tiny_sd_dir):
    rows = [("a red circle", Image.new("RGB", (32, 32), (200, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 200)), {})
            for _ in range(6)]
    write_pairs_jsonl(tmp_path / "pairs", rows)
    cfg = tmp_path / "r.yaml"
    cfg.write_text(f"method: diffusion_dpo\noutput_dir: {tmp_path / 'out'}\n"
                   f"train: {{max_steps: 1, batch_size: 2, save_every: 0}}\n"
                   f"model: {{pretrained: {tiny_sd_dir}}}\n"
                   f"data: {{path: {tmp_path / 'pairs'}, cache_dir: ''}}\n")
    return cfg


def error_line(*argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([*map(str, argv)])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg and "Traceback" not in msg, msg
    return msg


@pytest.fixture
def no_training(monkeypatch):
    """Any error these cases expect is found before the loop (and its model loading) starts."""
    def refuse(*a, **k):
        raise AssertionError("train() was reached")
    monkeypatch.setattr(trainer, "_train", refuse)


@pytest.mark.parametrize("override,expected", [
    ("data.path=/nonexistent/pairs", "data.path: /nonexistent/pairs: no such file or folder"),
    ("model.pretrained=/nonexistent", "model.pretrained: /nonexistent: no such file or folder"),
    ("model.pretrained=./models/sd", "model.pretrained: ./models/sd: no such file or folder"),
    ("data.bad_rows=foo", "data.bad_rows: expected one of ['skip', 'error'], got 'foo'"),
    ("train.lr=.nan", "train.lr: must be a finite number > 0, got nan"),
    ("train.num_workers=-1", "train.num_workers: must be >= 0"),
    ("train.mixed_precision=fp16", "train.mixed_precision: fp16 needs a CUDA GPU"),
    ("train.resume=/nonexistent", "train.resume: /nonexistent is not a checkpoint directory"),
])
def test_config_errors_are_one_line_before_any_model_loads(recipe, no_training, override, expected):
    assert expected in error_line("train", recipe, override)


def test_an_uncached_hub_id_offline_is_named(recipe, no_training, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    msg = error_line("train", recipe, "model.pretrained=someone/some-model")
    assert "model.pretrained: someone/some-model" in msg and "HF_HUB_OFFLINE=1" in msg
    assert looks_like_hub_id("owner/name") and not looks_like_hub_id("runs/pairs/x")
    assert not looks_like_hub_id("./a") and not looks_like_hub_id("/a/b")


def test_a_file_where_a_folder_is_needed(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="model.pretrained: .* is a file; it must be a folder"):
        check_location("model.pretrained", str(tmp_path / "f"), "folder")


def test_data_errors_found_while_reading_are_one_line(recipe, tmp_path):
    with open(tmp_path / "pairs/metadata.jsonl", "a") as f:
        f.write(json.dumps({"caption": "x", "jpg_0": "images/nope.png", "jpg_1": "images/nope.png",
                            "label_0": 1}) + "\n")
    msg = error_line("train", recipe, "data.bad_rows=error")
    assert "metadata.jsonl:7: image file not found" in msg
    assert "fewer than one global batch" in error_line("train", recipe, "train.batch_size=64")
    (tmp_path / "empty.parquet").write_bytes(b"")
    msg = error_line("train", recipe, f"data.path={tmp_path / 'empty.parquet'}")
    assert "empty.parquet: not a readable parquet file" in msg


def test_a_zero_byte_parquet_is_a_data_error_naming_it(tmp_path):
    (tmp_path / "e.parquet").write_bytes(b"")
    with pytest.raises(DataError, match=r"e\.parquet: not a readable parquet file"):
        read_pairs(tmp_path / "e.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable parquet file"):
        read_pairs(tmp_path / "junk.parquet")


def test_debug_shows_the_exception(recipe, no_training):
    with pytest.raises(ConfigError, match="data.path"):
        main(["--debug", "train", str(recipe), "data.path=/nonexistent/pairs"])
