"""Temporal inflation of an image UNet (mmalign.video.temporal) and video pipelines (mmalign.video.sampling), on
tiny UNets built from configs."""
import copy

import numpy as np
import pytest
import torch
from diffusers import AnimateDiffPipeline, MotionAdapter, UNet2DConditionModel

from mmalign.video.sampling import (SPATIAL_UNET, sample_videos, save_video_model, spatial_unet_from_video,
                                    video_pipeline)
from mmalign.diffusion.lora import add_lora
from mmalign.video.temporal import (LORA_PLACEMENTS, MotionSpec, add_alpha_blend, bcfhw_to_bfchw, bfchw_to_bcfhw,
                                    extract_adapter, fold_alpha_blend, from_frame_batch, inflate, motion_modules,
                                    repeat_per_frame, set_trainable, to_frame_batch, zero_motion_outputs)

pytestmark = pytest.mark.usefixtures("one_thread")
B, F = 2, 4


@pytest.fixture(scope="module")
def unet(tiny_sd_dir):
    return UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet").eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 4, F, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(B, 16, 32, generator=g)


def image_model_per_frame(unet, x, t, ctx):
    """The image UNet run on every frame as an independent image, back in (B, C, F, H, W)."""
    out = unet(to_frame_batch(x), t.repeat_interleave(x.shape[2]), repeat_per_frame(ctx, x.shape[2])).sample
    return from_frame_batch(out, x.shape[2])


def video(model, x, t, ctx):
    return model(x, t, repeat_per_frame(ctx, x.shape[2])).sample


def randomise_motion_outputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in motion_modules(model):
            m.proj_out.weight.copy_(0.2 * torch.randn(m.proj_out.weight.shape, generator=g))


def test_layouts_round_trip_and_frame_order():
    x = torch.arange(2 * 3 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 3, 4, 2, 2)  # (B, C, F, H, W)
    flat = to_frame_batch(x)
    assert flat.shape == (8, 3, 2, 2)
    assert torch.equal(flat[1 * 4 + 2], x[1, :, 2])  # row b*F + f is frame f of video b
    assert torch.equal(from_frame_batch(flat, 4), x)
    assert torch.equal(bfchw_to_bcfhw(bcfhw_to_bfchw(x)), x)
    assert torch.equal(bcfhw_to_bfchw(x)[1, 2], x[1, :, 2])
    ctx = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5)
    rep = repeat_per_frame(ctx, 4)
    assert rep.shape == (8, 3, 5) and torch.equal(rep[1 * 4 + 3], ctx[1]) and torch.equal(rep[3], ctx[0])
    with pytest.raises(ValueError, match="do not split"):
        from_frame_batch(flat[:7], 4)


def test_zeroed_motion_outputs_equal_the_image_model_frame_by_frame(unet, inputs):
    model = inflate(unet, spec=MotionSpec(heads=4))
    ref = image_model_per_frame(unet, *inputs)
    assert torch.allclose(video(model, *inputs), ref, atol=1e-5)
    randomise_motion_outputs(model)  # the same model with live temporal layers differs
    assert (video(model, *inputs) - ref).abs().max() > 1e-3
    assert zero_motion_outputs(model) == 7  # 2 down + 1 mid + 2 x 2 up
    assert torch.allclose(video(model, *inputs), ref, atol=1e-5)
    x, t, ctx = inputs
    with pytest.raises(RuntimeError):  # diffusers 0.42.1 wants the text already repeated per frame: (B*F, L, D)
        model(x, t, ctx)


def test_only_temporal_parameters_receive_gradients(unet, inputs):
    model = inflate(unet, spec=MotionSpec(heads=4))
    randomise_motion_outputs(model)
    video(model, *inputs).pow(2).mean().backward()
    for name, p in model.named_parameters():
        temporal = "motion_modules" in name
        assert p.requires_grad == temporal, name
        assert (p.grad is not None) == temporal, name
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if "motion_modules" in n and n.endswith("proj_in.weight"))


@pytest.mark.parametrize("where", ["spatial", "temporal"])
def test_lora_placement_and_what_trains(unet, where):
    model = inflate(unet, spec=MotionSpec(heads=4))
    add_lora(model, rank=2, targets=LORA_PLACEMENTS[where])
    names = set_trainable(model, motion=False)
    assert names and all("lora_" in n for n in names)
    assert all(("motion_modules" in n) == (where == "temporal") for n in names)
    names = set_trainable(model, motion=True)
    assert any("motion_modules" in n and "lora_" not in n for n in names)


def test_alpha_one_is_the_image_model_and_folding_is_exact(unet, inputs):
    base = inflate(unet, spec=MotionSpec(heads=4))
    randomise_motion_outputs(base)
    live = video(base, *inputs)
    ref = image_model_per_frame(unet, *inputs)
    one, zero, model = (copy.deepcopy(base) for _ in range(3))
    add_alpha_blend(one, alpha=1.0, learned=False)
    assert torch.allclose(video(one, *inputs), ref, atol=1e-5)
    add_alpha_blend(zero, alpha=0.0, learned=False)  # alpha = 0: the temporal branch alone
    assert torch.allclose(video(zero, *inputs), live, atol=1e-5)
    add_alpha_blend(model, alpha=0.3, learned=True)
    blended = video(model, *inputs)
    assert (blended - live).abs().max() > 1e-3 and (blended - ref).abs().max() > 1e-3
    blended.pow(2).mean().backward()
    mix = [p for n, p in model.named_parameters() if n.endswith("blender.mix_factor")]
    assert len(mix) == 7 and all(p.requires_grad and p.grad is not None for p in mix)
    assert torch.allclose(torch.sigmoid(mix[0]), torch.tensor([0.3]))
    assert fold_alpha_blend(model) == 7
    assert not any("blender" in n for n, _ in model.named_parameters())
    assert torch.allclose(video(model, *inputs), blended, atol=1e-5)
    assert fold_alpha_blend(one) == 7 and torch.allclose(video(one, *inputs), ref, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        add_alpha_blend(model, alpha=1.0, learned=True)


def test_adapter_round_trip_keeps_the_full_config(unet, inputs, tmp_path):
    model = inflate(unet, spec=MotionSpec(heads=4, transformer_layers=2, max_frames=12))
    randomise_motion_outputs(model)
    add_alpha_blend(model, alpha=0.4, learned=True)
    add_lora(model, rank=2, targets=LORA_PLACEMENTS["temporal"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # a trained LoRA: merged into the exported adapter
    expected = video(model, *inputs)
    extract_adapter(model).save_pretrained(tmp_path / "adapter")
    loaded = MotionAdapter.from_pretrained(tmp_path / "adapter")
    assert loaded.config.motion_transformer_layers_per_block == 2
    assert loaded.config.motion_max_seq_length == 12
    again = inflate(unet, loaded)  # a loaded adapter is not zeroed
    assert torch.allclose(video(again, *inputs), expected, atol=1e-5)


def test_pipeline_directory_loads_in_animatediff_and_samples(unet, inputs, tiny_sd_dir, tmp_path):
    model = inflate(unet, spec=MotionSpec(heads=4))
    randomise_motion_outputs(model)
    paths = save_video_model(tiny_sd_dir, model, tmp_path / "export")
    pipe = AnimateDiffPipeline.from_pretrained(paths["pipeline"])
    assert pipe.motion_adapter is None
    assert torch.allclose(video(pipe.unet, *inputs), video(model, *inputs), atol=1e-5)
    clips = sample_videos(pipe, ["a red circle moving left", "a blue square moving up"], [0, 1], num_frames=F,
                          steps=2, guidance=2.0, decode_chunk=3)
    assert len(clips) == 2 and all(len(c) == F and c[0].size == (32, 32) for c in clips)
    single = sample_videos(pipe, ["a blue square moving up"], [1], num_frames=F, steps=2, guidance=2.0)
    diff = np.asarray(single[0][2], dtype=int) - np.asarray(clips[1][2], dtype=int)
    assert np.abs(diff).max() <= 2  # clip i depends on (prompt_i, seed_i), not on the batch
    from_adapter = video_pipeline(tiny_sd_dir, paths["motion_adapter"])
    assert torch.allclose(video(from_adapter.unet, *inputs), video(model, *inputs), atol=1e-5)


def test_timestep_spacing_places_the_first_step_and_leaves_the_scheduler_as_it_was(unet, tiny_sd_dir):
    model = inflate(unet, spec=MotionSpec(heads=4))
    pipe = video_pipeline(tiny_sd_dir, model)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(int(args[1].flatten()[0])))
    own = pipe.scheduler
    firsts = {}
    for spacing in ("leading", "trailing"):
        seen.clear()
        sample_videos(pipe, ["a red circle moving left"], [0], num_frames=F, steps=2, guidance=1.0,
                      timestep_spacing=spacing)
        firsts[spacing] = seen[:]
        assert pipe.scheduler is own
    hook.remove()
    T = own.config.num_train_timesteps
    assert firsts["trailing"] == [T - 1, T // 2 - 1]  # the first step at pure noise
    assert firsts["leading"][0] < T - 1 - T // 4  # the "leading" default never reaches t = T - 1
    with pytest.raises(ValueError, match="timestep_spacing"):
        sample_videos(pipe, ["a red circle moving left"], [0], num_frames=F, steps=2, timestep_spacing="last")
    assert pipe.scheduler is own


def test_spatial_lora_ships_as_a_fused_image_unet_next_to_the_adapter(unet, inputs, tiny_sd_dir, tmp_path):
    model = inflate(unet, spec=MotionSpec(heads=4))
    randomise_motion_outputs(model)
    add_lora(model, rank=2, targets=LORA_PLACEMENTS["spatial"])
    set_trainable(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # a trained spatial LoRA: the plain base UNet no longer matches
    expected = video(model, *inputs)
    assert not torch.allclose(video(inflate(unet, extract_adapter(model)), *inputs), expected, atol=1e-3)
    spatial = spatial_unet_from_video(model, unet)
    assert not any("lora" in k for k in spatial.state_dict())
    extract_adapter(model).save_pretrained(tmp_path / "adapter")
    spatial.save_pretrained(tmp_path / "adapter" / SPATIAL_UNET)
    pipe = video_pipeline(tiny_sd_dir, tmp_path / "adapter")  # picks up adapter/unet
    assert torch.allclose(video(pipe.unet, *inputs), expected, atol=1e-5)
    plain = AnimateDiffPipeline.from_pretrained(  # diffusers alone, offline
        tiny_sd_dir, unet=UNet2DConditionModel.from_pretrained(tmp_path / "adapter" / SPATIAL_UNET),
        motion_adapter=MotionAdapter.from_pretrained(tmp_path / "adapter"), local_files_only=True)
    assert torch.allclose(video(plain.unet, *inputs), expected, atol=1e-5)


def test_shipped_motion_adapter_loads_offline_and_generates_8_frames():
    from mmalign.demo.diffusion import BASE_PIPELINE
    from mmalign.demo.video import MOTION_ADAPTER

    extra = ({"unet": UNet2DConditionModel.from_pretrained(MOTION_ADAPTER / SPATIAL_UNET)}
             if (MOTION_ADAPTER / SPATIAL_UNET).is_dir() else {})
    pipe = AnimateDiffPipeline.from_pretrained(BASE_PIPELINE, motion_adapter=MotionAdapter.from_pretrained(
        MOTION_ADAPTER), local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle moving right", num_frames=8, num_inference_steps=2, height=32, width=32,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.frames.shape == (1, 8, 32, 32, 3)
