"""Demo-scale tier (make test-slow): the full demo on the shipped base within its 10-minute budget, with a
Diffusion-DPO gain whose 95 % CI excludes zero on 512 held-out prompts."""
import json
import time

import pytest

from mmalign.demo.diffusion import run_demo
from mmalign.evals.demo_results import unpack_diffusion_demo


@pytest.mark.slow
def test_full_demo_within_budget_and_dpo_gain_is_significant(tmp_path):
    t0 = time.time()
    res = run_demo(tmp_path / "demo")
    assert time.time() - t0 < 600
    assert res["n_prompts"] == 512
    saved = unpack_diffusion_demo(json.loads((tmp_path / "demo/results.json").read_text()))
    base = saved["base"]["accuracy"]["correct"]
    assert 0 < base["ci95"][0] <= base["mean"] <= base["ci95"][1] < 1
    gain = saved["aligned"]["diffusion_dpo"]["gain"]["correct"]
    assert gain["ci95"][0] > 0, f"DPO gain {gain} is not significant"
