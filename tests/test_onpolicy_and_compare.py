"""Pair selection from scored samples, and the paired comparison statistics (hand-computed cases)."""
import pytest

from mmalign.diffusion.onpolicy import best_vs_worst, ranked_pairs, reward_from_scores
from mmalign.evals.compare import compare_scores
from mmalign.core.stats import paired_gain_ci, win_rate


def test_best_vs_worst_and_ranked_pairs():
    assert best_vs_worst([0.5, 2.0, 0.0, 2.0]) == (1, 2)  # first of the tied best
    assert best_vs_worst([1.0, 1.0, 1.0]) is None
    assert ranked_pairs([0.5, 2.0, 0.0, 2.0]) == [(1, 0), (1, 2), (3, 0), (3, 2), (0, 2)]  # ties (1, 3) left out
    assert ranked_pairs([1.0, 1.0]) == []


def test_reward_from_scores():
    assert reward_from_scores({"count": 1.0, "colour": 1.0, "shape": 0.0, "binding": 0.0, "correct": 0.0}) == 0.5
    assert reward_from_scores({"count": 1.0, "colour": 1.0, "correct": 1.0}) == 2.0


def test_win_rate_counts_ties_half():
    r = win_rate([1, 2, 3, 0], [0, 2, 1, 1])
    assert (r["wins"], r["ties"], r["losses"]) == (2, 1, 1)
    assert r["win_rate"] == pytest.approx(2.5 / 4) and r["ci95"][0] <= 0.625 <= r["ci95"][1]
    with pytest.raises(ValueError, match="equal-length"):
        win_rate([1, 2], [1])


def test_paired_gain_ci_excludes_zero_only_for_a_consistent_gain():
    mean, lo, hi = paired_gain_ci([1] * 60 + [0] * 40, [0] * 30 + [1] * 30 + [0] * 40)
    assert mean == pytest.approx(0.3) and lo > 0
    mean, lo, hi = paired_gain_ci([1, 0] * 50, [0, 1] * 50)
    assert mean == 0 and lo < 0 < hi


def test_compare_scores_refuses_mismatched_runs():
    a = [{"correct": 1.0, "spatial": 1.0}, {"correct": 0.0}]
    b = [{"correct": 0.0, "spatial": 0.0}, {"correct": 0.0}]
    out = compare_scores(a, b, lambda s: s["correct"])
    assert out["gain"]["correct"]["gain"] == 0.5 and out["gain"]["spatial"]["n"] == 1
    assert out["win_rate"]["wins"] == 1 and out["win_rate"]["ties"] == 1
    with pytest.raises(ValueError, match="same prompts"):
        compare_scores(a, b[:1], lambda s: s["correct"])
    with pytest.raises(ValueError, match="different samples"):
        compare_scores([{"correct": 1.0}, {"correct": 0.0, "spatial": 1.0}], b, lambda s: s["correct"])


def test_make_onpolicy_pairs_pairing_and_threshold(tmp_path, monkeypatch):
    """Scores per prompt (3 samples): p0 [2, 0.5, 0] -> 3 ranked pairs; p1 [1, 1, 1] -> no preference;
    p2 [0.75, 0.25, 0.25] -> 2 pairs, none with a winner >= 2."""
    import json

    from PIL import Image

    from mmalign.datasets.pairs import read_pairs
    from mmalign.diffusion import onpolicy

    scores = [2.0, 0.5, 0.0, 1.0, 1.0, 1.0, 0.75, 0.25, 0.25]
    images = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(9)]
    monkeypatch.setattr(onpolicy, "sample_images", lambda pipe, prompts, seeds, **kw: images[:len(prompts)])
    scorer = lambda im, prompt: scores[im.getpixel((0, 0))[0]]  # noqa: E731
    info = onpolicy.make_onpolicy_pairs(None, ["p0", "p1", "p2"], 3, tmp_path / "all", scorer, pairing="all")
    assert info["pairs"] == 5 and info["report"]["kept"] == 2
    rows, _ = read_pairs(tmp_path / "all")
    assert [(r.extra["score_0"], r.extra["score_1"]) for r in rows] == [(2, .5), (2, 0), (.5, 0), (.75, .25), (.75, .25)]
    info = onpolicy.make_onpolicy_pairs(None, ["p0", "p1", "p2"], 3, tmp_path / "cw", scorer, pairing="all",
                                        min_winner_score=2.0)
    assert info["pairs"] == 2 and info["report"]["skipped"] == {"no preference (all samples scored equal)": 1,
                                                                 "no winner scoring >= 2.0": 1}
    best = onpolicy.make_onpolicy_pairs(None, ["p0", "p1", "p2"], 3, tmp_path / "bw", scorer, seed=10)
    meta = [json.loads(line) for line in open(tmp_path / "bw/metadata.jsonl")]
    assert [(m["seed_0"], m["seed_1"]) for m in meta] == [(10, 12), (16, 17)] and best["pairs"] == 2
