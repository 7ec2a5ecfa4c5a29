"""The cluster bootstrap in core.stats: samples that share a prompt are resampled together; and pass@k."""
from itertools import combinations

import numpy as np
import pytest

from mmalign.core.stats import (bootstrap_ci, cluster_se, group_sums, paired_gain_ci, pass_at, pass_at_curve,
                                win_rate)
from mmalign.evals.compare import compare_scores


def test_group_sums_by_hand():
    sums, sizes = group_sums([1.0, 2.0, 3.0, 4.0, 5.0], ["b", "a", "b", "c", "a"])
    assert sums.tolist() == [4.0, 7.0, 4.0]  # b: 1+3, a: 2+5, c: 4 (first-seen order)
    assert sizes.tolist() == [2.0, 2.0, 1.0]
    with pytest.raises(ValueError, match="label every item"):
        group_sums([1.0, 2.0], ["a"])


def test_one_item_per_group_is_the_item_bootstrap():
    rng = np.random.default_rng(3)
    x = rng.random(40)
    assert bootstrap_ci(x, groups=[f"p{i}" for i in range(40)]) == pytest.approx(bootstrap_ci(x), abs=1e-12)


def test_two_groups_by_hand():
    """Groups {0, 0, 0} and {1}: a replicate draws 2 groups with replacement, so its mean is 0 (twice the
    first), 1 (twice the second) or (0+0+0+1)/4 = 0.25 (one of each); the 95 % interval spans 0 to 1."""
    mean, lo, hi = bootstrap_ci([0.0, 0.0, 0.0, 1.0], n_boot=4000, groups=["a", "a", "a", "b"])
    assert mean == 0.25  # the point estimate stays the mean over items
    assert (lo, hi) == (0.0, 1.0)
    # treated as 4 independent items the interval is narrower
    _, lo_i, hi_i = bootstrap_ci([0.0, 0.0, 0.0, 1.0], n_boot=4000)
    assert (lo_i, hi_i) == (0.0, 0.75)


def test_few_groups_never_narrow_the_interval():
    """Two groups: a bootstrap over them sees almost no spread; the interval keeps the item bootstrap's width."""
    x = [0.0, 1.0] * 20 + [1.0, 0.0] * 20
    groups = ["a"] * 40 + ["b"] * 40
    _, lo, hi = bootstrap_ci(x, groups=groups)
    assert (lo, hi) == bootstrap_ci(x)[1:]
    many = [f"g{i // 4}" for i in range(80)]  # 20 groups: the cluster bootstrap alone
    _, lo_m, hi_m = bootstrap_ci(x, groups=many)
    assert (lo_m, hi_m) != bootstrap_ci(x)[1:]


def test_bootstrap_spread_matches_the_analytic_cluster_standard_error():
    """Independent formulation: the linearised (sandwich) cluster-robust SE of the mean."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 30, size=60)
    effects = rng.normal(0, 1, size=60)
    x = np.concatenate([e + rng.normal(0, 0.5, size=n) for e, n in zip(effects, sizes)])
    groups = np.repeat(np.arange(60), sizes)
    _, lo, hi = bootstrap_ci(x, n_boot=20000, seed=1, groups=groups)
    se = cluster_se(x, groups)
    assert (hi - lo) / (2 * 1.96) == pytest.approx(se, rel=0.06)
    # ignoring the clusters would claim about a fifth of that width here
    _, lo_i, hi_i = bootstrap_ci(x, n_boot=20000, seed=1)
    assert (hi_i - lo_i) < 0.4 * (hi - lo)


def test_paired_gain_and_win_rate_resample_groups():
    """One prompt improves on all its 10 seeds, nine prompts are unchanged: the item bootstrap calls the gain
    significant, the prompt bootstrap does not (one improved prompt of ten)."""
    groups = [p for p in range(10) for _ in range(10)]
    before = np.zeros(100)
    after = np.array([1.0 if g == 0 else 0.0 for g in groups])
    assert paired_gain_ci(after, before, n_boot=4000)[1] > 0
    gain, lo, hi = paired_gain_ci(after, before, n_boot=4000, groups=groups)
    assert gain == pytest.approx(0.1) and lo == 0.0 and hi > 0.2
    wr = win_rate(after, before, n_boot=4000, groups=groups)
    assert (wr["wins"], wr["ties"], wr["n_groups"]) == (10, 90, 10)
    assert wr["ci95"][0] == 0.5 and wr["ci95"][1] > 0.6
    assert win_rate(after, before, n_boot=4000)["ci95"][0] > 0.5


def test_compare_scores_groups_by_prompt():
    prompts = [f"prompt {p}" for p in range(8) for _ in range(8)]
    before = [{"correct": 0.0} for _ in prompts]
    after = [{"correct": 1.0 if p == "prompt 0" else 0.0} for p in prompts]
    reward = lambda s: s["correct"]  # noqa: E731
    items = compare_scores(after, before, reward)
    grouped = compare_scores(after, before, reward, groups=prompts)
    assert items["gain"]["correct"]["ci95"][0] > 0
    assert grouped["gain"]["correct"]["ci95"][0] == 0.0
    assert grouped["gain"]["correct"]["gain"] == items["gain"]["correct"]["gain"] == 0.125
    assert "8 distinct prompts" in grouped["ci_unit"] and "samples" in items["ci_unit"]
    with pytest.raises(ValueError, match="label every sample"):
        compare_scores(after, before, reward, groups=prompts[:-1])


def test_pass_at_by_hand_and_by_enumerating_the_draws():
    assert pass_at(4, 1, 1) == 0.25 and pass_at(4, 1, 2) == 0.5  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at(4, 0, 4) == 0.0 and pass_at(4, 4, 1) == 1.0
    for n, c in ((6, 2), (7, 3), (5, 1)):
        samples = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            draws = list(combinations(samples, k))  # every k-subset, equally likely without replacement
            assert pass_at(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws), abs=1e-12)
    with pytest.raises(ValueError, match="pass@k"):
        pass_at(4, 5, 1)


def test_pass_at_curve_weights_prompts():
    rows = pass_at_curve({"a": 1, "b": 4}, 4, {"a": 3, "b": 1})  # a: 1 of 4 correct, seen 3 times; b: 4 of 4
    assert [r["k"] for r in rows] == [1, 2, 4]
    assert rows[0]["weighted"] == pytest.approx((3 * 0.25 + 1) / 4) and rows[0]["unweighted"] == pytest.approx(0.625)
    assert rows[1]["weighted"] == pytest.approx((3 * 0.5 + 1) / 4) and rows[2]["unweighted"] == 1.0
