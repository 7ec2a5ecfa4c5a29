"""The demo's shipped first-round pairs (mmalign/assets/shapeworld_pairs): they are what the demo would sample from
the shipped base, the demo uses them only for exactly that base and those settings, and --fresh-pairs opts out."""
import functools
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from mmalign.assets import SHAPEWORLD_PAIRS, SHAPEWORLD_SD
from mmalign.demo.diffusion import PAIR_SEED, DemoSettings, load_sd_pipeline, onpolicy_pairs, run_demo
from mmalign.demo.shipped_pairs import PIPELINE_PARTS, pair_source, shipped_pairs, weights_digest


def _rows(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_the_shipped_set_matches_the_shipped_base_and_the_demo_defaults():
    found = shipped_pairs(SHAPEWORLD_SD, DemoSettings(), PAIR_SEED)
    assert found is not None, "the shipped pairs' source no longer matches: rebuild scripts/build_shapeworld_pairs.sh"
    folder, report = found
    rows = _rows(folder)
    assert folder == SHAPEWORLD_PAIRS and report["pairs"] == len(rows) > 500
    assert report["prompts"] == DemoSettings().pair_prompts and (folder / "README.md").is_file()
    assert all(r["score_0"] > r["score_1"] and r["label_0"] == 1 for r in rows)
    assert all((folder / r[k]).is_file() for r in rows for k in ("jpg_0", "jpg_1"))


def test_sampling_the_first_captions_again_gives_the_shipped_pairs(tmp_path):
    """Pair prompt i's samples use seeds PAIR_SEED + 4i + j, so the first 3 captions alone give the first rows."""
    fresh = tmp_path / "pairs"
    onpolicy_pairs(load_sd_pipeline(SHAPEWORLD_SD), fresh, replace(DemoSettings(), pair_prompts=3))
    got, shipped = _rows(fresh), _rows(SHAPEWORLD_PAIRS)
    assert len(got) >= 3 and got == shipped[:len(got)]
    for row in got:
        for key in ("jpg_0", "jpg_1"):
            a = np.asarray(Image.open(fresh / row[key]), dtype=np.int16)
            b = np.asarray(Image.open(SHAPEWORLD_PAIRS / row[key]), dtype=np.int16)
            assert np.abs(a - b).max() <= 2, row[key]


def test_other_models_settings_or_fresh_pairs_do_not_use_the_shipped_set(tmp_path):
    s = DemoSettings()
    assert shipped_pairs(SHAPEWORLD_SD, replace(s, fresh_pairs=True), PAIR_SEED) is None
    assert shipped_pairs(SHAPEWORLD_SD, replace(s, pair_prompts=128), PAIR_SEED) is None
    assert shipped_pairs(SHAPEWORLD_SD, replace(s, guidance=3.0), PAIR_SEED) is None
    assert shipped_pairs(SHAPEWORLD_SD, s, PAIR_SEED + 100_000) is None  # round 2's prompts
    assert shipped_pairs("owner/name", s, PAIR_SEED) is None and weights_digest("owner/name") is None
    copy = tmp_path / "base"
    shutil.copytree(SHAPEWORLD_SD, copy)
    (copy / "notes.txt").write_text("a log next to the weights is not part of the digest")
    assert shipped_pairs(copy, s, PAIR_SEED) is not None  # the same bytes: stat and location do not matter
    weights = next(p for p in sorted((copy / "unet").iterdir()) if p.suffix == ".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert shipped_pairs(copy, s, PAIR_SEED) is None
    assert set(PIPELINE_PARTS) <= {p.name for p in SHAPEWORLD_SD.iterdir()}


@pytest.mark.parametrize("fresh", [False, True])
def test_the_demo_trains_on_a_matching_shipped_set_unless_told_otherwise(tmp_path, monkeypatch, fresh):
    """A miniature shipped set (3 captions, 2 sampler steps) stands in for the real one."""
    s = DemoSettings(n=4, steps=2, pair_prompts=3, per_prompt=4, pair_steps=2, batch_size=4, fresh_pairs=fresh,
                     overrides=("train.max_steps=1",))
    mini = tmp_path / "shipped"
    info = onpolicy_pairs(load_sd_pipeline(SHAPEWORLD_SD), mini, s)
    (mini / "pairs_report.json").write_text(json.dumps({**info, "source": pair_source(SHAPEWORLD_SD, s, PAIR_SEED)}))
    monkeypatch.setattr("mmalign.demo.diffusion.shipped_pairs", functools.partial(shipped_pairs, where=mini))
    res = run_demo(tmp_path / "demo", settings=s)
    assert ("shipped" in res["pairs"]) is not fresh and (tmp_path / "demo" / "pairs").exists() is fresh
    assert res["pairs"]["pairs"] == info["pairs"] and res["aligned"]["diffusion_dpo"]["pair_steps"] == 4
    if not fresh:
        assert res["pairs"]["shipped"] == str(mini)
