"""`mmalign demo --parts online` at toy scale: GRPO from the shipped recipe, once per trained reward, each
evaluated by the exact scorer against the base on the same held-out prompts and seeds."""
import json

import pytest

from mmalign.demo.online import OnlineDemoSettings, format_online_results, run_online_demo


def test_miniature_online_demo(tmp_path):
    s = OnlineDemoSettings(n=4, steps=2, train_steps=1)
    res = run_online_demo(tmp_path, settings=s)
    assert set(res["runs"]) == {"shapeworld", "clipscore"}
    for reward, r in res["runs"].items():
        assert r["curve"]["iterations"] == 1 and f"reward/{reward}_mean" in r["curve"]["first"]
        other = "clipscore" if reward == "shapeworld" else "shapeworld"
        assert f"heldout/{other}_mean" in r["curve"]["last"]  # the held-out reward is logged, not trained
        assert set(r["curve"]["seconds_per_iteration"]) >= {"time/rollout_s", "time/reward_s", "time/update_s"}
        assert r["gain"]["correct"]["n"] == 4 and 0 <= r["win_rate"]["win_rate"] <= 1
    cfg = (tmp_path / "online" / "grpo_clipscore" / "config.yaml").read_text()
    assert "clipscore: 1.0" in cfg and "max_steps: 1" in cfg
    assert json.loads((tmp_path / "online" / "results.json").read_text()) == res
    assert "trained on clipscore" in format_online_results(res)
    with pytest.raises(ValueError, match="online demo rewards"):
        run_online_demo(tmp_path / "x", settings=OnlineDemoSettings(rewards=("pickscore",)))
