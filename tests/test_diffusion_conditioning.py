"""The SD1.5/SDXL-agnostic conditioning interface of mmalign.diffusion.pipeline, checked against diffusers."""
import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.diffusion.pipeline import (denoise, encode_prompts, load_sd_components, make_time_ids,
                                        pipeline_class, preprocess, unet_kwargs)

PROMPTS = ["a red square left of a blue circle", "green triangle"]


@pytest.fixture(scope="module")
def sd_parts(tiny_sd_dir):
    return load_sd_components(str(tiny_sd_dir))


@pytest.fixture(scope="module")
def sdxl_parts(tiny_sdxl_dir):
    return load_sd_components(str(tiny_sdxl_dir))


def _sdxl_cond(parts, n=2, time_ids=None):
    cond = encode_prompts(parts, PROMPTS[:n], "cpu")
    cond["time_ids"] = time_ids if time_ids is not None else make_time_ids(
        torch.tensor([[40, 64]] * n), torch.tensor([[0, 10]] * n), (32, 32))
    return cond


def test_sd15_components_and_encode_prompts_match_diffusers(sd_parts, tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    assert not sd_parts.is_sdxl and sd_parts.text_encoder_2 is None and sd_parts.tokenizer_2 is None
    assert pipeline_class(sd_parts) is StableDiffusionPipeline
    cond = encode_prompts(sd_parts, PROMPTS, "cpu")
    assert set(cond) == {"ctx"} and cond["ctx"].shape == (2, 16, 32) and cond["ctx"].dtype == torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None,
                                                   requires_safety_checker=False)
    ref, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, do_classifier_free_guidance=False)
    torch.testing.assert_close(cond["ctx"], ref.detach())
    torch.testing.assert_close(encode_prompts(sd_parts, PROMPTS, "cpu", batch=1)["ctx"], cond["ctx"])


def test_sdxl_components_and_encode_prompts_match_diffusers(sdxl_parts, tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    assert sdxl_parts.is_sdxl and sdxl_parts.text_encoder is not None
    assert type(sdxl_parts.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipeline_class(sdxl_parts) is StableDiffusionXLPipeline
    assert sdxl_parts.resolution == 32
    cond = encode_prompts(sdxl_parts, PROMPTS, "cpu", batch=1)
    assert cond["ctx"].shape == (2, 16, 64) and cond["pooled"].shape == (2, 32)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir))
    ctx, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(cond["ctx"], ctx.detach())
    torch.testing.assert_close(cond["pooled"], pooled.detach())
    pipe.set_progress_bar_config(disable=True)  # the saved tiny SDXL pipeline reloads and samples
    image = pipe(PROMPTS[0], num_inference_steps=1, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    # ctx comes from the penultimate layer, not the last hidden state
    last = sdxl_parts.text_encoder(sdxl_parts.tokenizer(PROMPTS, padding="max_length", max_length=16,
                                                        return_tensors="pt").input_ids)[0]
    assert not torch.allclose(cond["ctx"][..., :32], last.detach())


def test_vae_stays_fp32_in_half_precision(tiny_sdxl_dir):
    parts = load_sd_components(str(tiny_sdxl_dir), torch.float16)
    assert parts.vae.dtype == torch.float32
    assert parts.unet.dtype == parts.text_encoder.dtype == parts.text_encoder_2.dtype == torch.float16


def _image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_preprocess_sizes_crop_and_flip():
    from torchvision.transforms import v2 as T

    im = _image(40, 64)  # h=40, w=64: resized to 32 x int(32*64/40)=51, crop left round((51-32)/2)=round(9.5)=10
    x, info = preprocess(im, 32)
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert info == {"original_size": (40, 64), "crop_top_left": (0, 10)}
    ref = T.Compose([T.Resize(32), T.CenterCrop(32), T.PILToTensor(), T.ToDtype(torch.float32, scale=True),
                     T.Normalize([0.5] * 3, [0.5] * 3)])(im)  # torchvision's (and sft.py's) transform
    torch.testing.assert_close(x, ref)
    xf, info_f = preprocess(im, 32, flip=True)
    torch.testing.assert_close(xf, x.flip(-1))
    assert info_f["crop_top_left"] == (0, 51 - 10 - 32)  # the same crop, seen in the mirrored resized image
    _, info_p = preprocess(_image(64, 40), 32)  # portrait: resized 51 x 32
    assert info_p == {"original_size": (64, 40), "crop_top_left": (10, 0)}


def test_make_time_ids_values():
    ids = make_time_ids(torch.tensor([[40, 64], [100, 50]]), torch.tensor([[0, 10], [3, 0]]), (32, 48))
    assert ids.dtype == torch.float32
    assert ids.tolist() == [[40, 64, 0, 10, 32, 48], [100, 50, 3, 0, 32, 48]]


def _sdxl_inputs(parts):
    """(unet, x_t, t, cond) for a 2-sample SDXL forward, seeded."""
    torch.manual_seed(0)
    return parts.unet, torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), _sdxl_cond(parts)


def test_denoise_sdxl_uses_time_ids_and_requires_them(sdxl_parts):
    unet, x, t, cond = _sdxl_inputs(sdxl_parts)
    with torch.no_grad():
        out = denoise(unet, x, t, cond)
        direct = unet(x, t, cond["ctx"], added_cond_kwargs={"text_embeds": cond["pooled"],
                                                             "time_ids": cond["time_ids"]}).sample
        other = denoise(unet, x, t, {**cond, "time_ids": make_time_ids(
            torch.tensor([[1024, 768]] * 2), torch.tensor([[0, 0]] * 2), (32, 32))})
    assert out.shape == x.shape
    torch.testing.assert_close(out, direct)
    assert (out - other).abs().max() > 1e-4  # time_ids reach the UNet
    no_ids = {k: v for k, v in cond.items() if k != "time_ids"}
    with pytest.raises(KeyError, match="time_ids"):
        denoise(unet, x, t, no_ids)
    with pytest.raises(KeyError, match="time_ids"):
        unet_kwargs(no_ids)
    with pytest.raises(KeyError, match="pooled"):
        denoise(unet, x, t, {"ctx": cond["ctx"]})
    with pytest.raises(ValueError, match=r"\[2, 6\]"):
        denoise(unet, x, t, {**cond, "time_ids": cond["time_ids"][:1]})


def test_denoise_sd15(sd_parts):
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 500])
    cond = encode_prompts(sd_parts, PROMPTS, "cpu")
    assert unet_kwargs(cond).keys() == {"encoder_hidden_states"}
    with torch.no_grad():
        torch.testing.assert_close(denoise(sd_parts.unet, x, t, cond), sd_parts.unet(x, t, cond["ctx"]).sample)


def test_sdxl_lora_export_loads_with_load_lora_weights(tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig

    from mmalign.diffusion.lora import save_unet_lora

    parts = load_sd_components(str(tiny_sdxl_dir))
    unet, x, t, cond = _sdxl_inputs(parts)
    with torch.no_grad():
        base = denoise(unet, x, t, cond)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:  # lora_B starts at zero: randomise so the adapter has an effect
                p.normal_(0, 0.2)
        trained = denoise(unet, x, t, cond)
    assert (trained - base).abs().max() > 1e-3
    # lora_alpha != r: without the adapter metadata, load_lora_weights assumes alpha = r and the loaded
    # adapter's effect is scaled by r/alpha (seen: max |diff| 1.2 here) -- exports must pass it.
    save_unet_lora(StableDiffusionXLPipeline, unet, str(tmp_path))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl_dir))
    pipe.load_lora_weights(tmp_path)
    with torch.no_grad():
        loaded = denoise(pipe.unet, x, t, cond)
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)
