"""Diffusion losses: hand-computed values, parity with an independent formulation, gradient directions."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmalign.diffusion.losses import cca_loss, cca_loss_ar, diffusion_dpo_loss, per_sample_mse, sft_loss


def test_per_sample_mse_and_sft_by_hand():
    pred = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])  # [2, 1, 1, 2]
    target = torch.tensor([[[[0.0, 0.0]]], [[[1.0, 3.0]]]])
    err = per_sample_mse(pred, target)
    assert torch.allclose(err, torch.tensor([(1 + 4) / 2, (1 + 9) / 2]))
    loss, m = sft_loss(err)
    assert loss.item() == pytest.approx((2.5 + 5.0) / 2) and m["model_err"].item() == pytest.approx(3.75)
    with pytest.raises(ValueError, match="differ in shape"):
        per_sample_mse(pred, target[:1])


def test_diffusion_dpo_by_hand():
    # beta 2: pair 1: (0.3 - 0.5) - (0.6 - 0.4) = -0.4 -> inside = -(2/2)(-0.4) = 0.4, loss = log(1 + e^-0.4)
    #         pair 2: (0.5 - 0.5) - (0.5 - 0.5) = 0    -> inside = 0,   loss = log 2
    mw, ml = torch.tensor([0.3, 0.5]), torch.tensor([0.6, 0.5])
    rw, rl = torch.tensor([0.5, 0.5]), torch.tensor([0.4, 0.5])
    loss, m = diffusion_dpo_loss(mw, ml, rw, rl, beta=2.0)
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-0.4)) + math.log(2)) / 2, rel=1e-6)
    assert m["implicit_acc"].item() == pytest.approx(0.75)  # one win, one tie counted 1/2
    assert m["reward_w"].item() == pytest.approx((0.2 + 0.0) / 2)  # -(2/2)(0.3-0.5) = 0.2
    assert m["reward_l"].item() == pytest.approx((-0.2 + 0.0) / 2)
    assert m["margin"].item() == pytest.approx(0.2)
    assert m["model_err"].item() == pytest.approx(0.475) and m["ref_err"].item() == pytest.approx(0.475)


def test_diffusion_dpo_matches_bradley_terry_softmax():
    """Independent formulation: -log P(w > l) with P from a softmax over the two implicit rewards, where the
    implicit reward of an image is -beta/2 * (err_theta - err_ref)."""
    g = torch.Generator().manual_seed(0)
    mw, ml, rw, rl = (torch.rand(64, generator=g, dtype=torch.float64) * 0.2 for _ in range(4))
    beta = 5000.0
    rewards = torch.stack([-beta / 2 * (mw - rw), -beta / 2 * (ml - rl)], dim=1)
    expected = -torch.log_softmax(rewards, dim=1)[:, 0].mean()
    loss, _ = diffusion_dpo_loss(mw, ml, rw, rl, beta=beta)
    assert torch.allclose(loss, expected, rtol=1e-10)


def test_diffusion_dpo_gradient_lowers_winner_error_and_raises_loser_error():
    mw = torch.tensor([0.2, 0.3], requires_grad=True)
    ml = torch.tensor([0.25, 0.1], requires_grad=True)
    loss, _ = diffusion_dpo_loss(mw, ml, torch.tensor([0.2, 0.3]), torch.tensor([0.25, 0.1]), beta=100.0)
    loss.backward()
    # at theta = ref the loss is log 2 and d/d err_w = beta/4 > 0, d/d err_l = -beta/4 (per pair, / B)
    assert loss.item() == pytest.approx(math.log(2))
    assert torch.allclose(mw.grad, torch.full((2,), 100.0 / 4 / 2))
    assert torch.allclose(ml.grad, torch.full((2,), -100.0 / 4 / 2))


def test_diffusion_dpo_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B\]"):
        diffusion_dpo_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1))


def test_cca_by_hand():
    # beta 1, lam 2: delta_pos = -(0.1 - 0.3) = 0.2, delta_neg = -(0.5 - 0.4) = -0.1
    # loss = -log s(0.2) - 2 log s(0.1) = log(1+e^-0.2) + 2 log(1+e^-0.1)
    loss, m = cca_loss(torch.tensor([0.1]), torch.tensor([0.3]), torch.tensor([0.5]), torch.tensor([0.4]),
                       beta=1.0, lam=2.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.2)) + 2 * math.log(1 + math.exp(-0.1)))
    assert m["delta_pos"].item() == pytest.approx(0.2) and m["delta_neg"].item() == pytest.approx(-0.1)
    assert m["cond_acc"].item() == 1.0


def test_cca_matches_weighted_binary_cross_entropy():
    """Independent formulation: BCE with logits beta*delta, label 1 for the true condition and label 0 (weight
    lam) for the mismatched one."""
    g = torch.Generator().manual_seed(1)
    lp, rp, ln, rn = (torch.randn(32, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    beta, lam = 0.02, 50.0
    loss, _ = cca_loss_ar(lp, rp, ln, rn, beta=beta, lam=lam)
    pos = F.binary_cross_entropy_with_logits(beta * (lp - rp), torch.ones(32, dtype=torch.float64))
    neg = F.binary_cross_entropy_with_logits(beta * (ln - rn), torch.zeros(32, dtype=torch.float64))
    assert torch.allclose(loss, pos + lam * neg, rtol=1e-10)
    # the diffusion form is the same objective with delta = -(err_theta - err_ref)
    loss_d, _ = cca_loss(-lp, -rp, -ln, -rn, beta=beta, lam=lam)
    assert torch.allclose(loss_d, loss, rtol=1e-12)


def test_inpo_target_recovers_the_forward_process_noise():
    """Independent formulation: diffusers' DDPMScheduler.add_noise builds x_t from (x0, eps, t); the
    re-parametrised target must give eps back for every sample's own t."""
    from diffusers import DDPMScheduler

    from mmalign.diffusion.losses import inpo_target

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([1, 101, 401, 701, 999])
    x_t = sched.add_noise(x0, eps, t)
    assert torch.allclose(inpo_target(x_t, x0, sched.alphas_cumprod[t]), eps, atol=1e-4)
    # by hand for one scalar: abar = 0.64 -> (x_t - 0.8 x0) / 0.6
    one = inpo_target(torch.tensor([[1.0]]), torch.tensor([[0.5]]), torch.tensor([0.64]))
    assert one.item() == pytest.approx((1.0 - 0.8 * 0.5) / 0.6)


def test_bco_by_hand_and_against_bce():
    from mmalign.diffusion.losses import bco_loss

    # beta 10, delta 0.1: sample 1 desirable, g = 10 * (0.3 - 0.25) = 0.5 -> -log s(0.4)
    #                     sample 2 undesirable, g = 10 * (0.2 - 0.22) = -0.2 -> -log s(0.3)
    loss, m = bco_loss(torch.tensor([0.25, 0.22]), torch.tensor([0.3, 0.2]), torch.tensor([1, 0]), beta=10.0,
                       delta=0.1)
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-0.4)) + math.log(1 + math.exp(-0.3))) / 2, rel=1e-5)
    assert m["reward_mean"].item() == pytest.approx(0.15, rel=1e-5)
    g = torch.Generator().manual_seed(3)
    me, re_ = torch.rand(16, generator=g, dtype=torch.float64), torch.rand(16, generator=g, dtype=torch.float64)
    y = (torch.rand(16, generator=g) > 0.5).double()
    loss, _ = bco_loss(me, re_, y, beta=3.0, delta=0.2)
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(3.0 * (re_ - me) - 0.2, y), rtol=1e-10)
