"""Demo-scale tier (make test-slow): the full demo on the shipped base within its 10-minute budget."""
import json
import time

import pytest

from mmalign.demo import run_demo


@pytest.mark.slow
def test_full_demo_within_budget(tmp_path):
    t0 = time.time()
    res = run_demo(tmp_path / "demo")
    assert time.time() - t0 < 600
    assert res["n_prompts"] == 512
    saved = json.loads((tmp_path / "demo/results.json").read_text())
    lo, hi = saved["accuracy"]["correct"]["ci95"]
    assert 0 < lo <= saved["accuracy"]["correct"]["mean"] <= hi < 1
