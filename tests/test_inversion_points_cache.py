"""Inversion-DPO at the papers' inversion steps without their cost: the policy scored at K drawn points of each
trajectory (an unbiased estimate of the distance), and the reference's trajectories cached across epochs."""
import pytest
import torch
from diffusers import DDPMScheduler

from mmalign.diffusion.inversion import Trajectory
from mmalign.diffusion.inversion_dpo import inversion_dpo_loss, inversion_weights, weighted_points
from mmalign.diffusion.trajectory_cache import TrajectoryCache, row_digests

AC = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                   beta_end=0.012).alphas_cumprod
TS = torch.tensor([1, 150, 400, 650, 900])


def toy(n=5, b=3, seed=4):
    g = torch.Generator().manual_seed(seed)
    tw, tl = (Trajectory(torch.randn(n, b, 2, 3, generator=g), TS[:n], torch.randn(n, b, 2, 3, generator=g))
              for _ in range(2))
    return tw, tl, torch.randn(b, 2, 3, generator=g), torch.randn(b, 2, 3, generator=g)


def test_all_points_in_any_order_equal_the_full_loss():
    tw, tl, x0w, x0l = toy()
    lin = torch.nn.Linear(3, 3)
    full, mf = inversion_dpo_loss(lambda x, t: lin(x), tw, tl, x0w, x0l, AC, beta=50.0)
    perm = torch.stack([torch.randperm(5, generator=torch.Generator().manual_seed(c)) for c in range(3)], dim=1)
    shuffled, ms = inversion_dpo_loss(lambda x, t: lin(x), tw, tl, x0w, x0l, AC, beta=50.0, points=perm)
    assert torch.allclose(full, shuffled, rtol=1e-5)  # summed in another order
    assert torch.allclose(mf["model_err"], ms["model_err"], rtol=1e-6)


def test_one_point_per_pair_is_that_point_alone_and_unbiased():
    tw, tl, x0w, x0l = toy()
    lin = torch.nn.Linear(3, 3)
    _, full = inversion_dpo_loss(lambda x, t: lin(x), tw, tl, x0w, x0l, AC, beta=50.0)
    per_point = []
    for i in range(5):
        _, m = inversion_dpo_loss(lambda x, t: lin(x), tw, tl, x0w, x0l, AC, beta=50.0,
                                  points=torch.full((1, 3), i))
        per_point.append(m["model_err"])
    # D = (1/N) sum_i w_i err_i, and one point i estimates it by w_i err_i: the mean over i is D exactly
    assert torch.allclose(torch.stack(per_point).mean(0), full["model_err"], rtol=1e-5)
    # mixed points: pair b scored at p[b] is what pair b alone gets there (the loss is a mean over pairs)
    p = torch.tensor([[4, 0, 2]])
    loss, _ = inversion_dpo_loss(lambda x, t: lin(x), tw, tl, x0w, x0l, AC, beta=50.0, points=p)
    alone = [inversion_dpo_loss(lambda x, t: lin(x), *(Trajectory(tr.xs[:, b:b + 1], tr.ts, tr.eps_ref[:, b:b + 1])
                                                       for tr in (tw, tl)),
                                x0w[b:b + 1], x0l[b:b + 1], AC, beta=50.0, points=torch.tensor([[i]]))[0]
             for b, i in enumerate(p[0].tolist())]
    assert torch.allclose(loss, torch.stack(alone).mean(), rtol=1e-6)
    assert not torch.allclose(alone[0], inversion_dpo_loss(  # another point gives another loss: the test can fail
        lambda x, t: lin(x), *(Trajectory(tr.xs[:, :1], tr.ts, tr.eps_ref[:, :1]) for tr in (tw, tl)),
        x0w[:1], x0l[:1], AC, beta=50.0, points=torch.tensor([[1]]))[0])
    with pytest.raises(ValueError, match="indices into the 5"):
        inversion_dpo_loss(lambda x, t: lin(x), tw, tl, x0w, x0l, AC, points=torch.full((1, 3), 5))
    with pytest.raises(ValueError, match=r"\[K >= 1, 3\]"):
        inversion_dpo_loss(lambda x, t: lin(x), tw, tl, x0w, x0l, AC, points=torch.zeros(1, 2, dtype=torch.long))


def fake_inversion(calls):
    """A deterministic stand-in for the reference inversion: trajectory rows derived from x0, counting calls."""
    def compute(x0, idx):
        calls.append(idx.tolist())
        x = x0[idx]
        return Trajectory(torch.stack([x * (k + 1) for k in range(3)]), TS[:3], torch.stack([-x * k for k in range(3)]))
    return compute


def test_cache_computes_each_image_once_and_returns_what_a_fresh_inversion_would():
    g = torch.Generator().manual_seed(0)
    x0, ctx = torch.randn(4, 2, 2, generator=g), torch.randn(4, 3, generator=g)
    calls, cache = [], TrajectoryCache(2 ** 20)
    inv = fake_inversion(calls)
    first = cache.get(x0, {"ctx": ctx}, lambda idx: inv(x0, idx))
    fresh = inv(x0, torch.arange(4))
    assert torch.equal(first.xs, fresh.xs) and torch.equal(first.eps_ref, fresh.eps_ref)
    # a later batch: rows 2 and 0 seen, one new image, one seen image under another caption
    x1 = torch.stack([x0[2], x0[0], torch.randn(2, 2, generator=g), x0[1]])
    c1 = torch.stack([ctx[2], ctx[0], ctx[3], ctx[3]])
    calls.clear()
    second = cache.get(x1, {"ctx": c1}, lambda idx: inv(x1, idx))
    assert calls == [[2, 3]], "only the unseen (image, caption) rows are inverted"
    assert torch.equal(second.xs, inv(x1, torch.arange(4)).xs) and torch.equal(second.ts, TS[:3])
    assert cache.hits == 2 and cache.misses == 6 and cache.stats()["traj_cache_hit_rate"] == pytest.approx(0.25)


def test_cache_at_its_size_limit_computes_and_counts_instead_of_dropping():
    x0, cond = torch.randn(4, 2, 2), {"ctx": torch.randn(4, 3)}
    one_row = 2 * 3 * 4 * 4  # xs + eps_ref of one row: [3, 2, 2] fp32 each
    calls, cache = [], TrajectoryCache(2 * one_row)
    inv = fake_inversion(calls)
    cache.get(x0, cond, lambda idx: inv(x0, idx))
    assert cache.bytes == 2 * one_row and cache.uncached == 2
    calls.clear()
    again = cache.get(x0, cond, lambda idx: inv(x0, idx))
    assert calls == [[2, 3]] and torch.equal(again.xs, inv(x0, torch.arange(4)).xs)
    other = TrajectoryCache(2 ** 20)
    other.get(x0, cond, lambda idx: inv(x0, idx))
    with pytest.raises(ValueError, match="other timesteps"):
        other.get(x0 + 1, cond, lambda idx: Trajectory(x0[idx].expand(2, -1, -1, -1), TS[1:3], x0[idx].expand(2, -1, -1, -1)))
    with pytest.raises(ValueError, match="max_bytes"):
        TrajectoryCache(0)


def test_row_digests_see_every_conditioning_tensor():
    x0, ctx, ids = torch.zeros(2, 1), torch.zeros(2, 3), torch.tensor([[1.0], [2.0]])
    a = row_digests(x0, {"ctx": ctx})
    assert a[0] == a[1]
    b = row_digests(x0, {"ctx": ctx, "time_ids": ids})
    assert b[0] != b[1] and b[0] != a[0]


def test_points_drawn_by_weight_are_unbiased_and_follow_the_weights():
    tw, tl, x0w, x0l = toy()
    lin = torch.nn.Linear(3, 3)
    _, full = inversion_dpo_loss(lambda x, t: lin(x), tw, tl, x0w, x0l, AC, beta=5.0)
    p = inversion_weights(AC, TS) / 5  # the probability of each point
    est = [inversion_dpo_loss(lambda x, t: lin(x), tw, tl, x0w, x0l, AC, beta=5.0, points=torch.full((1, 3), i),
                              drawn_by_weight=True)[1]["model_err"] for i in range(5)]
    assert torch.allclose(sum(p[i] * est[i] for i in range(5)), full["model_err"], rtol=1e-5)
    assert not torch.allclose(est[0], full["model_err"], rtol=1e-2)  # one point alone is not D
    u = (torch.arange(10_000, dtype=torch.float64) + 0.5).div(10_000).view(2, 5_000)  # evenly spread uniforms
    idx = weighted_points(inversion_weights(AC, TS), u)
    assert idx.shape == (5_000, 2)
    freq = torch.bincount(idx.flatten(), minlength=5).double() / idx.numel()
    assert torch.allclose(freq, p.double(), atol=2e-4), (freq, p)


def test_cached_rows_own_their_memory():
    x0, cond = torch.randn(4, 2, 2), {"ctx": torch.randn(4, 3)}
    cache = TrajectoryCache(2 ** 20)
    cache.get(x0, cond, lambda idx: fake_inversion([])(x0, idx))
    kept = sum(t.untyped_storage().nbytes() for pair in cache.store.values() for t in pair)
    assert kept == cache.bytes == 4 * 2 * 3 * 4 * 4  # not 4 rows each holding the batch's [3, 4, 2, 2] storage
