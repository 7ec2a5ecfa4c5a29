"""The MLLM half of the demo end to end on a random tiny LLaVA with small settings: every stage runs and its
outputs agree with each other (fast tier). The shipped-model run with its significance check is in the slow tier."""
import json

import pytest

from mmalign.demo.mllm import MLLMDemoSettings, format_mllm_results, read_mllm_results, run_mllm_demo
from mmalign.evals.results import results_kind


def test_mllm_demo_pipeline_on_a_random_model(tiny_llava_dir, tmp_path):
    s = MLLMDemoSettings(eval_scenes=4, eval_per_scene=3, pair_scenes=6, pair_per_scene=3, n_samples=3,
                         train_steps=2, batch_size=2)
    res = run_mllm_demo(tmp_path / "mllm", model=tiny_llava_dir, settings=s)
    assert results_kind(json.loads((tmp_path / "mllm/results.json").read_text())) == "mllm_demo"
    saved = read_mllm_results(tmp_path / "mllm")
    assert saved == res
    assert saved["n_questions"] == 12 and saved["pairs"]["n_pairs"] >= 2
    pairs = [json.loads(line) for line in open(tmp_path / "mllm/pairs/pairs.jsonl")]
    assert len(pairs) == saved["pairs"]["n_pairs"] and all(p["chosen_grade"] > p["rejected_grade"] for p in pairs)
    cmp = saved["comparison"]["overall"]
    assert cmp["gain"] == pytest.approx(cmp["after"] - cmp["before"]) and cmp["n"] == 12
    assert cmp["before"] == pytest.approx(saved["base"]["overall"])
    answers = [json.loads(line) for line in open(tmp_path / "mllm/aligned_answers.jsonl")]
    assert len(answers) == 12 and (tmp_path / "mllm/mllm_dpo/final/model.safetensors").is_file()
    assert "overall" in format_mllm_results(res)


@pytest.mark.slow
def test_mllm_demo_gain_is_significant(tmp_path):
    import time

    t0 = time.time()
    res = run_mllm_demo(tmp_path / "mllm")
    assert time.time() - t0 < 150
    lo, hi = res["comparison"]["overall"]["ci95"]
    assert lo > 0, f"MLLM DPO gain {res['comparison']['overall']} is not significant"
