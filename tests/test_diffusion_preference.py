"""Pair methods on tiny SD1.5- and SDXL-format pipelines: every objective trains and exports; the pair-level
invariants (shared t/noise, shared caption dropout and flip, rolled CCA captions, real SDXL sizes, batched InPO
inversion) hold; training never runs the encoders on cached data; resume restores the reference."""
import json

import pytest
import torch
import yaml
from PIL import Image

from mmalign.core.config import load_experiment
from mmalign.core.trainer import train
from mmalign.datasets.pairs import write_pairs_jsonl
from mmalign.datasets.shapeworld import render_scene, sample_scenes
from mmalign.core.registry import PAIR_METHOD_NAMES, method_class
from mmalign.diffusion.objectives import DiffusionDPO, EpsModel, InPO
from mmalign.diffusion.inversion import ddim_invert, inversion_grid
from mmalign.diffusion.preference import PreferenceConfig

METHODS = sorted(PAIR_METHOD_NAMES)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """16 pairs: the caption's own render wins against another scene's render; sizes vary (SDXL time_ids)."""
    out = tmp_path_factory.mktemp("pairs")
    scenes = sample_scenes(5, 17)
    rows = []
    for i in range(16):
        w = render_scene(scenes[i], 32).resize((32 + 8 * (i % 3), 32))
        rows.append((scenes[i].caption, w, render_scene(scenes[i + 1], 32), {"i": i}))
    write_pairs_jsonl(out, rows)
    return out


def run(tmp_path, pipe, data_path, method, steps=2, name="run", **sections):
    cfg = {"method": method, "output_dir": str(tmp_path / name),
           "train": {"lr": 1e-3, "max_steps": steps, "batch_size": 4, "log_every": 1, "seed": 0, "save_every": 2},
           "model": {"pretrained": str(pipe)},
           "data": {"path": str(data_path), "cache_dir": str(tmp_path / "cache")},
           "objective": {"inversion_steps": 3, "inversion_grid_steps": 4}}
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    exp = load_experiment(str(path), [], PreferenceConfig)
    method_obj = method_class(method)(exp.args, exp.output_dir)
    return train(exp, method_obj), method_obj


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_sd15_and_exports(tmp_path, tiny_sd_dir, pairs_dir, method):
    from diffusers import StableDiffusionPipeline
    summary, m = run(tmp_path, tiny_sd_dir, pairs_dir, method)
    assert summary["step"] == 2 and all(map(lambda v: v == v, summary["metrics"].values()))  # finite, no NaN
    base = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir)).unet.state_dict()
    new = StableDiffusionPipeline.from_pretrained(str(tmp_path / "run/final")).unet.state_dict()
    assert any(not torch.equal(base[k], new[k]) for k in base), "training left the exported UNet unchanged"


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_sdxl_lora_and_exports(tmp_path, tiny_sdxl_dir, pairs_dir, method):
    from diffusers import StableDiffusionXLPipeline
    run(tmp_path, tiny_sdxl_dir, pairs_dir, method, model={"lora_rank": 4, "lora_alpha": 8,
                                                             "reference": "adapters_off"})
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir))
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    kw = {"encoder_hidden_states": torch.randn(1, 6, pipe.unet.config.cross_attention_dim),
          "added_cond_kwargs": {"text_embeds": torch.randn(1, pipe.text_encoder_2.config.projection_dim),
                                "time_ids": torch.tensor([[32., 40, 0, 4, 32, 32]])}}
    before = pipe.unet(x, t, **kw).sample
    pipe.load_lora_weights(str(tmp_path / "run/final"))
    assert not torch.allclose(before, pipe.unet(x, t, **kw).sample), "the LoRA export had no effect"


def test_cache_hit_and_training_never_encodes(tmp_path, tiny_sd_dir, pairs_dir, monkeypatch, capsys):
    run(tmp_path, tiny_sd_dir, pairs_dir, "diffusion_dpo", name="first")
    assert "miss" in capsys.readouterr().out
    from mmalign.diffusion import preference
    real_build = preference.DiffusionPreference.build

    def build_and_block_encoders(self, device):
        policy = real_build(self, device)
        for enc in (self.parts.vae, self.parts.text_encoder):
            monkeypatch.setattr(enc, "forward", lambda *a, **k: pytest.fail("an encoder ran during training"))
        monkeypatch.setattr(self.parts.vae, "encode", lambda *a, **k: pytest.fail("the VAE encoded"))
        return policy

    monkeypatch.setattr(preference.DiffusionPreference, "build", build_and_block_encoders)
    summary, _ = run(tmp_path, tiny_sd_dir, pairs_dir, "diffusion_dpo", name="second")
    assert "hit" in capsys.readouterr().out and summary["step"] == 2
    assert json.loads((tmp_path / "second/data_report.json").read_text())["kept"] == 16


def _method(tmp_path, pipe, data_path, cls, **sections):
    cfg = {"model": {"pretrained": str(pipe)}, "data": {"path": str(data_path), "cache_dir": ""}}
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    from mmalign.core.config import from_dict
    m = cls(from_dict(PreferenceConfig, cfg, "test"), str(tmp_path / "m"))
    policy = m.build(torch.device("cpu"))
    m.dataset()
    return m, policy


def test_dpo_identical_pair_gives_log2(tmp_path, tiny_sd_dir):
    """Winner == loser: with one shared t and noise per pair both errors are equal, so the loss is exactly
    log 2 whatever the policy — a per-image t or noise would break this."""
    out = tmp_path / "same"
    im = render_scene(sample_scenes(1, 1)[0], 32)
    write_pairs_jsonl(out, [("a red circle", im, im, {})] * 4)
    m, policy = _method(tmp_path, tiny_sd_dir, out, DiffusionDPO)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))  # policy != reference
    batch = m.collate([m.data[i] for i in range(4)])
    batch["std_w"] = batch["std_l"] = torch.zeros_like(batch["std_w"])  # same latent sample for both
    loss, metrics = m.loss(policy, batch)
    assert torch.isclose(loss, torch.log(torch.tensor(2.0)), atol=1e-6), loss
    assert metrics["model_err"] != metrics["ref_err"]


def test_caption_dropout_and_flip_shared_by_pair(tmp_path, tiny_sd_dir, pairs_dir):
    m, _ = _method(tmp_path, tiny_sd_dir, pairs_dir, DiffusionDPO,
                   data={"caption_dropout": 0.5, "random_flip": True})
    batch = m.collate([m.data[i] for i in range(16)])
    assert batch["mean_w"].shape[1] == 2  # both orientations cached
    torch.manual_seed(0)
    _, _, view = m.pair_latents(batch)
    cond_w, cond_l = m.pair_cond(batch, view)
    assert torch.equal(cond_w["ctx"], cond_l["ctx"])
    dropped = (cond_w["ctx"] == m.empty["ctx"]).flatten(1).all(1)
    assert 0 < dropped.sum() < 16
    assert set(view.tolist()) == {0, 1}
    from mmalign.diffusion.pipeline import preprocess
    im = Image.open(pairs_dir / "images/000000_0.png").convert("RGB")
    with torch.no_grad():  # view 1 of the cache is the VAE posterior of the flipped image
        want = m.parts.vae.encode(preprocess(im, 32, flip=True)[0][None]).latent_dist.mean[0]
    assert torch.allclose(m.data[0]["mean_w"][1], want, atol=1e-5)
    assert not torch.allclose(m.data[0]["mean_w"][0], want, atol=1e-2)


def test_sdxl_time_ids_use_real_sizes(tmp_path, tiny_sdxl_dir, pairs_dir):
    m, _ = _method(tmp_path, tiny_sdxl_dir, pairs_dir, DiffusionDPO)
    batch = m.collate([m.data[i] for i in range(3)])
    cond_w, cond_l = m.pair_cond(batch, torch.zeros(3, dtype=torch.long))
    # winners were saved at widths 32, 40, 48 (height 32); resized to height 32, centre-cropped to 32
    assert cond_w["time_ids"][:, :2].tolist() == [[32, 32], [32, 40], [32, 48]]
    assert cond_w["time_ids"][:, 3].tolist() == [0, 4, 8] and cond_l["time_ids"][:, 3].tolist() == [0, 0, 0]
    assert cond_w["time_ids"][:, 4:].tolist() == [[32, 32]] * 3


def test_inpo_batched_inversion_equals_each_pair_alone(tmp_path, tiny_sd_dir, pairs_dir):
    m, policy = _method(tmp_path, tiny_sd_dir, pairs_dir, InPO)
    batch = m.collate([m.data[i] for i in range(4)])
    x0, _, view = m.pair_latents(batch)
    cond, _ = m.pair_cond(batch, view)
    t = torch.tensor([950, 120, 480, 7])
    grid = inversion_grid(1000, 10)
    noise = torch.randn(4, len(grid) + 1, *x0.shape[1:])
    eps = EpsModel(policy, cond, "epsilon", m.abar)
    with torch.no_grad():
        together = ddim_invert(eps, x0, t, m.abar, grid, 0.1, noise, rows_aware=True)
        for i in range(4):
            alone = EpsModel(policy, {k: v[i:i + 1] for k, v in cond.items()}, "epsilon", m.abar)
            one = ddim_invert(alone, x0[i:i + 1], t[i:i + 1], m.abar, grid, 0.1, noise[i:i + 1], rows_aware=True)
            assert torch.allclose(together[i:i + 1], one, atol=1e-5), i


def test_resume_restores_reference(tmp_path, tiny_sd_dir, pairs_dir):
    """2 steps + resume 2 steps ends where 4 straight steps end: the frozen reference is the base again."""
    straight, _ = run(tmp_path, tiny_sd_dir, pairs_dir, "diffusion_dpo", steps=4, name="straight")
    run(tmp_path, tiny_sd_dir, pairs_dir, "diffusion_dpo", steps=2, name="split")
    resumed, _ = run(tmp_path, tiny_sd_dir, pairs_dir, "diffusion_dpo", steps=4, name="split")
    assert resumed["step"] == 4
    for k in ("loss", "margin"):
        assert resumed["metrics"][k] == pytest.approx(straight["metrics"][k], rel=1e-4), k


def test_config_errors(tmp_path, tiny_sd_dir, pairs_dir):
    from mmalign.core.config import ConfigError
    with pytest.raises(ConfigError, match="adapters_off needs LoRA"):
        _method(tmp_path, tiny_sd_dir, pairs_dir, DiffusionDPO, model={"reference": "adapters_off"})
    with pytest.raises(ConfigError, match="model.reference"):
        _method(tmp_path, tiny_sd_dir, pairs_dir, DiffusionDPO, model={"reference": "none"})
    with pytest.raises(ConfigError, match="flow_error: 'epsilon' is for flow"):  # not silently ignored on a UNet
        _method(tmp_path, tiny_sd_dir, pairs_dir, DiffusionDPO, objective={"flow_error": "epsilon"})


def test_inversion_dpo_cache_and_points_train_and_reuse_trajectories(tmp_path, tiny_sd_dir, pairs_dir):
    from mmalign.core.config import ConfigError
    from mmalign.diffusion.objectives import InversionDPO
    knobs = {"inversion_steps": 6, "inversion_points": 2, "inversion_cache_mb": 16}
    m, policy = _method(tmp_path, tiny_sd_dir, pairs_dir, InversionDPO, objective=knobs)
    batch = m.collate([m.data[i] for i in range(4)])
    batch["row_seed"] = torch.arange(4)
    first, _ = m.loss(policy, batch)
    assert (m.trajectories.hits, m.trajectories.misses) == (0, 8)  # 4 winners + 4 losers inverted
    batch["row_seed"] = torch.arange(4) + 100  # another epoch: other draws, the same posterior means
    again, metrics = m.loss(policy, batch)
    assert (m.trajectories.hits, m.trajectories.misses) == (8, 8) and metrics["traj_cache_hit_rate"] == 0.5
    assert torch.isfinite(first) and torch.isfinite(again)
    # through the trainer: 16 pairs in batches of 4, so steps 5-6 see the first epoch's images again
    summary, _ = run(tmp_path, tiny_sd_dir, pairs_dir, "diffusion_inversion_dpo", steps=6, name="cached",
                     objective=knobs)
    assert summary["step"] == 6 and summary["metrics"]["traj_cache_hit_rate"] == pytest.approx(16 / 48)
    with pytest.raises(ConfigError, match="inversion_points"):
        _method(tmp_path, tiny_sd_dir, pairs_dir, InversionDPO, objective={"inversion_steps": 3, "inversion_points": 4})
