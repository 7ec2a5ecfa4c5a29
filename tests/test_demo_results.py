"""The demos' results files: the diffusion and MLLM demos write the results-file layout with their kind, and
reading a file back gives the dict the demo built, so the text summaries print the same from the file."""
import pytest

from mmalign.cli import main
from mmalign.demo.diffusion import comparison_table, format_results
from mmalign.demo.mllm import format_mllm_results, read_mllm_demo, read_mllm_results
from mmalign.evals.demo_results import (unpack_diffusion_demo, unpack_mllm_demo, write_diffusion_demo,
                                        write_mllm_demo)
from mmalign.evals.results import read_results, results_kind

from test_report import acc_ci, diffusion_demo_results, mllm_demo_results


def two_methods() -> dict:
    acc = {"colour": acc_ci(0.5, 0.4, 0.6), "correct": acc_ci(0.3, 0.2, 0.4)}
    gain = {"colour": {"gain": 0.05, "ci95": [0.01, 0.09], "n": 3}, "correct": {"gain": -0.02, "ci95": [-0.1, 0.07],
                                                                               "n": 3}}
    wr = {"wins": 5, "ties": 3, "losses": 2, "win_rate": 0.6, "ci95": [0.4, 0.8], "n": 10}
    aligned = {m: {"accuracy": acc, "train_seconds": 3.5, "guidance": g, "eval_seconds": 1.0, "gain": gain,
                   "win_rate": wr, "pair_steps": 96} for m, g in (("diffusion_dpo", 4.0), ("diffusion_cca", 1.0))}
    aligned["diffusion_cca"]["vs_cfg_base"] = {"gain": gain, "win_rate": wr}
    results = diffusion_demo_results({"colour": acc_ci(0.45, 0.35, 0.55), "correct": acc_ci(0.25, 0.1, 0.4)}, aligned)
    results["base"]["accuracy_guidance1"] = {"correct": acc_ci(0.2, 0.1, 0.3)}
    results["pairs"] = {"prompts": 4, "per_prompt": 4, "pairs": 9, "seconds": 2.0, "report": {"kept": 3}}
    return results


def written(write, results: dict, path, kind: str) -> tuple[dict, dict]:
    """(raw document, {task: metrics}) of the file `write` makes, checking its kind."""
    loaded = read_results(write(path, results))
    assert results_kind(loaded["doc"]) == kind
    return loaded["doc"], loaded["tasks"]


def test_diffusion_demo_file_round_trip(tmp_path):
    results = two_methods()
    doc, tasks = written(write_diffusion_demo, results, tmp_path / "results.json", "diffusion_demo")
    assert list(tasks) == ["shapeworld_t2i_base", "shapeworld_t2i_diffusion_dpo", "shapeworld_t2i_diffusion_cca"]
    assert tasks["shapeworld_t2i_diffusion_cca"] == {"colour": 0.5, "correct": 0.3}
    assert doc["mmalign"]["extra"]["shapeworld_t2i_diffusion_dpo"]["win_rate"]["win_rate"] == 0.6
    assert doc["mmalign"]["provenance"]["prompt_seed"] == 20000 and doc["config"]["model"] == "tiny/<sd>"
    back = unpack_diffusion_demo(doc)
    assert back == results
    table = comparison_table(back).splitlines()
    assert table[3] == "| base | 1 | 20.0 % | | | | | |"  # the guidance-free base, CCA's proper baseline
    assert table[5].startswith("| diffusion_cca | 1 | 30.0 % | -2.0 [-10.0, +7.0] | 60.0 % [40.0, 80.0] | -2.0 ")
    assert format_results(back) == format_results(results) and comparison_table(back) == comparison_table(results)
    base_only = diffusion_demo_results({"colour": acc_ci(0.45, 0.35, 0.55)}, {})
    assert unpack_diffusion_demo(written(write_diffusion_demo, base_only, tmp_path / "b.json", "diffusion_demo")[0]) \
        == base_only
    with pytest.raises(ValueError, match="not a mllm_demo results file"):
        unpack_mllm_demo(doc)


def test_rounds_whose_samples_score_lower_are_flagged():
    """The summary gives each on-policy round's mean sample score and warns when it falls below the round
    before (round 1's are the base's pairs): those rounds learn from worse pairs."""
    from mmalign.demo.diffusion import rounds_not_compounding

    results = two_methods()
    results["pairs"]["mean_score"] = 0.935
    results["aligned"]["diffusion_dpo"]["rounds"] = [
        {"round": 1, "train_seconds": 1.0},
        {"round": 2, "train_seconds": 1.0, "pairs": {"pairs": 9, "mean_score": 0.981}},
        {"round": 3, "train_seconds": 1.0, "pairs": {"pairs": 8, "mean_score": 0.9}}]
    text = format_results(results)
    assert "round 2: 9 pairs (samples score 0.981); round 3: 8 pairs (samples score 0.900)" in text
    assert text.count("warning:") == 1
    assert "warning: round 3's samples score 0.900, below round 2's 0.981: the rounds are not compounding" in text
    assert rounds_not_compounding({"mean_score": 0.935}, [{"round": 2, "pairs": {"mean_score": 0.9}}]) == [
        "warning: round 2's samples score 0.900, below round 1's 0.935: the rounds are not compounding"]
    assert rounds_not_compounding({}, [{"round": 2, "pairs": {"mean_score": 0.9}}]) == []  # nothing to compare


def test_mllm_demo_file_round_trip(tmp_path):
    results = mllm_demo_results()
    doc, tasks = written(write_mllm_demo, results, tmp_path / "results.json", "mllm_demo")
    assert tasks["shapeworld_vqa_aligned"] == {"overall": 62.5, "macro": 50.0}
    assert tasks["shapeworld_pope_base"] == {"accuracy": 0.75, "precision": 0.5, "recall": 1.0, "f1": 2 / 3}
    assert unpack_mllm_demo(doc) == results == read_mllm_results(tmp_path)
    assert format_mllm_results(unpack_mllm_demo(doc)) == format_mllm_results(results)
    assert read_mllm_demo(tmp_path) == {"model": "tiny/llava", "heldout_seed": 40000, "pair_seed": 50000}


def test_other_json_has_no_kind(tmp_path):
    assert results_kind({"results": {}}) is None and results_kind([1]) is None
    assert results_kind({"results": {}, "higher_is_better": {}, "mmalign": {"schema": "other/9"}}) is None
    lmms_eval = {"results": {"mmvet": {"alias": "mmvet", "gpt_eval_score,none": 31.2}},
                 "higher_is_better": {"mmvet": {"gpt_eval_score": True}}}  # lmms-eval's own output, same layout
    assert results_kind(lmms_eval) == "eval"
    legacy = {"results": {}, "mmalign": {"schema": "mmalign-results/1", "provenance": {}}}  # written before kinds
    assert results_kind(legacy) == "eval"


def test_demo_resolves_method_aliases_and_refuses_unknown_ones(tmp_path):
    with pytest.raises(SystemExit, match="unknown method 'nope'"):
        main(["demo", "--parts", "diffusion", "--methods", "inpo,nope", "--out", str(tmp_path)])


def test_miniature_diffusion_demo_file_and_report(tmp_path):
    """run_demo at toy scale: the recipe-built run trains, results.json is the diffusion_demo kind and reads back
    as what run_demo returned, and the report shows it with its before/after grid."""
    from mmalign.demo.diffusion import DemoSettings, run_demo
    from mmalign.evals.report import build_report, discover

    # train_steps None: the steps are the recipe's (here set by a recipe override, as a user's `train.max_steps=1`)
    s = DemoSettings(n=4, steps=2, pair_prompts=4, per_prompt=4, pair_steps=2, batch_size=4,
                     overrides=("train.max_steps=1",))
    res = run_demo(tmp_path, settings=s)
    doc = read_results(tmp_path / "results.json")["doc"]
    assert results_kind(doc) == "diffusion_demo" and unpack_diffusion_demo(doc) == res
    config = (tmp_path / "diffusion_dpo" / "config.yaml").read_text()
    assert "beta: 1000.0" in config and "resume: never" in config and "max_steps: 1" in config
    assert res["aligned"]["diffusion_dpo"]["pair_steps"] == 1 * 4
    assert len(discover(tmp_path).diffusion[0][2]) == 2 and "diffusion_dpo" in build_report([tmp_path])


def test_miniature_demo_rounds_overrides_and_guidance_free_baseline(tmp_path):
    """Two on-policy rounds (round 2 trains from round 1's model on pairs drawn from it), a recipe override for
    every method, the validation split, and CCA compared with the base sampled guidance-free as well as with
    the CFG-sampled base."""
    import yaml

    from mmalign.datasets.shapeworld import heldout_part
    from mmalign.demo.diffusion import DemoSettings, heldout_prompts, run_demo

    s = DemoSettings(n=4, steps=2, pair_prompts=4, per_prompt=4, pair_steps=2, train_steps=1, batch_size=4,
                     methods=("diffusion_dpo", "diffusion_cca"), rounds=2, split="validation",
                     overrides=("objective.sft_weight=0.5", "train.lr=1e-4"))  # as typed after `mmalign train`
    res = run_demo(tmp_path, settings=s)
    assert all(heldout_part(p) == "validation" for p in heldout_prompts(4, "validation"))
    assert res["settings"]["split"] == "validation" and "accuracy_guidance1" in res["base"]
    dpo, cca = res["aligned"]["diffusion_dpo"], res["aligned"]["diffusion_cca"]
    assert "vs_cfg_base" not in dpo and dpo["guidance"] == 4.0 and dpo["pair_steps"] == 2 * 1 * 4
    assert cca["guidance"] == 1.0 and set(cca["vs_cfg_base"]) >= {"gain", "win_rate"}
    assert [r["round"] for r in dpo["rounds"]] == [1, 2] and "pairs" in dpo["rounds"][1]
    second = yaml.safe_load((tmp_path / "diffusion_dpo" / "round2" / "diffusion_dpo" / "config.yaml").read_text())
    assert second["model"]["pretrained"] == str(tmp_path / "diffusion_dpo" / "round1" / "diffusion_dpo" / "final")
    assert second["objective"]["sft_weight"] == 0.5 and second["train"]["lr"] == 1e-4
    with pytest.raises(ValueError, match="split must be"):
        heldout_prompts(4, "heldout")
