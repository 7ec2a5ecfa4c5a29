"""The demo's evaluator pass on the vision-language half: the MM-Vet-style harness with the rule judge must
reproduce the demo's own accuracy, gain and POPE numbers from the saved answers, and the report shows them."""
import json

import pytest

from mmalign.demo.evals import mllm_evals, write_demo_report
from mmalign.demo.mllm import MLLMDemoSettings, run_mllm_demo

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mllm_evals_reproduce_the_demo_numbers(tiny_llava_dir, tmp_path):
    s = MLLMDemoSettings(eval_scenes=6, eval_per_scene=4, pair_scenes=6, pair_per_scene=3, n_samples=3,
                         train_steps=2, batch_size=2)
    demo = run_mllm_demo(tmp_path / "mllm", model=tiny_llava_dir, settings=s)
    base_path, aligned_path = mllm_evals(tmp_path / "mllm")
    docs = {k: json.loads(p.read_text()) for k, p in (("base", base_path), ("aligned", aligned_path))}
    for name, doc in docs.items():
        assert doc["results"]["mmvet"]["total,none"] == pytest.approx(demo[name]["overall"])
        assert doc["n-samples"]["mmvet"]["original"] == demo["n_questions"] == 24
        assert doc["mmalign"]["provenance"]["judge"] == "rule:shapeworld_vqa"
        if demo[name]["pope"]["n"]:
            assert doc["results"]["pope"]["accuracy,none"] == pytest.approx(demo[name]["pope"]["accuracy"])
    cmp = docs["aligned"]["mmalign"]["extra"]["mmvet"]["comparison"]
    want = demo["comparison"]["overall"]
    assert cmp["n_paired"] == 24 and 100 * cmp["gain"] == pytest.approx(want["gain"])
    assert [100 * v for v in cmp["ci95"]] == pytest.approx(want["ci95"])
    html = write_demo_report(tmp_path).read_text()
    assert "mmvet" in html and "pope" in html
