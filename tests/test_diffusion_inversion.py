"""DDIM inversion (batched, per-sample t_end) and the Inversion-DPO objective, on a tiny real UNet."""
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

from mmalign.diffusion.inversion import (Trajectory, ddim_invert, ddim_sample, ddim_step, eps_from_prediction,
                                         inversion_grid, inversion_trajectory)
from mmalign.diffusion.inversion_dpo import inversion_dpo_loss, inversion_weights

from conftest import tiny_arch

SCHED = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
AC = SCHED.alphas_cumprod


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run faster on one thread


@pytest.fixture(scope="module")
def unet_fn():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**dict(tiny_arch()["unet"], sample_size=8)).eval()
    ctx = torch.randn(1, 4, 32)

    def eps_fn(x, t):
        return unet(x, t, encoder_hidden_states=ctx.expand(len(x), -1, -1)).sample
    return unet, eps_fn


def test_grid_step_identity_and_v_prediction():
    assert inversion_grid(1000, 10) == list(range(1, 1000, 100)) and inversion_grid(1000, 40)[-1] == 976
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64), torch.randn(3, 4, 2, 2, generator=g,
                                                                                   dtype=torch.float64)
    a, b = AC[[5, 300, 900]].double(), AC[[700, 20, 901]].double()
    assert torch.allclose(ddim_step(ddim_step(x, eps, a, b), eps, b, a), x, atol=1e-12, rtol=0)
    # to abar = 1 gives x0_hat; and back from x0 with the true eps is the forward marginal
    x0 = ddim_step(x, eps, a, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(ddim_step(x0, eps, torch.ones(3), a), x, atol=1e-12)
    x0, eps, t = x.float(), eps.float(), torch.tensor([1, 500, 999])
    v, x_t = SCHED.get_velocity(x0, eps, t), SCHED.add_noise(x0, eps, t)
    assert torch.allclose(eps_from_prediction("v_prediction", v, x_t, t, AC), eps, atol=1e-5)
    assert eps_from_prediction("epsilon", v, x_t, t, AC) is v
    with pytest.raises(ValueError, match="prediction_type"):
        eps_from_prediction("sample", v, x_t, t, AC)


def test_round_trip_reconstructs_x0(unet_fn):
    _, eps_fn = unet_fn
    x0, t_end = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([300, 600])
    errs = {}
    for n in (10, 50):
        grid = inversion_grid(1000, n)
        rec = ddim_sample(eps_fn, ddim_invert(eps_fn, x0, t_end, AC, grid), t_end, AC, grid)
        errs[n] = (rec - x0).pow(2).mean().sqrt().item()
    # measured on this tiny random UNet: rms 0.091 (10 steps), 0.019 (50 steps), |x0| ~ 1
    assert errs[50] < 0.03 and errs[50] < errs[10] / 3, f"round-trip rms error {errs}"


def test_batched_inversion_equals_per_sample_and_catches_the_t0_bug(unet_fn):
    _, eps_fn = unet_fn
    calls = []

    def spy(x, t):
        calls.append(t.clone())
        return eps_fn(x, t)
    g = torch.Generator().manual_seed(2)
    grid, t_end = inversion_grid(1000, 10), torch.tensor([250, 901, 37, 999, 1])
    x0 = torch.randn(5, 4, 8, 8, generator=g)
    noise = torch.randn(5, len(grid) + 1, 4, 8, 8, generator=g)
    batched = ddim_invert(spy, x0, t_end, AC, grid, noise_scale=0.1, noise=noise)
    # one call per level, only on the samples that still move, each at its own current t
    assert [len(t) for t in calls] == [5, 4, 3, 3, 2, 2, 2, 2, 2, 2, 1]
    assert all((t == t[0]).all() for t in calls) and [t[0].item() for t in calls] == [0] + grid
    for i in range(5):
        alone = ddim_invert(eps_fn, x0[i:i + 1], t_end[i:i + 1], AC, grid, noise_scale=0.1, noise=noise[i:i + 1])
        assert torch.allclose(batched[i:i + 1], alone, atol=1e-5), f"sample {i}"
    # the public InPO code drives the whole batch with t[0]: sample 1 would stop at 250 instead of 901
    bug = ddim_invert(eps_fn, x0[:2], t_end[:1].expand(2), AC, grid)
    ours = ddim_invert(eps_fn, x0[:2], t_end[:2], AC, grid)
    alone1 = ddim_invert(eps_fn, x0[1:2], t_end[1:2], AC, grid)
    assert torch.allclose(ours[1], alone1[0], atol=1e-5) and (ours[1] - bug[1]).abs().max() > 0.5
    assert torch.allclose(ours[0], bug[0], atol=1e-5)
    with pytest.raises(ValueError, match="pre-drawn noise"):
        ddim_invert(eps_fn, x0, t_end, AC, grid, noise_scale=0.1)


def test_inversion_trajectory(unet_fn):
    unet, eps_fn = unet_fn
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    traj = inversion_trajectory(eps_fn, x0, AC, n_steps=8)
    assert traj.xs.shape == traj.eps_ref.shape == (8, 2, 4, 8, 8) and traj.ts.tolist() == inversion_grid(1000, 8)
    assert (traj.ts.diff() > 0).all() and not traj.xs.requires_grad and not traj.eps_ref.requires_grad
    with torch.no_grad():
        for i in range(8):
            assert torch.allclose(traj.eps_ref[i], eps_fn(traj.xs[i], traj.ts[i].expand(2)), atol=1e-5)
            if i < 7:
                step = ddim_step(traj.xs[i], traj.eps_ref[i], AC[traj.ts[i]], AC[traj.ts[i + 1]])
                assert torch.allclose(traj.xs[i + 1], step, atol=1e-5)
    last = ddim_invert(eps_fn, x0, traj.ts[-1].expand(2), AC, traj.ts.tolist())
    assert torch.allclose(traj.xs[-1], last, atol=1e-5)


def test_inversion_dpo_by_hand():
    # N = 2 steps with abar 0.64, 0.36 -> w = 1/(2 abar) in ratio 0.36 : 0.64 -> mean-1 weights 0.72, 1.28
    ac, ts = torch.tensor([0.64, 0.36]), torch.tensor([0, 1])
    assert torch.allclose(inversion_weights(ac, ts), torch.tensor([0.72, 1.28]))
    one = lambda *v: torch.tensor(v).view(-1, 1, 1, 1, 1)  # noqa: E731  [N, B=1, 1, 1, 1]
    tw = Trajectory(one(0.9, 1.1), ts, one(0.4, 0.7))
    tl = Trajectory(one(0.1, -0.5), ts, one(0.3, -0.6))
    x0w, x0l = torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), -0.2)
    theta = 0.5  # policy eps = theta * x
    loss, m = inversion_dpo_loss(lambda x, t: theta * x, tw, tl, x0w, x0l, ac, beta=10.0)
    # eps*: w (0.9-0.8*0.5)/0.6, (1.1-0.6*0.5)/0.8;  l (0.1+0.8*0.2)/0.6, (-0.5+0.6*0.2)/0.8
    sw, sl = [0.5 / 0.6, 1.0], [0.26 / 0.6, -0.475]
    d = lambda pred, star: (0.72 * (pred[0] - star[0]) ** 2 + 1.28 * (pred[1] - star[1]) ** 2) / 2  # noqa: E731
    dw, dl = d([0.45, 0.55], sw) - d([0.4, 0.7], sw), d([0.05, -0.25], sl) - d([0.3, -0.6], sl)
    inside = -5.0 * (dw - dl)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-inside)), rel=1e-5)
    assert m["reward_w"].item() == pytest.approx(-5.0 * dw, rel=1e-5) and m["implicit_acc"].item() == (inside > 0)


def test_inversion_dpo_matches_independent_formulation():
    """Bradley-Terry over rewards -beta/2 (D_theta - D_ref), D a weighted mean over steps of the error against
    eps* = (x_i - sqrt(abar) x0)/sqrt(1 - abar), written with einsum in float64; a linear toy policy."""
    g = torch.Generator().manual_seed(4)
    n, b, beta = 5, 3, 50.0
    ts = torch.tensor([1, 150, 400, 650, 900])
    tw, tl = (Trajectory(torch.randn(n, b, 2, 3, generator=g), ts, torch.randn(n, b, 2, 3, generator=g))
              for _ in range(2))
    x0w, x0l = torch.randn(b, 2, 3, generator=g), torch.randn(b, 2, 3, generator=g)
    lin = torch.nn.Linear(3, 3)
    loss, _ = inversion_dpo_loss(lambda x, t: lin(x), tw, tl, x0w, x0l, AC, beta=beta)
    a = AC[ts].double().view(n, 1, 1, 1)
    w = 1 / (2 * a.flatten())
    w = w / w.mean()

    def dist(traj, x0, pred):
        star = (traj.xs.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()
        return torch.einsum("n,nb->b", w, (pred.double() - star).pow(2).mean(dim=(2, 3))) / n
    r = [-beta / 2 * (dist(tr, x0, lin(tr.xs)) - dist(tr, x0, tr.eps_ref)) for tr, x0 in ((tw, x0w), (tl, x0l))]
    expected = -torch.log_softmax(torch.stack(r, dim=1), dim=1)[:, 0].mean()
    assert torch.allclose(loss.double(), expected, rtol=1e-5)


def test_first_step_gradient_from_lora_init_is_nonzero_but_zero_in_the_public_formulation():
    from peft import LoraConfig
    torch.manual_seed(5)
    unet = UNet2DConditionModel(**dict(tiny_arch()["unet"], sample_size=8)).eval().requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    ctx = torch.randn(1, 4, 32)
    eps_fn = lambda x, t: unet(x, t, encoder_hidden_states=ctx.expand(len(x), -1, -1)).sample  # noqa: E731
    lora_b = [p for name, p in unet.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.requires_grad and (p == 0).all() for p in lora_b)  # B = 0: policy == reference
    g = torch.Generator().manual_seed(6)
    x0w, x0l = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    unet.disable_adapters()
    tw, tl = (inversion_trajectory(eps_fn, x0, AC, n_steps=4) for x0 in (x0w, x0l))
    unet.enable_adapters()
    loss, _ = inversion_dpo_loss(eps_fn, tw, tl, x0w, x0l, AC)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-3)
    assert sum(p.grad.abs().sum().item() for p in lora_b) > 0, "our target eps* must move a LoRA from B = 0"
    unet.zero_grad(set_to_none=True)
    # public script: D = sum_i w_i err(eps_theta(x_i), eps_ref_i), quadratic in (eps_theta - eps_ref); eps_ref is
    # recomputed here in the same batch so that it is bit-identical to the policy's output at B = 0
    w = 1 / (2 * AC[tw.ts])
    d = 0
    for i, t in enumerate(tw.ts):
        x, tt = torch.cat([tw.xs[i], tl.xs[i]]), t.expand(2)
        unet.disable_adapters()
        with torch.no_grad():
            ref = eps_fn(x, tt)
        unet.enable_adapters()
        d = d + w[i] * (eps_fn(x, tt) - ref).pow(2).flatten(1).mean(1)
    public = -F.logsigmoid(5000.0 / 2 * (d[0] - d[1]))  # their sign: reward winners for moving away from ref
    public.backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in lora_b), "public formulation: exactly zero grad"


def _saved_bytes(fn):
    total = [0]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: total.__setitem__(0, total[0] + t.nbytes) or t,
                                                  lambda t: t):
        fn()
    return total[0]


def test_checkpointed_equals_plain_and_memory_does_not_grow_with_n(unet_fn):
    unet, eps_fn = unet_fn
    g = torch.Generator().manual_seed(7)
    x0w, x0l = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    tw8, tl8 = (inversion_trajectory(eps_fn, x0, AC, n_steps=8) for x0 in (x0w, x0l))
    policy = lambda x, t: eps_fn(x, t) * 1.01  # noqa: E731  a policy a little off the reference
    params = list(unet.parameters())
    grads, mem = {}, {}
    for ck in (True, False):
        loss, _ = inversion_dpo_loss(policy, tw8, tl8, x0w, x0l, AC, beta=500.0, checkpoint_steps=ck)
        grads[ck] = (loss.detach(), torch.autograd.grad(loss, params))
        for n in (2, 8):
            tw, tl = (Trajectory(t.xs[:n], t.ts[:n], t.eps_ref[:n]) for t in (tw8, tl8))
            mem[ck, n] = _saved_bytes(lambda: inversion_dpo_loss(policy, tw, tl, x0w, x0l, AC,
                                                                    checkpoint_steps=ck))
    assert torch.allclose(grads[True][0], grads[False][0], rtol=1e-6)
    for gc, gp in zip(grads[True][1], grads[False][1]):
        assert torch.allclose(gc, gp, rtol=1e-5, atol=1e-8)
    growth_ck, growth_plain = mem[True, 8] - mem[True, 2], mem[False, 8] - mem[False, 2]
    # measured: +49 KB (the steps' inputs) with checkpointing vs +29.7 MB of activations without, N 2 -> 8
    assert growth_plain > 50 * max(growth_ck, 1), f"saved bytes {mem}"
