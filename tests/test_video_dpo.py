"""Video Diffusion-DPO and temporal training (mmalign.video.methods) on tiny pipelines built from configs."""
import json
import math
import random

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, MotionAdapter, UNet2DConditionModel, UNetMotionModel

from mmalign.core.config import ConfigError, Experiment, TrainConfig, load_experiment
from mmalign.core.trainer import train
from mmalign.datasets.shapeworld.video import sample_clip, write_clip
from mmalign.diffusion.losses import diffusion_dpo_loss
from mmalign.core.registry import method_class
from mmalign.core.reference import SharedFrozenCopy
from mmalign.video.methods import (VideoConfig, VideoDataConfig, VideoDenoiser, VideoDiffusionDPO, VideoModelConfig,
                                   VideoTemporalTraining, video_dpo_errors)
from mmalign.video.temporal import inflate

pytestmark = pytest.mark.usefixtures("one_thread")
F = 4


def clips(n, seed=0):
    rng = random.Random(seed)
    return [sample_clip(rng, F, 32) for _ in range(n)]


def pairs(n):
    """(caption, preferred, rejected): the clip against the same clip played backwards."""
    return [(c.caption, c.frames, c.frames[::-1]) for c in clips(n)]


def config(tiny_sd_dir, **model):
    return VideoConfig(VideoModelConfig(pretrained=str(tiny_sd_dir), motion_heads=4, **model),
                       VideoDataConfig(num_frames=F))


def run(method, out, steps=2, batch=2, lr=1e-3):
    exp = Experiment(method.__class__.__name__, str(out), TrainConfig(lr=lr, max_steps=steps, batch_size=batch,
                                                                       log_every=1, resume="never"), method.cfg)
    summary = train(exp, method)
    return summary, [json.loads(x) for x in open(out / "metrics.jsonl")]


def test_per_video_error_averages_channels_frames_and_pixels_with_one_t_and_noise_per_pair():
    sched = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    lat_w, lat_l, noise = (torch.randn(3, 2, F, 3, 3, generator=g) for _ in range(3))
    ctx, t = torch.randn(3, 5, 6, generator=g), torch.tensor([5, 400, 999])
    seen = {}

    def policy(x_t, tt, cc):
        seen.update(x_t=x_t, t=tt, ctx=cc)
        return 0.5 * x_t

    err, ref_err = video_dpo_errors(policy, lambda x, tt, cc: torch.zeros_like(x), sched, lat_w, lat_l, ctx, t, noise)
    assert torch.equal(seen["t"], torch.cat([t, t])) and torch.equal(seen["ctx"], torch.cat([ctx, ctx]))
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    for k, lat in enumerate((lat_w, lat_l)):
        x_t = abar.sqrt() * lat + (1 - abar).sqrt() * noise  # the SAME noise and t for winner and loser
        assert torch.allclose(seen["x_t"][3 * k:3 * k + 3], x_t, atol=1e-6)
        for i in range(3):  # by hand: a plain mean over all C*F*H*W = 2*4*3*3 = 72 entries of video i
            d = (0.5 * x_t[i] - noise[i]).flatten().tolist()
            assert err[3 * k + i].item() == pytest.approx(sum(v * v for v in d) / 72, rel=1e-5)
            assert ref_err[3 * k + i].item() == pytest.approx(sum(v * v for v in noise[i].flatten().tolist()) / 72,
                                                              rel=1e-5)


def test_video_dpo_on_a_batch_equals_per_pair_computation(tiny_sd_dir):
    torch.manual_seed(0)  # the fresh motion modules and the perturbation below: the same whatever ran before
    method = VideoDiffusionDPO(config(tiny_sd_dir), "/tmp/unused")
    policy = method.build(torch.device("cpu"))
    with torch.no_grad():  # a policy that differs from the reference
        for n, p in policy.named_parameters():
            if n.endswith("proj_out.weight") and "motion_modules" in n:
                p.normal_(0, 0.2)
    sched, g = method.parts.noise_scheduler, torch.Generator().manual_seed(1)
    lat_w, lat_l, noise = (torch.randn(3, 4, F, 16, 16, generator=g) for _ in range(3))
    ctx, t = torch.randn(3, 16, 32, generator=g), torch.tensor([50, 300, 800])
    ref = lambda *a: method.ref(lambda m: m(*a))  # noqa: E731
    with torch.no_grad():
        err, ref_err = video_dpo_errors(policy, ref, sched, lat_w, lat_l, ctx, t, noise)
        loss, _ = diffusion_dpo_loss(*err.chunk(2), *ref_err.chunk(2), beta=5000.0)
        singles = []
        for i in range(3):
            e, r = video_dpo_errors(policy, ref, sched, lat_w[i:i + 1], lat_l[i:i + 1], ctx[i:i + 1], t[i:i + 1],
                                    noise[i:i + 1])
            assert torch.allclose(e, err[[i, 3 + i]], rtol=1e-4) and torch.allclose(r, ref_err[[i, 3 + i]], rtol=1e-4)
            singles.append(diffusion_dpo_loss(*e.chunk(2), *r.chunk(2), beta=5000.0)[0])
    assert not torch.allclose(err, ref_err)
    assert loss.item() == pytest.approx(torch.stack(singles).mean().item(), rel=1e-4)


def test_shared_frozen_copy_shares_the_image_model_and_copies_what_trains(tiny_sd_dir):
    method = VideoDiffusionDPO(config(tiny_sd_dir), "/tmp/unused")
    policy = method.build(torch.device("cpu"))
    assert isinstance(method.ref, SharedFrozenCopy)
    mine, theirs = dict(policy.named_parameters()), dict(method.ref.model.named_parameters())
    assert mine.keys() == theirs.keys()
    for n, p in mine.items():
        assert (p is theirs[n]) == (not p.requires_grad), n
        assert not theirs[n].requires_grad


def test_video_dpo_trains_temporal_layers_only_and_starts_at_log2(tiny_sd_dir, tmp_path):
    method = VideoDiffusionDPO(config(tiny_sd_dir), str(tmp_path))
    method.data = pairs(4)
    summary, log = run(method, tmp_path, steps=3)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    assert log[0]["implicit_acc"] == 0.5 and abs(log[-1]["loss"] - math.log(2)) > 1e-7
    pol = dict(method.ref.policy.named_parameters())
    ref = dict(method.ref.model.named_parameters())
    changed = [n for n in pol if not torch.equal(pol[n], ref[n])]
    assert changed and all("motion_modules" in n for n in changed)
    assert (tmp_path / "final/pipeline/model_index.json").is_file()
    assert (tmp_path / "final/motion_adapter/config.json").is_file()


def test_video_dpo_adapters_off_reference_through_temporal_lora(tiny_sd_dir, tmp_path):
    cfg = config(tiny_sd_dir, lora_rank=2, lora_where="temporal", train_motion=False, reference="adapters_off")
    method = VideoDiffusionDPO(cfg, str(tmp_path))
    method.data = pairs(2)
    _, log = run(method, tmp_path, steps=2)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(ConfigError, match="adapters_off needs"):
        VideoDiffusionDPO(config(tiny_sd_dir, reference="adapters_off"), str(tmp_path))
    with pytest.raises(ConfigError, match="nothing would train"):
        VideoTemporalTraining(config(tiny_sd_dir, train_motion=False), str(tmp_path))


def test_cross_attention_lora_ships_its_image_unet_and_a_later_method_builds_on_it(tiny_sd_dir, tmp_path):
    cfg = config(tiny_sd_dir, lora_rank=2, lora_where="cross")
    first = VideoTemporalTraining(cfg, str(tmp_path / "first"))
    first.data = [(c.caption, c.frames) for c in clips(2)]
    run(first, tmp_path / "first", steps=2, lr=1e-2)
    lora = [n for n in first.trainable if "lora_" in n]
    assert lora and all("attn2" in n and "motion_modules" not in n for n in lora)  # the caption's way in only
    adapter = tmp_path / "first/final/motion_adapter"
    assert (adapter / "unet/config.json").is_file()  # trained spatial weights travel with the adapter

    second = VideoDiffusionDPO(config(tiny_sd_dir, motion_adapter=str(adapter)), str(tmp_path / "second"))
    policy = second.build(torch.device("cpu"))
    trained = VideoDenoiser(UNetMotionModel.from_pretrained(tmp_path / "first/final/pipeline/unet"))
    base = VideoDenoiser(inflate(UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet"),
                                 MotionAdapter.from_pretrained(adapter)))
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 4, F, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 16, 32, generator=g)
    with torch.no_grad():
        assert torch.allclose(policy(x, t, ctx), trained(x, t, ctx), atol=1e-5)
        assert not torch.allclose(base(x, t, ctx), trained(x, t, ctx), atol=1e-4)  # the unet/ made the difference

    plain = VideoTemporalTraining(config(tiny_sd_dir), str(tmp_path / "plain"))
    plain.data = [(c.caption, c.frames) for c in clips(2)]
    run(plain, tmp_path / "plain", steps=1)
    assert not (tmp_path / "plain/final/motion_adapter/unet").exists()  # spatial weights untouched: none shipped


def test_video_dpo_reads_pair_folders(tiny_sd_dir, tmp_path):
    from mmalign.datasets.video import write_video_pairs_jsonl

    data = tmp_path / "pairs"
    write_video_pairs_jsonl(data, [(c, np.stack([np.asarray(f) for f in w]), np.stack([np.asarray(f) for f in l]), {})
                                   for c, w, l in pairs(2)])
    with open(data / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"caption": "a red circle moving up", "video_w": "missing.gif", "video_l": "x.gif"}) + "\n")
    cfg = config(tiny_sd_dir)
    cfg.data.path = str(data)
    method = VideoDiffusionDPO(cfg, str(tmp_path / "run"))
    method.build(torch.device("cpu"))
    rows, report = method.dataset()
    assert len(rows) == 2 and rows[0]["mean_w"].shape == (4, F, 16, 16)
    report = report.to_dict()
    assert report["kept"] == 2 and report["skipped"] == {"video file not found": 1}


def test_temporal_training_from_a_gif_folder(tiny_sd_dir, tmp_path):
    data = tmp_path / "clips"
    data.mkdir()
    rows = []
    for i, c in enumerate(clips(4)):
        write_clip(c, data / f"{i}.gif")
        rows.append({"file_name": f"{i}.gif", "text": c.caption})
    rows.append({"file_name": "gone.gif", "text": "a red circle moving up"})
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = config(tiny_sd_dir, blend="alpha")
    cfg.data.path = str(data)
    method = VideoTemporalTraining(cfg, str(tmp_path / "run"))
    summary, log = run(method, tmp_path / "run", steps=2)
    assert math.isfinite(log[-1]["loss"]) and json.loads((tmp_path / "run/data_report.json").read_text())["kept"] == 4
    assert all("motion_modules" in n for n in method.trainable) and any("blender" in n for n in method.trainable)


def test_registry_and_recipes():
    assert method_class("video_dpo") is VideoDiffusionDPO and method_class("video_temporal") is VideoTemporalTraining
    for path, name in (("configs/shapeworld_video_temporal.yaml", "video_temporal"),
                       ("configs/shapeworld_video_dpo.yaml", "video_dpo"),
                       ("configs/sd15_animatediff_dpo.yaml", "video_dpo")):
        exp = load_experiment(path, method_config=VideoConfig)
        assert exp.method == name and isinstance(exp.args, VideoConfig)


def test_encode_clips_caches_each_frame_in_video_layout_and_checks_frame_counts(tiny_sd_dir):
    from diffusers import AutoencoderKL

    from mmalign.video.clips import encode_clips, frames_tensor

    vae = AutoencoderKL.from_pretrained(tiny_sd_dir, subfolder="vae").eval()
    two = [c.frames for c in clips(2)]
    mean, std = encode_clips(vae, two, 32, "cpu", batch=3)  # chunks that do not align with clips
    assert mean.shape == std.shape == (2, 4, F, 16, 16)
    with torch.no_grad():
        one = vae.encode(frames_tensor(two[1], 32)[2:3]).latent_dist  # frame 2 of clip 1, alone
    assert torch.allclose(mean[1, :, 2], one.mean[0], atol=1e-5) and torch.allclose(std[1, :, 2], one.std[0], atol=1e-5)
    with pytest.raises(ValueError, match="clip 1 has 3 frames, expected 4"):
        encode_clips(vae, [two[0], two[1][:3]], 32, "cpu", num_frames=F)
