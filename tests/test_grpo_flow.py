"""diffusion_grpo on rectified-flow pipelines (rollout_flow.py): the sigma grid is the pipelines' own, a rollout with
every step deterministic is the diffusers pipeline's Euler sampling on the same initial noise (SD3 with CFG, FLUX
without), noise -> 0 tends to it, recorded == recomputed log-probs at the start of an update, and two training
steps through the shared loop with a LoRA export that loads in StableDiffusion3Pipeline."""
import json
import math

import pytest
import torch

from mmalign.core.trainer import train
from mmalign.diffusion.flow import pack_latents
from mmalign.diffusion.grpo import DiffusionGRPO
from mmalign.diffusion.rollout import euler_step, flow_sde_step, vae_decoder
from mmalign.diffusion.rollout_flow import (FlowGrid, flow_grid, flow_step_log_prob, flow_step_stats,
                                            sample_flow_trajectories)
from mmalign.diffusion.tiny_flow import build_flux_pipeline, build_sd3_pipeline

from test_grpo import grpo_experiment

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = "a red circle\n\ntwo blue squares\na red circle\na green triangle\n"


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    return path


def experiment(tmp_path, pipe, prompt_file, name="run", **sections):
    """test_grpo's experiment with groups of 2 and no held-out reward (cheaper on the flow pipelines)."""
    sections = {**sections, "objective": {"group_size": 2, **sections.get("objective", {})},
                "reward": {"heldout": [], **sections.get("reward", {})}}
    return grpo_experiment(tmp_path, pipe, prompt_file, name, **sections)


def in_eval(pipe):
    """A freshly built pipeline's modules are in train mode (T5 dropout): eval, as from_pretrained leaves them."""
    for module in pipe.components.values():
        getattr(module, "eval", lambda: None)()
    return pipe


def transformer_predict(pipe):
    """The pipeline's transformer as a Predict, called as the pipeline calls it (t = σ·N; FLUX t/1000, packed)."""
    from mmalign.diffusion.pipeline import denoise
    return lambda x, t, cond: denoise(pipe.transformer, x, t, cond)


# --- the grid and the step ------------------------------------------------------------------------------------

def test_flow_grid_is_the_pipelines_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sd3 = flow_grid({"num_train_timesteps": 1000, "shift": 3.0}, 4, 64, "sd3")
    shift = lambda s: 3 * s / (1 + 2 * s)  # noqa: E731  SD3's shift 3
    s = torch.linspace(1, shift(0.001), 4)  # linspace(σ_max, σ_min) of the (shifted) training table, shifted again
    want = shift(s)
    assert torch.allclose(sd3.sigma, want, atol=1e-6) and sd3.sigma[0] == 1.0
    assert torch.allclose(sd3.sigma_next, torch.cat([want[1:], torch.zeros(1)]), atol=1e-6)
    assert torch.allclose(sd3.timesteps, want * 1000, atol=1e-3) and sd3.sigma_cap == pytest.approx(want[1].item())
    cfg = build_flux_pipeline().scheduler.config
    flux = flow_grid(cfg, 3, 64, "flux")
    mu = 0.5 + (1.15 - 0.5) * (64 - 256) / (4096 - 256)
    ref = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    ref.set_timesteps(sigmas=[1.0, 2 / 3, 1 / 3], mu=mu)
    assert torch.allclose(flux.sigma, ref.sigmas[:-1]) and torch.allclose(flux.timesteps, ref.timesteps)
    assert isinstance(flux, FlowGrid) and len(flux) == 3


def test_flow_step_stats_is_flow_sde_step_of_the_guided_velocity():
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    predict = lambda x, t, c: torch.tanh(x) * c["ctx"].view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) / 1000  # noqa
    cond, uncond = {"ctx": torch.tensor([1.0, 2.0, 3.0])}, {"ctx": torch.zeros(3)}
    t, sig, nxt = torch.full((3,), 1000.0), torch.ones(3), torch.full((3,), 0.8)
    v = (1 - 2.5) * predict(x, t, uncond) + 2.5 * predict(x, t, cond)  # u + g (c - u)
    mean, std = flow_step_stats(predict, x, t, sig, nxt, torch.full((3,), 0.9), torch.full((3,), 0.7), cond, uncond,
                                2.5)
    want = flow_sde_step(v, x, 1.0, 0.8, 0.7, noise=z, sigma_cap=0.9)
    assert torch.allclose(mean, want.mean, atol=1e-6) and torch.allclose(std, want.std)
    lp, _, _ = flow_step_log_prob(predict, x, want.sample, t, sig, nxt, torch.full((3,), 0.9),
                                  torch.full((3,), 0.7), cond, uncond, 2.5)
    assert torch.allclose(lp, want.log_prob, atol=1e-6)
    with pytest.raises(ValueError, match="noise level 0"):
        flow_step_log_prob(predict, x, x, t, sig, nxt, sig, torch.zeros(3), cond, None, 1.0)


# --- rollouts against the diffusers pipelines ------------------------------------------------------------------

@torch.no_grad()
def test_deterministic_rollout_is_the_sd3_pipeline_and_noise_to_zero_tends_to_it():
    pipe = in_eval(build_sd3_pipeline())
    prompts, g, steps = ["a red circle", "two blue squares"], 3.0, 3
    c, _, p, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=256)
    e, _, pe, _ = pipe.encode_prompt([""] * 2, None, None, do_classifier_free_guidance=False, max_sequence_length=256)
    cond, uncond = {"ctx": c, "pooled": p}, {"ctx": e, "pooled": pe}
    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    want = pipe(prompts, num_inference_steps=steps, guidance_scale=g, latents=x_T.clone(), output_type="pt").images
    grid = flow_grid(pipe.scheduler.config, steps, 64, "sd3")
    noise = torch.cat([x_T[:, None], torch.randn(2, steps, 4, 16, 16, generator=torch.Generator().manual_seed(2))], 1)
    run = lambda a: sample_flow_trajectories(transformer_predict(pipe), cond, uncond, noise, grid,  # noqa: E731
                                             torch.full((steps,), a), g, max_batch=1, decode=vae_decoder(pipe.vae))
    ode = run(0.0)
    assert (ode.log_probs == 0).all() and torch.allclose(ode.images, want, atol=1e-5)
    x = x_T  # the ODE by hand: Euler steps of the guided velocity
    for k in range(steps):
        both = {n: torch.cat([uncond[n], cond[n]]) for n in cond}
        v = transformer_predict(pipe)(torch.cat([x, x]), grid.timesteps[k].expand(4), both)
        u, cv = v.chunk(2)
        x = euler_step(u + g * (cv - u), x, grid.sigma[k], grid.sigma_next[k])
    assert torch.allclose(ode.latents[:, -1], x, atol=1e-5)
    errs = [(run(a).latents[:, -1] - x).abs().max().item() for a in (1e-1, 1e-3, 1e-5)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-3, errs
    assert (run(0.7).log_probs != 0).all()


@torch.no_grad()
def test_deterministic_rollout_is_the_flux_pipeline_cfg_free():
    pipe = in_eval(build_flux_pipeline())
    prompts, steps = ["a red circle", "two blue squares"], 2
    c, p, _ = pipe.encode_prompt(prompts, None, max_sequence_length=512)
    x_T = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    want = pipe(prompts, height=32, width=32, num_inference_steps=steps, latents=pack_latents(x_T),
                output_type="pt").images  # embedded guidance 3.5: flow.FLUX_TRAIN_GUIDANCE
    grid = flow_grid(pipe.scheduler.config, steps, 64, "flux")
    noise = torch.cat([x_T[:, None], torch.zeros(2, steps, 4, 16, 16)], 1)
    traj = sample_flow_trajectories(transformer_predict(pipe), {"ctx": c, "pooled": p}, None, noise, grid,
                                    torch.zeros(steps), 1.0, decode=vae_decoder(pipe.vae))
    assert torch.allclose(traj.images, want, atol=1e-5)


# --- the method ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pipe", ["tiny_sd3_dir", "tiny_flux_dir"])
def test_recorded_equals_recomputed_at_update_start(tmp_path, request, prompt_file, pipe):
    exp = experiment(tmp_path, request.getfixturevalue(pipe), prompt_file, data={"resolution": 32})
    m = DiffusionGRPO(exp.args, exp.output_dir)
    policy = m.build(torch.device("cpu"))
    with torch.no_grad():
        for q in policy.parameters():
            if q.requires_grad:
                q.add_(0.05 * torch.randn_like(q))  # LoRA on: policy != reference
    rows, report = m.dataset()
    assert report.kept == 3 and isinstance(m.grid, FlowGrid) and len(m.grid) == 4
    names = {n for n, _ in policy.unet.named_modules()}
    assert any(n.endswith("add_q_proj.lora_A") for n in names)  # the flow default targets
    batch = {**m.collate([rows[0], rows[2]]), "row_seed": torch.tensor([11, 12])}
    loss, metrics = m.loss(policy, batch)
    assert torch.isfinite(loss) and metrics["kl"] > 0 and len(m.buffer) == 1
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    lp, _, _, _ = m.recompute(policy, torch.arange(len(m.traj.latents)))
    assert torch.allclose(lp, m.traj.log_probs[:, m.steps], atol=1e-5)
    outside = torch.tensor([k for k in range(4) if k not in m.steps.tolist()])
    assert (m.traj.log_probs[:, outside] == 0).all() and (m.traj.log_probs[:, m.steps] != 0).all()
    assert m.traj.images.shape == (4, 3, 32, 32) and m.traj.etas[m.steps].eq(0.7).all()


def test_two_sd3_training_steps_cfg_free_and_lora_export_loads(tmp_path, tiny_sd3_dir, prompt_file):
    from diffusers import StableDiffusion3Pipeline

    exp = experiment(tmp_path, tiny_sd3_dir, prompt_file, objective={"cfg_free_training": True, "minibatches": 2,
                                                                "inner_epochs": 1, "flow_noise_level": 0.5})
    summary = train(exp, DiffusionGRPO(exp.args, exp.output_dir))
    assert summary["step"] == 2
    metrics = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    for key in ("loss", "kl", "clip_frac", "reward/test_grpo.red_reward_mean", "time/rollout_s"):
        assert all(math.isfinite(r[key]) for r in metrics), key
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir))
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500.0])
    cond = {"ctx": torch.randn(1, 20, 32), "pooled": torch.randn(1, 32)}
    call = lambda: pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond["ctx"],  # noqa: E731
                                    pooled_projections=cond["pooled"]).sample
    with torch.no_grad():
        before = call()
        pipe.load_lora_weights(str(tmp_path / "run/final"))
        assert not torch.allclose(before, call()), "the LoRA export had no effect"
