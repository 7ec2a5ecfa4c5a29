"""diffusion.pipeline.reparameterize: a pipeline switched to v-prediction with a zero-terminal-SNR schedule, saved and
loaded through the methods' own loading path."""
import pytest
import torch
from diffusers import StableDiffusionPipeline

from mmalign.diffusion.pipeline import diffusion_target, load_sd_components, reparameterize
from mmalign.diffusion.rollout import eps_x0


@pytest.fixture()
def pipe(tiny_sd_dir):
    return StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None)


def test_v_prediction_with_zero_terminal_snr_survives_save_and_load(pipe, tmp_path):
    before = pipe.scheduler.alphas_cumprod.clone()
    assert before[-1] > 1e-3  # SD's schedule: the last step still shows the image
    reparameterize(pipe, "v_prediction", zero_terminal_snr=True)
    sched = pipe.scheduler
    assert sched.config.prediction_type == "v_prediction" and sched.config.timestep_spacing == "trailing"
    assert sched.alphas_cumprod[-1].item() == 0.0  # the betas were recomputed, not only relabelled
    assert torch.all(sched.alphas_cumprod[:-1] > 0) and torch.all(sched.alphas_cumprod.diff() < 0)
    sched.set_timesteps(10)
    assert sched.timesteps[0].item() == 999  # sampling starts from pure noise

    pipe.save_pretrained(tmp_path / "v")
    parts = load_sd_components(str(tmp_path / "v"))
    noise_sched = parts.noise_scheduler
    assert noise_sched.config.prediction_type == "v_prediction"
    assert noise_sched.alphas_cumprod[-1].item() == 0.0
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    last = torch.tensor([999, 999])
    assert torch.equal(noise_sched.add_noise(x0, eps, last), eps)  # x_T is the noise alone
    torch.testing.assert_close(diffusion_target(noise_sched, x0, eps, last), -x0)  # v_T = -x0
    # the sampler's reading of a perfect v prediction at t = T recovers x0 and eps exactly
    e_hat, x0_hat = eps_x0(-x0, eps, noise_sched.alphas_cumprod[999], "v_prediction")
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(e_hat, eps)


def test_v_prediction_alone_keeps_the_schedule(pipe):
    before = pipe.scheduler.alphas_cumprod.clone()
    spacing = pipe.scheduler.config.timestep_spacing
    reparameterize(pipe, "v_prediction")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert torch.equal(pipe.scheduler.alphas_cumprod, before)
    assert pipe.scheduler.config.timestep_spacing == spacing


def test_bad_requests_are_refused(pipe):
    with pytest.raises(ValueError, match="v_prediction"):
        reparameterize(pipe, "epsilon", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="v_prediction"):
        reparameterize(pipe, zero_terminal_snr=True)  # the pipeline's own epsilon
    with pytest.raises(ValueError, match="sample"):
        reparameterize(pipe, "sample")
    assert pipe.scheduler.config.prediction_type == "epsilon"  # nothing changed on a refusal
