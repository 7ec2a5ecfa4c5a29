"""Tests for mmalign.mllm.losses: hand-computed values, gradients, validation, TRL 1.16 parity."""
import math
import types
from collections import defaultdict

import pytest
import torch

from mmalign.mllm.losses import DPO_LOSS_TYPES, dpo_loss, mdpo_loss, mmdpo_beta, sft_nll


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# Pair with chosen log-ratio 1 and rejected log-ratio 0, so z = 1.
PC, PR, RC, RR = t(-1.0), t(-3.0), t(-2.0), t(-3.0)


# ---------------------------------------------------------------- hand-computed values

def test_sigmoid_hand():
    # z = (-1 - -2) - (-3 - -3) = 1, β = 0.5 → βz = 0.5
    # loss = -log σ(0.5) = log(1 + e^{-0.5}) = log(1.6065307) = 0.4740770
    losses, rc, rr = dpo_loss(PC, PR, RC, RR, beta=0.5)
    assert losses.item() == pytest.approx(0.474076984, abs=1e-8)
    # rewards: β·(π - ref) = 0.5·1 = 0.5 and 0.5·0 = 0
    assert rc.item() == pytest.approx(0.5) and rr.item() == pytest.approx(0.0)


def test_sigmoid_label_smoothing_hand():
    # cDPO, ε = 0.2, βz = 0.5:
    # 0.8·log(1+e^{-0.5}) + 0.2·log(1+e^{0.5}) = 0.8·0.4740770 + 0.2·0.9740770
    # = 0.3792616 + 0.1948154 = 0.5740770  (= -log σ(βz) + ε·βz)
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.2)
    assert losses.item() == pytest.approx(0.574076984, abs=1e-8)


def test_robust_hand():
    # rDPO, ε = 0.2, βz = 0.5:
    # [0.8·0.4740770 - 0.2·0.9740770] / (1 - 0.4) = (0.3792616 - 0.1948154) / 0.6 = 0.1844462 / 0.6 = 0.3074103
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="robust", label_smoothing=0.2)
    assert losses.item() == pytest.approx(0.307410318, abs=1e-8)
    # ε = 0 reduces to plain sigmoid DPO
    plain, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="robust")
    assert plain.item() == pytest.approx(0.474076984, abs=1e-8)


def test_hinge_hand():
    # βz = 0.5·1 → relu(1 - 0.5) = 0.5;   second pair z = 3 → relu(1 - 1.5) = 0
    losses, _, _ = dpo_loss(t(-1.0, 0.0), t(-3.0, -3.0), t(-2.0, -3.0), t(-3.0, -3.0), beta=0.5, loss_type="hinge")
    assert losses.tolist() == pytest.approx([0.5, 0.0])


def test_ipo_hand():
    # chosen log-ratio 4 over 2 tokens → 2; rejected log-ratio -3 over 3 tokens → -1; z_avg = 3
    # β = 0.25 → 1/(2β) = 2 → (3 - 2)² = 1
    losses, rc, rr = dpo_loss(t(-1.0), t(-8.0), t(-5.0), t(-5.0), beta=0.25, loss_type="ipo",
                              chosen_lengths=t(2.0), rejected_lengths=t(3.0))
    assert losses.item() == pytest.approx(1.0)
    # rewards are not length-normalised: 0.25·4 = 1, 0.25·(-3) = -0.75
    assert (rc.item(), rr.item()) == pytest.approx((1.0, -0.75))


def test_mmdpo_beta_hand():
    # β = 0.1, w = 0.1, k = 0.5:
    # δ = 0 → 0.1·(1 + 0.1·0) = 0.1
    # δ = 2 → 1 - e^{-1} = 0.6321206 → 0.1·(1 + 0.06321206) = 0.10632121
    # δ = ∞-ish (100) → 0.1·1.1 = 0.11
    b = mmdpo_beta(0.1, t(0.0, 2.0, 100.0), w=0.1, k=0.5)
    assert b.tolist() == pytest.approx([0.1, 0.10632121, 0.11], abs=1e-8)


def test_mdpo_hand():
    # β = 1; c_w = 1, c_l = -1 → z = 2; c_crop = 0 → z_img = 1 - 0 = 1; anchor δ = 0 → β·c_w = 1
    # -log σ(2) = log(1+e^{-2}) = 0.1269280; -log σ(1) = log(1+e^{-1}) = 0.3132617 (twice)
    # total = 0.1269280 + 0.3132617 + 0.3132617 = 0.7534513
    losses, m = mdpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), t(-4.0), t(-4.0), beta=1.0)
    assert losses.item() == pytest.approx(0.753451, abs=1e-6)
    assert m["loss/dpo"].item() == pytest.approx(0.126928, abs=1e-6)
    assert m["loss/image"].item() == pytest.approx(0.313262, abs=1e-6)
    assert m["loss/anchor"].item() == pytest.approx(0.313262, abs=1e-6)
    assert m["rewards/margins"].item() == pytest.approx(2.0)
    # anchor δ = 1: third term becomes -log σ(1 - 1) = log 2 = 0.6931472
    _, m1 = mdpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), t(-4.0), t(-4.0), beta=1.0, anchor=1.0)
    assert m1["loss/anchor"].item() == pytest.approx(math.log(2))


def test_sft_nll_hand():
    # tokens kept: -1, -2 (row 0) and -3 (row 1) → token mean NLL = (1+2+3)/3 = 2
    # (a mean of per-row means would be (1.5 + 3)/2 = 2.25; TRL's sft uses the token mean)
    logps = t(-1.0, -2.0, -9.0, -3.0, -9.0, -9.0).view(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sft_nll(logps, mask).item() == pytest.approx(2.0)
    assert sft_nll(logps, mask.bool()).item() == pytest.approx(2.0)


# ---------------------------------------------------------------- gradients and β tensors

def test_sigmoid_gradient_signs():
    pc, pr = t(-1.0, -5.0).requires_grad_(), t(-3.0, -2.0).requires_grad_()
    losses, _, _ = dpo_loss(pc, pr, t(-2.0, -4.0), t(-3.0, -3.0), beta=0.5)
    losses.sum().backward()
    # descent (−grad) raises the chosen and lowers the rejected log-prob
    assert torch.all(pc.grad < 0) and torch.all(pr.grad > 0)
    # dL/dπc = -β·σ(-βz): pair 0 z = 1 → -0.5·σ(-0.5) = -0.5·0.3775407 = -0.1887703
    assert pc.grad[0].item() == pytest.approx(-0.18877033, abs=1e-7)
    assert pr.grad.tolist() == pytest.approx((-pc.grad).tolist())


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_per_sample_beta_equals_loop(loss_type):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-5 * torch.rand(6, generator=g, dtype=torch.float64) for _ in range(4))
    lc, lr = t(1, 2, 3, 4, 5, 6), t(6, 5, 4, 3, 2, 1)
    betas = t(0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
    eps = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    kw = dict(loss_type=loss_type, label_smoothing=eps)
    pc_ = pc.clone().requires_grad_()
    out = dpo_loss(pc_, pr, rc, rr, beta=betas, chosen_lengths=lc, rejected_lengths=lr, **kw)
    out[0].sum().backward()
    for i in range(6):
        pci = pc[i:i + 1].clone().requires_grad_()
        ref = dpo_loss(pci, pr[i:i + 1], rc[i:i + 1], rr[i:i + 1], beta=float(betas[i]),
                       chosen_lengths=lc[i:i + 1], rejected_lengths=lr[i:i + 1], **kw)
        ref[0].sum().backward()
        for a, b in zip(out, ref):
            assert a[i].item() == pytest.approx(b.item(), abs=1e-12)
        assert pc_.grad[i].item() == pytest.approx(pci.grad.item(), abs=1e-12)


def test_mmdpo_beta_detached_monotone_and_feeds_dpo():
    margins = t(0.0, 0.5, 1.0, 4.0).requires_grad_()
    b = mmdpo_beta(0.1, margins, w=0.5, k=1.0)
    assert not b.requires_grad and b.shape == (4,)
    assert torch.all(b[1:] > b[:-1]) and torch.all(b < 0.1 * 1.5)
    losses, rc, _ = dpo_loss(t(-1, -1, -1, -1), t(-3, -3, -3, -3), t(-2, -2, -2, -2), t(-3, -3, -3, -3), beta=b)
    assert rc.tolist() == pytest.approx(b.tolist())  # chosen log-ratio 1 → reward = β_i
    assert torch.all(losses[1:] < losses[:-1])  # z > 0: larger β, smaller loss


def test_mdpo_anchor_gradient_raises_chosen():
    # even with a huge margin (z, z_img saturated), the anchor term pushes a falling chosen logp back up
    pc = t(-10.0).requires_grad_()
    losses, _ = mdpo_loss(pc, t(-200.0), t(-9.0), t(-9.0), t(-200.0), t(-9.0), beta=0.5)
    losses.sum().backward()
    assert pc.grad.item() < -0.3  # ≈ -β·σ(β·1)= -0.5·0.6225 from the anchor term alone


# ---------------------------------------------------------------- independent formulations

def test_mdpo_equals_three_sigmoid_dpo_calls():
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr, pcc, rcc = (-8 * torch.rand(5, generator=g, dtype=torch.float64) for _ in range(6))
    beta, anchor = 0.3, 0.2
    ours, _ = mdpo_loss(pc, pr, rc, rr, pcc, rcc, beta=beta, anchor=anchor)
    zero = torch.zeros_like(pc)
    pref, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta)
    img, _, _ = dpo_loss(pc, pcc, rc, rcc, beta=beta)  # "rejected" = chosen answer, cropped image
    # anchor: a "rejected" log-ratio of anchor/β gives β·(c_w − anchor/β) = β·c_w − anchor
    anc, _, _ = dpo_loss(pc, zero + anchor / beta, rc, zero, beta=beta)
    torch.testing.assert_close(ours, pref + img + anc, rtol=0, atol=1e-12)


def test_mmdpo_beta_matches_math():
    for beta, w, k, d in [(0.1, 0.1, 0.5, 0.3), (0.2, 0.5, 1.0, 2.5), (0.05, 1.0, 0.1, 7.0), (0.3, 0.0, 2.0, 1.0)]:
        expected = beta * (1 + w * (1 - math.exp(-k * d)))
        assert mmdpo_beta(beta, t(d), w=w, k=k).item() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- validation

def test_validation_errors():
    with pytest.raises(ValueError, match="known.*sigmoid.*robust.*hinge.*ipo"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto")
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        dpo_loss(PC, PR, RC, RR, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(PC, PR, RC, RR, loss_type="robust", label_smoothing=-0.1)
    with pytest.raises(ValueError, match="no label smoothing"):
        dpo_loss(PC, PR, RC, RR, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(t(1.0, 2.0), PR, RC, RR)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(PC.view(1, 1), PR.view(1, 1), RC.view(1, 1), RR.view(1, 1))
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(PC, PR, RC, RR, loss_type="ipo")
    with pytest.raises(ValueError, match="> 0"):
        dpo_loss(PC, PR, RC, RR, loss_type="ipo", chosen_lengths=t(0.0), rejected_lengths=t(1.0))
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(PC, PR, RC, RR, beta=t(0.1, 0.2))
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(PC, PR, RC, RR, beta=0.0)
    with pytest.raises(ValueError, match="margins must be >= 0"):
        mmdpo_beta(0.1, t(1.0, -0.5))
    with pytest.raises(ValueError, match="finite"):
        mmdpo_beta(0.1, t(float("nan")))
    with pytest.raises(ValueError, match="no tokens"):
        sft_nll(t(-1.0, -2.0).view(1, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="shape"):
        mdpo_loss(PC, PR, RC, RR, t(1.0, 2.0), RC)


# ---------------------------------------------------------------- parity with TRL 1.16 DPOTrainer._compute_loss

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator
    return Accelerator(cpu=True)


def _random_batch(seed, B=5, T=9):
    """Token log-probs (2B, T-1) zero off the completion; batch is [chosen; rejected] as TRL expects."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T - 1, (2 * B,), generator=g)  # completion length ≤ T-2; position 0 is prompt
    completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        completion_mask[i, T - n:] = 1
    shift_mask = completion_mask[:, 1:]
    token_logps = -3 * torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64) * shift_mask
    ref = token_logps.sum(1) - 0.5 + torch.rand(2 * B, generator=g, dtype=torch.float64)
    return dict(token_logps=token_logps, completion_mask=completion_mask, shift_mask=shift_mask,
                ref_chosen=ref[:B], ref_rejected=ref[B:], B=B, T=T)


def _trl_loss(accelerator, batch, loss_types, loss_weights, beta, label_smoothing=0.0):
    B, T = batch["B"], batch["T"]
    n = 2 * B

    def fake_model(**kwargs):
        assert kwargs["labels"].shape == (n, T)
        return types.SimpleNamespace(
            log_probs=batch["token_logps"],
            entropy=torch.ones(n, T - 1, dtype=torch.float64),
            mean_logits=torch.zeros(n, T - 1, dtype=torch.float64),
            is_top1=torch.zeros(n, T - 1, dtype=torch.bool),
        )

    fake_model.training = True
    self = types.SimpleNamespace(
        model=fake_model, accelerator=accelerator, loss_types=loss_types, loss_weights=loss_weights,
        beta=beta, label_smoothing=label_smoothing, ld_alpha=None, f_divergence_type="reverse_kl",
        use_weighting=False, aux_loss_enabled=False, precompute_ref_logps=True,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        args=types.SimpleNamespace(),
    )
    inputs = dict(
        input_ids=torch.zeros(n, T, dtype=torch.long), attention_mask=torch.ones(n, T, dtype=torch.long),
        completion_mask=batch["completion_mask"], ref_chosen_logps=batch["ref_chosen"],
        ref_rejected_logps=batch["ref_rejected"],
    )
    loss = trl_dpo.DPOTrainer._compute_loss(self, fake_model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in self._metrics["train"].items()}


def _ours(batch, loss_type, beta, label_smoothing=0.0):
    B = batch["B"]
    logps = batch["token_logps"].sum(1)
    lengths = batch["completion_mask"].sum(1).to(torch.float64)
    return dpo_loss(logps[:B], logps[B:], batch["ref_chosen"], batch["ref_rejected"], beta=beta,
                    loss_type=loss_type, label_smoothing=label_smoothing,
                    chosen_lengths=lengths[:B], rejected_lengths=lengths[B:])


def _check_metrics(trl_metrics, chosen_r, rejected_r):
    ours = {"rewards/chosen": chosen_r.mean().item(), "rewards/rejected": rejected_r.mean().item(),
            "rewards/accuracies": (chosen_r > rejected_r).double().mean().item(),
            "rewards/margins": (chosen_r - rejected_r).mean().item()}
    for k in METRICS:
        assert trl_metrics[k] == pytest.approx(ours[k], abs=1e-6), k


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0),
                                           ("robust", 0.0), ("robust", 0.1), ("robust", 0.3)])
@pytest.mark.parametrize("seed,beta", [(0, 0.1), (1, 0.5), (2, 2.0)])
def test_trl_parity(accelerator, loss_type, eps, seed, beta):
    batch = _random_batch(seed)
    trl_loss, trl_metrics = _trl_loss(accelerator, batch, [loss_type], [1.0], beta, eps)
    losses, chosen_r, rejected_r = _ours(batch, loss_type, beta, eps)
    assert trl_loss.item() == pytest.approx(losses.mean().item(), abs=1e-6)
    _check_metrics(trl_metrics, chosen_r, rejected_r)


def test_trl_sigmoid_ignores_label_smoothing(accelerator):
    # TRL 1.16 `sigmoid` is plain DPO whatever label_smoothing is; ours is cDPO for ε > 0 and equals TRL at ε = 0.
    batch = _random_batch(3)
    trl_loss, _ = _trl_loss(accelerator, batch, ["sigmoid"], [1.0], 0.1, label_smoothing=0.2)
    plain, _, _ = _ours(batch, "sigmoid", 0.1, 0.0)
    cdpo, _, _ = _ours(batch, "sigmoid", 0.1, 0.2)
    assert trl_loss.item() == pytest.approx(plain.mean().item(), abs=1e-6)
    assert abs(trl_loss.item() - cdpo.mean().item()) > 1e-4


@pytest.mark.parametrize("seed", [0, 4])
def test_trl_parity_sft_and_rpo(accelerator, seed):
    batch = _random_batch(seed)
    B = batch["B"]
    nll = sft_nll(batch["token_logps"][:B], batch["shift_mask"][:B])
    trl_sft, _ = _trl_loss(accelerator, batch, ["sft"], [1.0], 0.1)
    assert trl_sft.item() == pytest.approx(nll.item(), abs=1e-6)
    # RPO: sigmoid + α·NLL
    alpha = 0.7
    trl_rpo, trl_metrics = _trl_loss(accelerator, batch, ["sigmoid", "sft"], [1.0, alpha], 0.1)
    losses, chosen_r, rejected_r = _ours(batch, "sigmoid", 0.1)
    assert trl_rpo.item() == pytest.approx(losses.mean().item() + alpha * nll.item(), abs=1e-6)
    _check_metrics(trl_metrics, chosen_r, rejected_r)


def test_harness_sums_match_random_logps():
    # the fake model's per-token log-probs sum to the sequence log-probs fed to ours (sanity of the harness)
    batch = _random_batch(0)
    assert torch.all(batch["token_logps"][batch["shift_mask"] == 0] == 0)
    assert torch.all(batch["token_logps"].sum(1) < 0)
    # position 0 is never a completion token, so TRL's unshifted ipo lengths equal the shifted-mask counts
    assert batch["completion_mask"][:, 0].sum() == 0
    assert torch.equal(batch["completion_mask"].sum(1), batch["shift_mask"].sum(1))
