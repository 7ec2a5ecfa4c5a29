"""SD3- and FLUX-format (rectified-flow) pipelines through the SD code path: load round trip, the forward process by
hand, prompt encoding as the pipelines do it, pair methods trained by the real trainer, the DPO loss on velocity
errors by hand, LoRA / full exports loaded by diffusers, refusals, and `mmalign sample` of an SD3 export."""
import json
import math

import pytest
import torch
import yaml

from mmalign.core.config import ConfigError, from_dict, load_experiment
from mmalign.core.registry import method_class
from mmalign.core.row_rng import RowRandom
from mmalign.core.trainer import train
from mmalign.datasets.pairs import write_pairs_jsonl
from mmalign.datasets.shapeworld import render_scene, sample_scenes
from mmalign.diffusion.flow import FlowMatchForward, latent_ids, pack_latents, unpack_latents
from mmalign.diffusion.pipeline import denoise, encode_prompts, load_sd_components
from mmalign.diffusion.preference import PreferenceConfig
from mmalign.diffusion.tiny_flow import build_sd3_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")
CAPTIONS = ["a red circle", "two blue squares", ""]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """8 pairs: the caption's own render wins against another scene's render."""
    out = tmp_path_factory.mktemp("flow_pairs")
    scenes = sample_scenes(3, 9)
    write_pairs_jsonl(out, [(scenes[i].caption, render_scene(scenes[i], 32), render_scene(scenes[i + 1], 32), {})
                            for i in range(8)])
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("flow_cache")


def run(root, pipe, pairs_path, cache, method, name="run", **sections):
    cfg = {"method": method, "output_dir": str(root / name),
           "train": {"lr": 1e-3, "max_steps": 1, "batch_size": 4, "log_every": 1, "seed": 0, "save_every": 100},
           "model": {"pretrained": str(pipe)}, "data": {"path": str(pairs_path), "cache_dir": str(cache)}}
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    exp = load_experiment(str(root / f"{name}.yaml"), [], PreferenceConfig)
    summary = train(exp, method_class(method)(exp.args, exp.output_dir))
    assert summary["step"] == 1 and all(math.isfinite(v) for v in summary["metrics"].values()), summary
    return root / name / "final"


def sd3_call(transformer, x, t, cond):
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond["ctx"],
                       pooled_projections=cond["pooled"]).sample


# --- loading, forward process, conditioning -------------------------------------------------------------------

def test_load_round_trip(tiny_sd3_dir, tiny_flux_dir, tmp_path):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    sd3, flux = load_sd_components(str(tiny_sd3_dir)), load_sd_components(str(tiny_flux_dir))
    assert (sd3.flow, flux.flow) == ("sd3", "flux") and not (sd3.is_sdxl or flux.is_sdxl)
    assert type(sd3.unet).__name__ == "SD3Transformer2DModel" and sd3.text_encoder_3 is not None
    assert type(flux.unet).__name__ == "FluxTransformer2DModel" and flux.text_encoder_3 is None
    assert sd3.resolution == 32 and sd3.pixel_factor == 4 and isinstance(sd3.noise_scheduler, FlowMatchForward)
    ref = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir)).transformer.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in sd3.unet.state_dict().items())
    ref = FluxPipeline.from_pretrained(str(tiny_flux_dir)).transformer.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in flux.unet.state_dict().items())
    no_t5 = tmp_path / "no_t5"  # an SD3 pipeline saved without T5 (text_encoder_3: null)
    build_sd3_pipeline(with_t5=False).save_pretrained(no_t5)
    parts = load_sd_components(str(no_t5))
    cond = encode_prompts(parts, CAPTIONS[:1], "cpu")
    assert parts.text_encoder_3 is None and cond["ctx"].shape == (1, 16 + 256, 32)
    assert not cond["ctx"][:, 16:].any()  # the pipeline's zeros in place of T5


def test_forward_process_by_hand(tiny_sd3_dir, tiny_flux_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(tiny_sd3_dir), subfolder="scheduler")
    fwd = FlowMatchForward(sched)
    # index 499 -> s = 500/1000 = 0.5; SD3's shift 3: sigma = 3*0.5 / (1 + 2*0.5) = 0.75; t = 750
    t = fwd.train_timesteps(torch.tensor([499, 999]))
    assert torch.allclose(t, torch.tensor([750.0, 1000.0]))
    x0, eps = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]])
    x = fwd.add_noise(x0, eps, t[:1])
    assert torch.allclose(x, torch.tensor([[0.25 * 1 + 0.75 * 3, 0.25 * 2 - 0.75 * 1]]))  # (1-s) x0 + s eps
    assert torch.allclose(x, sched.scale_noise(x0, t[:1], eps))  # diffusers' own forward process
    from mmalign.diffusion.pipeline import diffusion_target
    assert torch.equal(diffusion_target(fwd, x0, eps, t[:1]), torch.tensor([[2.0, -3.0]]))  # eps - x0
    flux = FlowMatchForward(FlowMatchEulerDiscreteScheduler.from_pretrained(str(tiny_flux_dir), subfolder="scheduler"))
    assert torch.allclose(flux.train_timesteps(torch.tensor([499])), torch.tensor([500.0]))  # dynamic: unshifted


def test_flux_packing_matches_the_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 8)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), x)
    assert torch.equal(latent_ids(6, 8, "cpu", torch.float32), FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu",
                                                                                                      torch.float32))


def test_prompts_encoded_as_the_pipelines_do(tiny_sd3_dir, tiny_flux_dir):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    parts = load_sd_components(str(tiny_sd3_dir))
    cond = encode_prompts(parts, CAPTIONS, "cpu", batch=2)
    with torch.no_grad():  # by hand: CLIP-L || CLIP-G penultimate states padded to T5's width, then T5's states
        ids = parts.tokenizer(CAPTIONS, padding="max_length", max_length=16, truncation=True,
                              return_tensors="pt").input_ids
        outs = [te(ids, output_hidden_states=True) for te in (parts.text_encoder, parts.text_encoder_2)]
        clip = torch.cat([o.hidden_states[-2] for o in outs], -1)
        t5_ids = parts.tokenizer_3(CAPTIONS, padding="max_length", max_length=256, return_tensors="pt").input_ids
        want = torch.cat([torch.nn.functional.pad(clip, (0, 32 - clip.shape[-1])), parts.text_encoder_3(t5_ids)[0]], 1)
    assert torch.allclose(cond["ctx"], want, atol=1e-6)
    assert torch.allclose(cond["pooled"], torch.cat([o.text_embeds for o in outs], -1), atol=1e-6)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir))
    c, _, p, _ = pipe.encode_prompt(CAPTIONS, None, None, do_classifier_free_guidance=False)
    assert torch.allclose(cond["ctx"], c, atol=1e-5) and torch.allclose(cond["pooled"], p, atol=1e-5)
    flux = load_sd_components(str(tiny_flux_dir))
    cond = encode_prompts(flux, CAPTIONS, "cpu")
    c, p, _ = FluxPipeline.from_pretrained(str(tiny_flux_dir)).encode_prompt(CAPTIONS, None)
    # T5 in another batch layout: float32 rounding, up to 1.6e-5 on an AMD EPYC (values up to 3)
    assert cond["ctx"].shape == (3, 512, 32) and torch.allclose(cond["ctx"], c, atol=5e-5)
    assert torch.allclose(cond["pooled"], p, atol=1e-5)


# --- methods through the real trainer, exports ----------------------------------------------------------------

def test_sd3_dpo_lora_trains_and_loads_in_diffusers(tmp_path, tiny_sd3_dir, pairs, cache):
    from diffusers import StableDiffusion3Pipeline

    out = run(tmp_path, tiny_sd3_dir, pairs, cache, "diffusion_dpo",
              model={"lora_rank": 4, "lora_alpha": 8, "reference": "adapters_off"}, data={"caption_dropout": 0.5})
    assert json.loads((out / "mmalign_export.json").read_text())["base"] == str(tiny_sd3_dir.resolve())
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir))
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500.0])
    cond = {"ctx": torch.randn(1, 20, 32), "pooled": torch.randn(1, 32)}
    with torch.no_grad():
        before = sd3_call(pipe.transformer, x, t, cond)
        pipe.load_lora_weights(str(out))
        after = sd3_call(pipe.transformer, x, t, cond)
    assert not torch.allclose(before, after), "the LoRA export had no effect"
    names = {n for n, _ in pipe.transformer.named_modules()}
    assert any(n.endswith("attn.add_q_proj.lora_A") for n in names)  # joint attention's text stream too


@pytest.mark.parametrize("method", ["diffusion_sft_winners", "diffusion_cca", "diffusion_bco"])
def test_sd3_full_finetune_trains_and_exports(tmp_path, tiny_sd3_dir, pairs, cache, method):
    from diffusers import StableDiffusion3Pipeline

    out = run(tmp_path, tiny_sd3_dir, pairs, cache, method)
    base = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_dir)).transformer.state_dict()
    new = StableDiffusion3Pipeline.from_pretrained(str(out)).transformer.state_dict()
    assert any(not torch.equal(base[k], new[k]) for k in base), "training left the exported transformer unchanged"


def test_flux_dpo_lora_trains_and_loads_in_diffusers(tmp_path, tiny_flux_dir, pairs, cache):
    from diffusers import FluxPipeline

    out = run(tmp_path, tiny_flux_dir, pairs, cache, "diffusion_dpo", model={"lora_rank": 4, "dtype": "bf16"},
              data={"resolution": 32})  # a bf16 frozen base under fp32 adapters
    pipe = FluxPipeline.from_pretrained(str(tiny_flux_dir))
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    cond = {"ctx": torch.randn(1, 6, 32), "pooled": torch.randn(1, 16)}
    with torch.no_grad():
        before = denoise(pipe.transformer, x, t, cond)
        pipe.load_lora_weights(str(out))
        after = denoise(pipe.transformer, x, t, cond)
    assert not torch.allclose(before, after), "the LoRA export had no effect"


def method_on(tmp_path, pipe, pairs_path, cls_name, **sections):
    cfg = {"model": {"pretrained": str(pipe)}, "data": {"path": str(pairs_path), "cache_dir": str(tmp_path / "c")}}
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    m = method_class(cls_name)(from_dict(PreferenceConfig, cfg, "test"), str(tmp_path / "m"))
    return m, m.build(torch.device("cpu"))


@pytest.mark.parametrize("flow_error", ["velocity", "epsilon"])
def test_dpo_loss_on_velocity_errors_by_hand(tmp_path, tiny_sd3_dir, pairs, flow_error):
    """Two pairs: sigma from the scheduler's table, x_sigma = (1 - sigma) x0 + sigma eps shared by winner and
    loser, errors against eps - x0 (flow_error epsilon: the error of the noise the velocity implies),
    inside = -beta/2 [(e_w - r_w) - (e_l - r_l)], loss = mean -log sigmoid."""
    from diffusers import SD3Transformer2DModel

    beta = 500.0
    m, policy = method_on(tmp_path, tiny_sd3_dir, pairs, "diffusion_dpo",
                          objective={"beta": beta, "flow_error": flow_error})
    m.dataset()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))  # policy != reference
    batch = m.collate([m.data[i] for i in range(2)])
    batch["std_w"], batch["std_l"] = torch.zeros_like(batch["std_w"]), torch.zeros_like(batch["std_l"])
    batch["row_seed"] = torch.tensor([11, 12])
    loss, metrics = m.loss(policy, batch)
    cond_w, cond_l = m.pair_cond(batch, torch.zeros(2, dtype=torch.long))
    assert set(cond_w) == set(cond_l) == {"ctx", "pooled"}  # no SDXL time_ids on a flow model

    rows = RowRandom.of(batch)  # the method's draws, by name
    eps = rows.randn("noise", (4, 16, 16), "cpu", torch.float32)
    idx = rows.randint("t", 0, 1000, "cpu")
    s = 3 * (idx + 1) / 1000 / (1 + 2 * (idx + 1) / 1000)  # SD3's shifted sigma
    x0 = {k: (batch[f"mean_{k}"][:, 0] - 0.1) * 1.5 for k in "wl"}  # (posterior mean - shift) * scale
    cond = {k: batch[k] for k in ("ctx", "pooled")}
    ref = SD3Transformer2DModel.from_pretrained(str(tiny_sd3_dir), subfolder="transformer")
    err = {}
    with torch.no_grad():
        for name, model in (("theta", policy.unet), ("ref", ref)):
            for k in "wl":
                x = (1 - s.view(-1, 1, 1, 1)) * x0[k] + s.view(-1, 1, 1, 1) * eps
                v = sd3_call(model, x, s * 1000, cond)
                if flow_error == "epsilon":  # the noise the velocity implies: eps_hat = x_sigma + (1 - sigma) v
                    err[name, k] = (x + (1 - s.view(-1, 1, 1, 1)) * v - eps).pow(2).flatten(1).mean(1)
                else:
                    err[name, k] = (v - (eps - x0[k])).pow(2).flatten(1).mean(1)
    inside = -beta / 2 * ((err["theta", "w"] - err["ref", "w"]) - (err["theta", "l"] - err["ref", "l"]))
    want = torch.log1p(torch.exp(-inside)).mean()
    assert inside.abs().max() > 1e-3  # a non-trivial case
    assert torch.allclose(loss, want, rtol=1e-4, atol=1e-6), (loss, want)
    assert torch.allclose(metrics["margin"], inside.mean(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["diffusion_inpo", "diffusion_inversion_dpo"])
def test_inversion_methods_refuse_flow_pipelines(tmp_path, tiny_sd3_dir, pairs, method):
    with pytest.raises(ConfigError, match=r"rectified-flow \(SD3\).*DDIM"):
        method_on(tmp_path, tiny_sd3_dir, pairs, method)


def test_unet_only_methods_refuse_flow_pipelines(tmp_path, tiny_flux_dir, shapeworld_folder):
    from mmalign.diffusion.sft import SFTConfig

    cfg = from_dict(SFTConfig, {"model": {"pretrained": str(tiny_flux_dir)}, "data": {"path": str(shapeworld_folder)}},
                    "test")
    with pytest.raises(ConfigError, match=r"rectified-flow \(FLUX\).*UNet"):
        method_class("diffusion_sft")(cfg, str(tmp_path / "m")).build(torch.device("cpu"))


# --- sampling ---------------------------------------------------------------------------------------------------

def test_mmalign_sample_of_sd3_exports(tmp_path, tiny_sd3_dir, pairs, cache):
    from mmalign.cli import main

    full = run(tmp_path, tiny_sd3_dir, pairs, cache, "diffusion_sft_winners", name="full")
    lora = run(tmp_path, tiny_sd3_dir, pairs, cache, "diffusion_sft_winners", name="lora", model={"lora_rank": 4})
    for export in (full, lora):
        out = tmp_path / f"samples_{export.parent.name}"
        main(["sample", "--model", str(export), "--prompt", "a red circle", "--per-prompt", "2", "--steps", "2",
              "--device", "cpu", "--out", str(out)])
        rows = [json.loads(line) for line in open(out / "samples.jsonl")]
        from PIL import Image
        assert [r["seed"] for r in rows] == [0, 1]
        assert all(Image.open(out / r["file_name"]).size == (32, 32) for r in rows)


def test_sd3_base_without_t5_trains_exports_and_samples(tmp_path, pairs):
    """An SD3 base saved without T5 (model_index.json: text_encoder_3 null, as the shipped ShapeWorld flow base):
    diffusers' from_pretrained refuses it unless the absent parts are passed; the full export, the LoRA export's
    base and `mmalign sample` pass them."""
    from diffusers import StableDiffusion3Pipeline

    from mmalign.cli import main

    base = tmp_path / "no_t5"
    build_sd3_pipeline(with_t5=False).save_pretrained(base)
    with pytest.raises(ValueError, match="expected"):
        StableDiffusion3Pipeline.from_pretrained(str(base))  # the diffusers behaviour the loaders work around
    cache = tmp_path / "cache"
    full = run(tmp_path, base, pairs, cache, "diffusion_dpo", name="full")
    exported = StableDiffusion3Pipeline.from_pretrained(str(full), text_encoder_3=None, tokenizer_3=None)
    assert exported.text_encoder_3 is None
    ref = StableDiffusion3Pipeline.from_pretrained(str(base), text_encoder_3=None, tokenizer_3=None)
    assert any(not torch.equal(v, exported.transformer.state_dict()[k])
               for k, v in ref.transformer.state_dict().items()), "the full export left the transformer unchanged"
    lora = run(tmp_path, base, pairs, cache, "diffusion_dpo", name="lora",
               model={"lora_rank": 4, "lora_alpha": 8, "reference": "adapters_off"})
    for export in (full, lora):
        out = tmp_path / f"samples_{export.parent.name}"
        main(["sample", "--model", str(export), "--prompt", "a red circle", "--per-prompt", "1", "--steps", "2",
              "--device", "cpu", "--out", str(out)])
        assert len([json.loads(line) for line in open(out / "samples.jsonl")]) == 1


def test_latents_follow_what_the_base_declares(tmp_path, tiny_sd3_dir, pairs, cache):
    """A base whose mmalign_base.json says {"latents": "mean"} (the ShapeWorld flow base, trained on posterior
    means) is trained on the means by default (data.latents: auto); "sample" overrides it; full exports carry the
    notes on; an unknown value is refused."""
    import shutil

    from mmalign.diffusion.pipeline import BASE_NOTES, training_latents

    base = tmp_path / "base"
    shutil.copytree(tiny_sd3_dir, base)
    assert training_latents(str(base)) == "sample"  # no notes: diffusers' convention
    (base / BASE_NOTES).write_text(json.dumps({"latents": "mean"}))
    assert training_latents(str(base)) == "mean"
    drawn = {}
    for asked in ("auto", "sample"):
        m, _ = method_on(tmp_path / asked, base, pairs, "diffusion_dpo", data={"latents": asked})
        m.dataset()
        batch = m.collate([m.data[i] for i in range(2)])
        batch["row_seed"] = torch.tensor([3, 4])
        drawn[asked] = m.pair_latents(batch)
        assert m.latent_source() == {"auto": "mean", "sample": "sample"}[asked]
    lat_w, lat_l, view = drawn["auto"]
    idx = torch.arange(2)
    for lat, side in ((lat_w, "w"), (lat_l, "l")):
        assert torch.allclose(lat, (batch[f"mean_{side}"][idx, view] - 0.1) * 1.5)  # (mean - shift) * scale
    assert not torch.allclose(drawn["sample"][0], lat_w)  # posterior samples differ from the means
    full = run(tmp_path, base, pairs, cache, "diffusion_dpo", name="full")
    assert json.loads((full / BASE_NOTES).read_text()) == {"latents": "mean"}
    (base / BASE_NOTES).write_text(json.dumps({"latents": "median"}))
    with pytest.raises(ValueError, match="latents must be one of"):
        training_latents(str(base))
    (base / BASE_NOTES).write_text("latents: mean")
    with pytest.raises(ValueError, match="not a JSON object"):
        training_latents(str(base))
