"""core.stats.gradient_noise_scale: the noise scale of minibatch gradients, by hand and on synthetic gradients with
a known signal and covariance."""
import math

import pytest
import torch

from mmalign.core.stats import gradient_noise_scale


def test_by_hand_on_three_gradients():
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    out = gradient_noise_scale(g @ g.T, batch=4)
    # cross products: g1.g2 = 0, g1.g3 = 1, g2.g3 = 1 -> |G|^2 = 2/3; mean |g|^2 = (1 + 1 + 2)/3 = 4/3
    assert out["G2"] == pytest.approx(2 / 3)
    assert out["trS"] == pytest.approx(4 * (4 / 3 - 2 / 3))
    assert out["B_noise"] == pytest.approx(4.0)
    cosines = [0.0, 1 / math.sqrt(2), 1 / math.sqrt(2)]
    assert out["cos_pairs"] == pytest.approx(sum(cosines) / 3)


def test_recovers_a_known_noise_scale_and_reports_no_signal_as_infinite():
    gen = torch.Generator().manual_seed(0)
    dim, batch, m = 4000, 16, 200
    signal = torch.zeros(dim)
    signal[:10] = 1.0  # |G|^2 = 10
    per_sample_var = 0.5  # S = 0.5 I: tr(S) = 2000, B_noise = 200
    grads = signal + torch.randn(m, dim, generator=gen) * math.sqrt(per_sample_var / batch)
    out = gradient_noise_scale(grads @ grads.T, batch)
    assert out["G2"] == pytest.approx(10.0, rel=0.1)
    assert out["trS"] == pytest.approx(2000.0, rel=0.05)
    assert out["B_noise"] == pytest.approx(200.0, rel=0.15)
    noise_only = torch.randn(m, dim, generator=gen)
    flat = gradient_noise_scale(noise_only @ noise_only.T, batch)
    assert abs(flat["cos_pairs"]) < 0.01
    if flat["G2"] <= 0:
        assert flat["B_noise"] == math.inf
    else:
        assert flat["B_noise"] > 50 * 200  # a signal far below the noise


def test_bootstrap_rows_leave_out_self_pairs_and_zero_gradients():
    g = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    gram = g @ g.T
    out = gradient_noise_scale(gram, batch=1, idx=torch.tensor([0, 0, 2]))
    # rows 0, 0, 2: the cross pairs are (0, 2), four times -> g0.g2 = 2; the self pair g0.g0 = 4 stays out
    assert out["G2"] == pytest.approx(2.0)
    assert gradient_noise_scale(gram, batch=1)["cos_pairs"] == pytest.approx(1.0)  # the zero gradient is left out
    with pytest.raises(ValueError, match="two different"):
        gradient_noise_scale(gram, batch=1, idx=torch.tensor([1, 1]))
