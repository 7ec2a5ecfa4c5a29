"""ShapeWorld VQA for VLMs: deterministic benchmark, grading table, paired comparison, on-policy pairs, and the
shipped tiny LLaVA's held-out accuracy."""
from pathlib import Path

import numpy as np
import pytest
import torch

from mmalign.datasets.shapeworld import is_heldout
from mmalign.datasets.shapeworld.vqa import grade
from mmalign.datasets.vl_records import read_vl_pairs
from mmalign.mllm import shapeworld as sw
from mmalign.mllm.shapeworld import (compare_vqa, evaluate_vqa, onpolicy_vqa_pairs, preference_pairs,
                                     summarize_vqa, vqa_benchmark)
from mmalign.mllm.tiny import build_tiny_llava, load_architecture

SHIPPED = Path(__file__).resolve().parents[1] / "mmalign/assets/shapeworld_llava"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llava(load_architecture("configs/models/shapeworld_llava_tiny.yaml"), seed=0)


@pytest.fixture(scope="module")
def bench():
    return vqa_benchmark(seed=3, n_scenes=8, per_scene=4, split="heldout")


def test_benchmark_is_deterministic_and_heldout(bench):
    again = vqa_benchmark(seed=3, n_scenes=8, per_scene=4, split="heldout")
    assert [ex.item for ex in again] == [ex.item for ex in bench]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(again, bench))
    assert all(is_heldout(ex.scene.caption) for ex in bench)
    assert len(bench) <= 8 * 4 and len({ex.scene for ex in bench}) == 8
    other = vqa_benchmark(seed=4, n_scenes=8, per_scene=4, split="heldout")
    assert [ex.item for ex in other] != [ex.item for ex in bench]
    assert all(not is_heldout(ex.scene.caption) for ex in vqa_benchmark(seed=3, n_scenes=4, split="train"))


def test_hand_made_predictions_give_expected_table(bench):
    truth = [ex.item.answer for ex in bench]
    perfect = summarize_vqa(bench, truth)
    assert perfect["overall"] == 100 and all(r["score"] == 100 for r in perfect["table"].values())
    assert sum(r["n"] for r in perfect["table"].values()) == len(bench)
    assert perfect["pope"]["accuracy"] == 1.0

    # Right on every second item, "yes" elsewhere.
    preds = [t if i % 2 == 0 else "yes" for i, t in enumerate(truth)]
    res = summarize_vqa(bench, preds)
    for cap, row in res["table"].items():
        want = [grade(ex.item, p) for ex, p in zip(bench, preds) if ex.item.capability == cap]
        assert row["n"] == len(want) and row["score"] == pytest.approx(100 * np.mean(want))
    exist = [(ex.item, p) for ex, p in zip(bench, preds) if ex.item.capability == "existence"]
    assert res["pope"]["n"] == len(exist) > 0
    assert res["pope"]["yes_ratio"] == pytest.approx(np.mean([p == "yes" for _, p in exist]))
    assert res["overall"] == pytest.approx(100 * np.mean(res["scores"]))
    assert "| overall |" in sw.format_table(res)
    with pytest.raises(ValueError):
        summarize_vqa(bench, truth[:-1])


def test_compare_gains_and_refuses_other_items(bench):
    truth = [ex.item.answer for ex in bench]
    before = summarize_vqa(bench, ["dunno"] * len(bench))
    after = summarize_vqa(bench, truth)
    cmp = compare_vqa(before, after)
    assert cmp["overall"]["gain"] == pytest.approx(100.0)
    assert cmp["overall"]["ci95"][0] > 0 and cmp["overall"]["significant"]
    assert sum(r["n"] for r in cmp["table"].values()) == len(bench)
    assert cmp["pope"]["before"]["accuracy"] == 0.0 and cmp["pope"]["after"]["accuracy"] == 1.0
    same = compare_vqa(after, after)
    assert same["overall"]["gain"] == 0 and not same["overall"]["significant"]
    other = vqa_benchmark(seed=5, n_scenes=8, per_scene=4, split="heldout")
    with pytest.raises(ValueError, match="same examples"):
        compare_vqa(before, summarize_vqa(other, [ex.item.answer for ex in other]))
    with pytest.raises(ValueError, match="same examples"):
        compare_vqa(before, summarize_vqa(bench[::-1], truth[::-1]))


def test_compare_resamples_scene_captions():
    """Right answers on the scenes of one caption only: over items that looks significant, over the captions the
    questions came from it does not."""
    bench = vqa_benchmark(seed=3, n_scenes=40, per_scene=4, split="heldout")
    caps = [ex.scene.caption for ex in bench]
    first = caps[0]
    before = summarize_vqa(bench, ["dunno"] * len(bench))
    after = summarize_vqa(bench, [ex.item.answer if c == first else "dunno" for ex, c in zip(bench, caps)])
    assert after["groups"] == caps and len(set(caps)) >= 10
    cmp = compare_vqa(before, after)
    assert cmp["overall"]["ci95"][0] == 0.0 and not cmp["overall"]["significant"]
    assert f"{len(set(caps))} distinct scene captions" in cmp["ci_unit"]
    ungrouped = {k: v for k, v in before.items() if k != "groups"}  # a result saved before groups existed
    old = compare_vqa(ungrouped, after)
    assert old["overall"]["significant"] and "over samples" in old["ci_unit"]


def test_mirror_balance_by_hand():
    pairs = [("3", "2"), ("3", "2"), ("2", "3"), ("3", "2"), ("0", "1"), ("yes", "no"), ("no", "yes"), ("1", "0")]
    kept = sw.mirror_balance(pairs)
    # 3>2 three times, 2>3 once: one of each; 0>1 / 1>0 once each; yes/no once each; first ones in order
    assert kept == [0, 2, 4, 5, 6, 7]
    net = {}
    for a, b in (pairs[i] for i in kept):
        net[a], net[b] = net.get(a, 0) + 1, net.get(b, 0) - 1
    assert set(net.values()) == {0}  # no answer is chosen more often than it is rejected
    assert sw.mirror_balance([("a red circle", "a blue square")]) == [0]  # seen once: kept
    assert sw.mirror_balance([("3", "2"), ("3", "2")]) == []  # only ever one way: a pure answer prior


def test_balance_rows_is_per_capability():
    def row(cap, chosen, rejected):
        return ([], [], sw.answer_messages(chosen), sw.answer_messages(rejected), {"capability": cap})
    rows = [row("count", "3", "2"), row("count", "3", "2"), row("count", "2", "3"), row("shape", "2", "3")]
    kept, dropped = sw.balance_rows(rows)
    assert kept == [rows[0], rows[2], rows[3]] and dropped == {"count": 1}


def test_evaluate_random_model_counts_add_up(tiny, bench):
    model, processor = tiny
    res = evaluate_vqa(model, processor, bench, batch_size=16, max_new_tokens=4)
    assert len(res["predictions"]) == len(res["scores"]) == len(bench)
    assert sum(r["n"] for r in res["table"].values()) == len(bench)
    assert res["scores"] == [grade(ex.item, p) for ex, p in zip(bench, res["predictions"])]
    again = evaluate_vqa(model, processor, bench, batch_size=7, max_new_tokens=4)
    assert again["predictions"] == res["predictions"]  # greedy, batch-independent


def test_preference_pairs_dedupes_and_skips_empty():
    answers, grades = ["red", "blue", "red", "", "green"], [1.0, 0.0, 1.0, 0.0, 0.0]
    assert preference_pairs(answers, grades, "best") == [(0, 1)]
    assert preference_pairs(answers, grades, "all") == [(0, 1), (0, 4)]
    assert preference_pairs(["a", "b"], [0.5, 0.5], "all") == []
    assert preference_pairs(["", ""], [0.0, 0.0], "best") == []
    with pytest.raises(ValueError):
        preference_pairs(answers, grades, "worst")


def test_onpolicy_pairs_with_scripted_samples(bench, tmp_path, monkeypatch):
    """Samples fixed per prompt: every third prompt gets equal answers (no preference)."""
    n = 3

    def fake_generate(model, processor, items, **kw):
        assert kw["do_sample"] and len(items) == len(bench) * n
        out = []
        for k, ex in enumerate(bench):
            out += [ex.item.answer] * n if k % 3 == 0 else [ex.item.answer, "zebra stripes", ""]
        return out

    monkeypatch.setattr(sw, "generate_answers", fake_generate)
    summary = onpolicy_vqa_pairs(None, None, bench, tmp_path / "best", n_samples=n, pairing="best")
    want_no_pref = len(range(0, len(bench), 3))
    assert summary["no_preference"] == want_no_pref
    assert sum(summary["no_preference_by_capability"].values()) == want_no_pref
    assert summary["empty_samples"] == len(bench) - want_no_pref
    assert summary["n_pairs"] == len(bench) - want_no_pref  # "zebra stripes" always grades 0
    pairs, report = read_vl_pairs(tmp_path / "best")
    assert len(pairs) == summary["n_pairs"] and not report.skipped
    for p in pairs:
        ex = bench[p.meta["example"]]
        assert p.chosen[0]["content"][0]["text"] == ex.item.answer
        assert p.rejected[0]["content"][0]["text"] == "zebra stripes"
        assert p.prompt == sw.question_messages(ex.item.question)
        assert p.meta["chosen_grade"] > p.meta["rejected_grade"] and p.meta["margin"] > 0
    # every pair is "truth over zebra stripes", never the other way: mirror balancing keeps only the pairs whose
    # two answers occur once (a pure answer prior otherwise), and counts what it dropped
    mirrored = onpolicy_vqa_pairs(None, None, bench, tmp_path / "mirror", n_samples=n, pairing="best",
                                  balance="mirror")
    texts = [(ex.item.capability, ex.item.answer) for k, ex in enumerate(bench) if k % 3]
    once = sum(texts.count(t) == 1 for t in texts)
    assert mirrored["balance"] == "mirror" and mirrored["n_pairs"] == once < summary["n_pairs"]
    assert sum(mirrored["balance_dropped"].values()) == summary["n_pairs"] - once
    with pytest.raises(ValueError, match="balance"):
        onpolicy_vqa_pairs(None, None, bench, tmp_path / "x", n_samples=n, balance="both")


def test_onpolicy_pairs_with_real_sampling(tiny, bench, tmp_path):
    model, processor = tiny
    kw = dict(n_samples=4, temperature=1.5, seed=1, batch_size=32, max_new_tokens=3)
    best = onpolicy_vqa_pairs(model, processor, bench, tmp_path / "best", pairing="best", **kw)
    allp = onpolicy_vqa_pairs(model, processor, bench, tmp_path / "all", pairing="all", **kw)
    assert best["no_preference"] == allp["no_preference"]  # same samples (same seed)
    assert best["mean_sample_grade"] == allp["mean_sample_grade"]
    assert best["n_pairs"] == len(bench) - best["no_preference"]
    assert allp["n_pairs"] >= best["n_pairs"]
    for sub, summary in (("best", best), ("all", allp)):
        pairs, _ = read_vl_pairs(tmp_path / sub)
        assert len(pairs) == summary["n_pairs"]
        for p in pairs:
            item = bench[p.meta["example"]].item
            chosen, rejected = p.chosen[0]["content"][0]["text"], p.rejected[0]["content"][0]["text"]
            assert grade(item, chosen) == p.meta["chosen_grade"] > p.meta["rejected_grade"] == grade(item, rejected)
    with pytest.raises(ValueError):
        onpolicy_vqa_pairs(model, processor, bench, tmp_path / "x", n_samples=1)


def test_shipped_llava_answers_heldout_questions_well_not_perfectly():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    assert (SHIPPED / "config.json").is_file(), "run scripts/build_shapeworld_llava.sh"
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(SHIPPED)
    processor = AutoProcessor.from_pretrained(SHIPPED)
    res = evaluate_vqa(model, processor, vqa_benchmark(seed=10_000, n_scenes=40, per_scene=6, split="heldout"))
    assert 40 < res["overall"] < 98, sw.format_table(res)
    assert res["table"]["colour"]["score"] > 50  # far above chance (1/6)
