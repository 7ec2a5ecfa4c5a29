"""The ShapeWorld video demo (mmalign.demo.video): caption split, reward, and a miniature end-to-end run on the
shipped base and motion adapter."""
import json

import pytest

from mmalign.evals.results import read_results
from mmalign.datasets.video import read_video, read_video_pairs
from mmalign.demo.video import (VideoDemoSettings, format_video_results, frame_consistency, motion_captions,
                                motion_reward, read_video_results, run_video_demo)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_heldout_captions_are_disjoint_from_pair_captions():
    train, heldout = motion_captions()
    assert len(train) == 54 and len(heldout) == 18 and not set(train) & set(heldout)
    assert {c.split()[-1] for c in heldout} == {"left", "right", "up", "down"}


def test_motion_reward_by_hand():
    s = {"direction_ok": True, "correct": False, "displacement_along": 0.9, "displacement_across": 0.0,
         "colour_consistent": 1.0, "shape_consistent": 0.5, "object_found_frac": 1.0}
    assert motion_reward(s) == pytest.approx(1 + 0 + 0.5 + 0.25 * 1.5)  # along clipped to 0.5
    wrong_way = {**s, "direction_ok": False, "displacement_along": -0.2}
    assert motion_reward(wrong_way) == pytest.approx(0 + 0 - 0.2 + 0.375)
    assert frame_consistency(s) == 0.75


def test_miniature_demo_writes_gifs_samples_and_results(tmp_path):
    s = VideoDemoSettings(n_eval=3, pair_prompts=2, per_prompt=2, steps=2, train_steps=1, batch_size=2)
    results = run_video_demo(tmp_path, s)
    out = tmp_path / "video"
    rows = [json.loads(x) for x in open(out / "samples.jsonl")]
    assert len(rows) == 6 and {r["model"] for r in rows} == {"base", "aligned"}
    for r in rows:
        assert r["file_name"].endswith(".gif") and isinstance(r["prompt"], str) and isinstance(r["seed"], int)
        assert len(read_video(out / r["file_name"])) == 8
    base = [r for r in rows if r["model"] == "base"]
    mean = sum(r["scores"]["direction_ok"] for r in base) / 3
    assert results["models"]["base"]["direction_acc"]["mean"] == pytest.approx(mean)
    gain = results["gain"]["direction_acc"]["mean"]
    aligned = results["models"]["aligned"]["direction_acc"]["mean"]
    assert gain == pytest.approx(aligned - mean)
    doc = read_results(out / "results.json")
    assert doc["tasks"]["shapeworld_motion_gain"]["direction_acc"] == pytest.approx(gain)
    assert doc["doc"]["mmalign"]["kind"] == "video_demo" and read_video_results(tmp_path) == results
    pairs, report = read_video_pairs(out / "pairs", 8)  # the pairs, reusable by `mmalign train`
    assert len(pairs) == results["pairs"]["pairs"] == report.kept >= 1
    table = format_video_results(results)
    assert "| direction_acc |" in table and "Video-DPO steps" in table
