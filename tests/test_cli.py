"""The `mmalign` command: every verb has --help; data, train (errors) and demo run end to end."""
import json
import subprocess
import sys

import pytest

from mmalign.cli import main
from mmalign.evals.demo_results import unpack_diffusion_demo


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mmalign.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("verb", [[], ["train"], ["data"], ["data", "shapeworld"], ["data", "pairs"], ["sample"], ["demo"]])
def test_every_verb_has_help(verb):
    r = run_cli(*verb, "--help")
    assert r.returncode == 0 and "usage: mmalign" in r.stdout


def test_data_shapeworld_writes_the_user_format(tmp_path):
    main(["data", "shapeworld", "--out", str(tmp_path / "d"), "--n", "12", "--vqa-per-scene", "2", "--videos", "2"])
    meta = [json.loads(l) for l in open(tmp_path / "d/metadata.jsonl")]
    assert len(meta) == 12 and all((tmp_path / "d" / m["file_name"]).is_file() for m in meta)
    assert len(open(tmp_path / "d/vqa.jsonl").readlines()) == 24
    assert len(list((tmp_path / "d/videos").glob("*.gif"))) == 2
    with pytest.raises(FileExistsError):  # never overwrites a dataset
        main(["data", "shapeworld", "--out", str(tmp_path / "d"), "--n", "1"])


def test_train_config_errors_name_key_and_file(tmp_path):
    cfg = tmp_path / "x.yaml"
    cfg.write_text("method: diffusion_sft\noutput_dir: out\nmodel: {pretrained: p}\ndata: {path: d}\n")
    r = run_cli("train", str(cfg), "train.lrr=1")
    assert r.returncode != 0 and "train.lrr" in r.stderr and "x.yaml" in r.stderr
    r = run_cli("train", str(cfg), "data.caption_dropout=abc")
    assert r.returncode != 0 and "data.caption_dropout" in r.stderr
    r = run_cli("train", str(tmp_path / "missing.yaml"))
    assert r.returncode != 0 and "missing.yaml" in r.stderr
    cfg.write_text("method: no_such_method\noutput_dir: out\n")
    r = run_cli("train", str(cfg))
    assert r.returncode != 0 and "no_such_method" in r.stderr and "diffusion_sft" in r.stderr


def test_sample_and_demo_on_a_tiny_pipeline(tmp_path, tiny_sd_dir):
    main(["sample", "--model", str(tiny_sd_dir), "--prompt", "a red circle", "--per-prompt", "2",
          "--steps", "2", "--out", str(tmp_path / "s")])
    rows = [json.loads(l) for l in open(tmp_path / "s/samples.jsonl")]
    assert [r["seed"] for r in rows] == [0, 1] and (tmp_path / "s/grid.png").is_file()
    main(["demo", "--model", str(tiny_sd_dir), "--n", "6", "--steps", "2", "--methods", "none",
          "--parts", "diffusion", "--out", str(tmp_path / "demo")])
    res = unpack_diffusion_demo(json.loads((tmp_path / "demo/results.json").read_text()))
    assert res["n_prompts"] == 6 and set(res["base"]["accuracy"]) >= {"correct", "colour", "shape", "count"}
    assert (tmp_path / "demo/grid.png").is_file() and len(list((tmp_path / "demo/base/samples").glob("*.png"))) == 6
    assert res["aligned"] == {}


def test_demo_aligns_and_compares_at_small_scale(tmp_path, capsys):
    """The whole chain on the shipped base at toy scale: pairs -> two methods -> paired comparison, same seeds."""
    main(["demo", "--parts", "diffusion", "--n", "6", "--steps", "2", "--methods", "diffusion_dpo,diffusion_cca",
          "--pair-prompts", "8", "--per-prompt", "3", "--train-steps", "2", "--out", str(tmp_path / "demo")])
    res = unpack_diffusion_demo(json.loads((tmp_path / "demo/results.json").read_text()))
    assert set(res["aligned"]) == {"diffusion_dpo", "diffusion_cca"}
    for r in res["aligned"].values():
        wr = r["win_rate"]
        assert wr["wins"] + wr["ties"] + wr["losses"] == 6 and wr["ci95"][0] <= wr["win_rate"] <= wr["ci95"][1]
        assert r["gain"]["correct"]["n"] == 6
    assert len(list((tmp_path / "demo/diffusion_dpo/eval/samples").glob("*.png"))) == 6
    printed = capsys.readouterr().out
    assert "| diffusion_cca |" in printed and "win rate vs base" in printed
    pairs = [json.loads(l) for l in open(tmp_path / "demo/pairs/metadata.jsonl")]
    assert all(p["score_0"] > p["score_1"] and p["label_0"] == 1 for p in pairs)
    # the evaluator pass: CLIPScore comparisons (shipped ShapeWorld CLIP) per method, and the HTML report
    for name in ("diffusion_dpo", "diffusion_cca"):
        doc = json.loads((tmp_path / f"demo/evals/clipscore_{name}_vs_base.json").read_text())
        extra = doc["mmalign"]["extra"]["compare_clipscore"]
        assert doc["n-samples"]["compare_clipscore"]["effective"] == 6
        assert extra["wins"] + extra["ties"] + extra["losses"] == extra["n_prompts"]
    html = (tmp_path / "demo/report.html").read_text()
    assert "compare_clipscore" in html and "diffusion_cca" in html and html.count("<img") >= 12


def test_demo_runs_the_mllm_part_with_the_options_given(tmp_path, tiny_llava_dir, monkeypatch, capsys):
    """`--parts mllm` alone: the MLLM options reach the run (toy question counts; the full run is in the slow tier)."""
    import functools

    import mmalign.demo.mllm as mllm_demo

    toy = functools.partial(mllm_demo.MLLMDemoSettings, eval_scenes=4, eval_per_scene=3, pair_scenes=6,
                            pair_per_scene=3, n_samples=3, batch_size=2)
    monkeypatch.setattr(mllm_demo, "MLLMDemoSettings", toy)
    main(["demo", "--parts", "mllm", "--mllm-model", str(tiny_llava_dir), "--mllm-train-steps", "2",
          "--split", "validation", "--mllm-recipe", "shapeworld_mllm_mmdpo", "--out", str(tmp_path / "demo")])
    settings = mllm_demo.read_mllm_results(tmp_path / "demo/mllm")["settings"]
    assert (settings["train_steps"], settings["split"], settings["recipe"]) == (2, "validation", "shapeworld_mllm_mmdpo")
    assert not (tmp_path / "demo/results.json").exists()  # no diffusion part
    printed = capsys.readouterr().out
    assert "overall" in printed and "mllm/evals/mmvet_aligned.json" in printed
    assert (tmp_path / "demo/report.html").is_file()


def test_data_pairs_verb(tmp_path, tiny_sd_dir):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    main(["data", "pairs", "--model", str(tiny_sd_dir), "--prompts-file", str(prompts), "--per-prompt", "3",
          "--steps", "2", "--out", str(tmp_path / "pairs")])
    info = json.loads((tmp_path / "pairs/pairs_report.json").read_text())
    assert info["prompts"] == 2 and info["pairs"] + sum(info["report"]["skipped"].values()) == 2
    from mmalign.datasets.pairs import read_pairs
    assert len(read_pairs(tmp_path / "pairs")[0]) == info["pairs"]


def test_train_verb_runs_a_recipe_with_overrides(tmp_path, tiny_sd_dir, shapeworld_folder):
    import yaml

    cfg = tmp_path / "r.yaml"
    cfg.write_text(yaml.safe_dump({"method": "diffusion_sft", "output_dir": str(tmp_path / "run"),
                                   "train": {"max_steps": 5, "batch_size": 8},
                                   "model": {"pretrained": str(tiny_sd_dir)}, "data": {"path": str(shapeworld_folder)}}))
    main(["train", str(cfg), "train.max_steps=2", "train.lr=1e-5", "data.caption_dropout=0.5"])
    resolved = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 2 and resolved["train"]["lr"] == 1e-5
    assert resolved["data"]["caption_dropout"] == 0.5 and resolved["data"]["bad_rows"] == "skip"
    assert (tmp_path / "run/final/model_index.json").is_file()
    assert [json.loads(l)["step"] for l in open(tmp_path / "run/metrics.jsonl")] == [2]


def test_demo_names_a_missing_model(tmp_path):
    with pytest.raises(SystemExit, match="^error: .*no pipeline at"):
        main(["demo", "--model", str(tmp_path), "--n", "2", "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="no pipeline at"):  # --debug: the exception itself
        main(["--debug", "demo", "--model", str(tmp_path), "--n", "2", "--out", str(tmp_path / "o")])


def test_demo_refuses_an_unknown_method_before_sampling(tmp_path):
    with pytest.raises(SystemExit, match="unknown method 'nope'"):
        main(["demo", "--methods", "diffusion_dpo,nope", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
