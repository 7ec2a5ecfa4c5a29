"""scripts/train_shapeworld_flow.py: a few steps on a tiny architecture give a StableDiffusion3Pipeline directory
that loads, samples 32 px images and has a scored evaluation line; the rectified-flow loss goes down on a fixed
batch (transformer and text encoders trained jointly)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = {"clip": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "projection_dim": 16},
        "t5": {"d_model": 32, "d_kv": 8, "d_ff": 32, "num_heads": 2},
        "transformer": {"num_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
                        "caption_projection_dim": 16, "pooled_projection_dim": 32}}


def load_script():
    spec = importlib.util.spec_from_file_location("train_shapeworld_flow", ROOT / "scripts/train_shapeworld_flow.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flow_script_saves_a_loadable_scored_sd3_pipeline(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from mmalign.datasets.shapeworld import sample_scenes
    from mmalign.diffusion.load_for_sampling import load_for_sampling
    from mmalign.diffusion.sampling import sample_images, score_samples

    script = load_script()
    out = script.main(["--out", str(tmp_path / "sd3"), "--arch-overrides", json.dumps(TINY), "--train-images", "32",
                       "--steps", "3", "--batch", "4", "--eval-every", "3", "--eval-prompts", "2", "--eval-steps", "2",
                       "--log-every", "1", "--warmup", "1", "--threads", "1"])
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["phase"] == "train"] == [1, 2, 3]
    evals = [r for r in rows if r["phase"] == "eval"]
    assert len(evals) == 1 and evals[0]["n"] == 2
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    assert pipe.vae.config.shift_factor == 0.0 and pipe.transformer.config.in_channels == 4
    assert pipe.scheduler.config.shift == 1.0
    prompts = [s.caption for s in sample_scenes(5, 2, split="validation")]
    images = sample_images(pipe, prompts, [0, 1], steps=2, guidance=4.0)
    assert [im.size for im in images] == [(32, 32)] * 2
    assert set(evals[0]["validation"]) == set(score_samples(images, prompts)["summary"])
    assert type(load_for_sampling(str(out))).__name__ == "StableDiffusion3Pipeline"


def test_no_t5_and_clip_l_from_the_sd_base(tmp_path):
    """--no-t5 leaves text_encoder_3 out (the pipeline puts zeros in its place, at the T5 length it samples with);
    --clip-init starts CLIP-L from the SD base's trained text encoder, whose weights and tokenizer it keeps."""
    from transformers import CLIPTextModel

    from mmalign.datasets.shapeworld import sample_scenes
    from mmalign.diffusion.load_for_sampling import load_pipeline
    from mmalign.diffusion.sampling import sample_images

    script = load_script()
    clip_dir = ROOT / "mmalign/assets/shapeworld_sd/text_encoder"
    sd_text = CLIPTextModel.from_pretrained(str(clip_dir))
    width = sd_text.config.hidden_size + TINY["clip"]["hidden_size"]
    arch = json.loads(json.dumps(TINY))
    arch["transformer"].update(joint_attention_dim=width,
                               pooled_projection_dim=sd_text.config.projection_dim + TINY["clip"]["projection_dim"])
    pipe = script.build(script.merged(script.ARCH, arch), ROOT / "mmalign/assets/shapeworld_sd/vae", seed=0,
                        with_t5=False, clip_init=clip_dir)
    assert pipe.text_encoder_3 is None and set(script.trained_modules(pipe)) == {
        "transformer", "text_encoder", "text_encoder_2"}
    ours, theirs = pipe.text_encoder.state_dict(), sd_text.state_dict()
    assert len(theirs) > 10 and all(torch.equal(ours["text_model." + k], v) for k, v in theirs.items())
    enc = script.encode(pipe, ["a red circle", "two blue squares"])
    clip_len = pipe.tokenizer.model_max_length
    assert enc["ctx"].shape == (2, clip_len + script.MAX_SEQUENCE_LENGTH["sd3"], width)
    assert enc["pooled"].shape == (2, arch["transformer"]["pooled_projection_dim"])
    assert torch.all(enc["ctx"][:, clip_len:] == 0) and enc["ctx"][:, :clip_len].abs().sum() > 0  # T5 slots: zeros
    out = script.main(["--out", str(tmp_path / "sd3"), "--arch-overrides", json.dumps(arch), "--train-images", "16",
                       "--steps", "5", "--stop-after", "2", "--batch", "4", "--eval-every", "10", "--eval-prompts", "2",
                       "--eval-steps", "2", "--warmup", "1", "--threads", "1", "--log-every", "1", "--no-t5",
                       "--clip-init", str(clip_dir), "--latents", "mean", "--logit-mean", "1.0"])
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [(r["phase"], r.get("step")) for r in rows] == [("setup", None), ("train", 1), ("train", 2), ("eval", 2)]
    assert abs(rows[0]["latent_std"] - 1.0) < 1e-3  # --latents mean: scaling_factor = 1 / std of the means
    sd_scale = script.AutoencoderKL.from_pretrained(str(ROOT / "mmalign/assets/shapeworld_sd/vae")).config
    sd_scale = sd_scale.scaling_factor
    assert abs(rows[0]["scaling_factor"] - sd_scale) > 0.1
    saved = load_pipeline(out)  # model_index.json: text_encoder_3 [null, null]
    assert saved.vae.config.scaling_factor == rows[0]["scaling_factor"]
    assert type(saved).__name__ == "StableDiffusion3Pipeline" and saved.text_encoder_3 is None
    assert saved.text_encoder.config.hidden_size == sd_text.config.hidden_size
    prompts = [s.caption for s in sample_scenes(5, 2, split="validation")]
    assert [im.size for im in sample_images(saved, prompts, [0, 1], steps=2, guidance=4.0)] == [(32, 32)] * 2
    bad = script.CLIPTextModelWithProjection(script.CLIPTextModelWithProjection.config_class(
        vocab_size=7, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        projection_dim=16, max_position_embeddings=16))
    bad.save_pretrained(tmp_path / "bad" / "text_encoder")
    pipe.tokenizer.save_pretrained(tmp_path / "bad" / "tokenizer")
    with pytest.raises(ValueError, match="vocabulary 7"):
        script.build(script.merged(script.ARCH, arch), ROOT / "mmalign/assets/shapeworld_sd/vae", seed=0,
                     with_t5=False, clip_init=tmp_path / "bad" / "text_encoder")


def test_flow_loss_decreases_on_a_fixed_batch():
    from mmalign.datasets.shapeworld import render_scene, sample_scenes

    script = load_script()
    torch.manual_seed(0)
    pipe = script.build(script.merged(script.ARCH, TINY), ROOT / "mmalign/assets/shapeworld_sd/vae", seed=0)
    vae = pipe.vae.eval().requires_grad_(False)
    scenes = sample_scenes(1, 8, split="train")
    mean, _ = script.cache_latents(vae, script.to_pixels([render_scene(s, 32) for s in scenes]))
    x0 = (mean - vae.config.shift_factor) * vae.config.scaling_factor
    captions = [s.caption for s in scenes]
    modules = script.trained_modules(pipe)
    assert set(modules) == {"transformer", "text_encoder", "text_encoder_2", "text_encoder_3"}
    params = [p for m in modules.values() for p in m.train().parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3)

    def fixed_loss():  # same noise and s every time
        with torch.no_grad():
            return script.flow_loss(pipe, x0, captions, torch.Generator().manual_seed(123)).item()

    before = fixed_loss()
    text_before = [p.detach().clone() for p in pipe.text_encoder.parameters()]
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        loss = script.flow_loss(pipe, x0, captions, g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert any(not torch.equal(p, q) for p, q in zip(pipe.text_encoder.parameters(), text_before))
    after = fixed_loss()
    assert after < 0.8 * before, (before, after)


def test_shipped_flow_base_loads_and_samples_deterministically():
    from mmalign.assets import SHAPEWORLD_SD3
    from mmalign.datasets.shapeworld import sample_scenes
    from mmalign.diffusion.load_for_sampling import load_for_sampling
    from mmalign.diffusion.sampling import sample_images

    pipe = load_for_sampling(str(SHAPEWORLD_SD3))
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert pipe.scheduler.config.shift == 1.0 and pipe.vae.config.shift_factor == 0.0
    assert pipe.text_encoder_3 is None  # built with --no-t5 (model_index.json: null)
    assert (SHAPEWORLD_SD3 / "train_log_stage1.jsonl").is_file()
    assert (SHAPEWORLD_SD3 / "README.md").is_file() and (SHAPEWORLD_SD3 / "train_log.jsonl").is_file()
    prompts = [s.caption for s in sample_scenes(3, 2, split="validation")]
    a = sample_images(pipe, prompts, [0, 1], steps=2, guidance=4.0)
    b = sample_images(pipe, prompts, [0, 1], steps=2, guidance=4.0)
    assert [im.size for im in a] == [(32, 32)] * 2
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]
    assert a[0].tobytes() != a[1].tobytes()


def test_gaussian_baseline_is_the_least_squares_predictor():
    """benchmarks/flow_base_diagnostics.py's baseline equals a per-element linear regression of v on x_s."""
    spec = importlib.util.spec_from_file_location("flow_diag", ROOT / "benchmarks/flow_base_diagnostics.py")
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)
    g = torch.Generator().manual_seed(0)
    n, s = 200_000, 0.3
    x0 = torch.tensor([0.5, -1.0, 0.0]) + torch.tensor([0.3, 1.5, 0.8]) * torch.randn(n, 3, generator=g)
    eps = torch.randn(n, 3, generator=g)
    x_s, v = (1 - s) * x0 + s * eps, eps - x0
    pred = diag.gaussian_baseline(x0, x_s, s)
    for j in range(3):  # least squares v = c0 + c1 x_s, element by element
        design = torch.stack([torch.ones(n), x_s[:, j]], 1).double()
        coef = torch.linalg.lstsq(design, v[:, j:j + 1].double()).solution.squeeze()
        fit = (design @ coef).float()
        assert torch.allclose(pred[:, j], fit, atol=2e-2)
        assert ((pred[:, j] - v[:, j]) ** 2).mean() <= ((fit - v[:, j]) ** 2).mean() * 1.001
