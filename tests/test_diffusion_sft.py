"""Diffusion SFT on the core trainer: held-out denoising loss falls; exports load in diffusers."""
import json

import numpy as np
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from PIL import Image

from mmalign.core.config import load_experiment
from mmalign.core.trainer import train
from mmalign.datasets.records import DataError, read_caption_folder
from mmalign.datasets.shapeworld.export import write_dataset
from mmalign.diffusion.pipeline import load_sd_components, tokenize
from mmalign.diffusion.sft import DiffusionSFT, SFTConfig
from mmalign.diffusion.tokenizers import clip_bpe_tokenizer


def pixels(rows) -> torch.Tensor:
    """Images of caption rows as a [-1, 1] batch, the SFT method's preprocessing at native resolution."""
    x = torch.stack([torch.from_numpy(np.array(Image.open(r.image_path).convert("RGB"))) for r in rows])
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def heldout_denoising_loss(pipe_dir, folder, n=32) -> float:
    """Denoising MSE on held-out images at fixed (t, noise): the same draws for every model compared."""
    p = load_sd_components(str(pipe_dir))
    rows = read_caption_folder(folder)[0][:n]
    x = pixels(rows)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        lat = p.vae.encode(x).latent_dist.mean * p.vae.config.scaling_factor
        noise = torch.randn(lat.shape, generator=g)
        t = torch.linspace(50, 950, len(lat)).long()
        ctx = p.text_encoder(tokenize(p.tokenizer, [r.caption for r in rows]))[0]
        pred = p.unet(p.noise_scheduler.add_noise(lat, noise, t), t, ctx).sample
    return float((pred - noise).pow(2).mean())


def write_recipe(tmp_path, pipe_dir, data_dir, **extra) -> str:
    cfg = {"method": "diffusion_sft", "output_dir": str(tmp_path / "run"),
           "train": {"lr": 2e-3, "max_steps": 40, "batch_size": 16, "log_every": 10, "seed": 0},
           "model": {"pretrained": str(pipe_dir)}, "data": {"path": str(data_dir)}}
    for k, v in extra.items():
        cfg[k].update(v)
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_clip_bpe_tokenizer_matches_open_clip(tmp_path):
    import open_clip

    tok = clip_bpe_tokenizer(tmp_path, model_max_length=77)
    text = "a photo of two red circles left of a blue square, 1024px!"
    ours = tok(text, padding="max_length", max_length=77).input_ids
    theirs = open_clip.get_tokenizer("ViT-B-32")([text])[0].tolist()
    n = theirs.index(49407) + 1  # open_clip pads with 0; SD1.5's tokenizer pads with <|endoftext|>
    assert ours[:n] == theirs[:n] and n > 10
    assert set(ours[n:]) == {49407}
    assert len(tok) == 49408


def test_sft_reduces_heldout_denoising_loss(tmp_path, tiny_sd_dir, shapeworld_folder):
    held = tmp_path / "held"
    write_dataset(held, 32, seed=99, split="heldout")
    before = heldout_denoising_loss(tiny_sd_dir, held)
    recipe = write_recipe(tmp_path, tiny_sd_dir, shapeworld_folder)
    exp = load_experiment(recipe, [], SFTConfig)
    summary = train(exp, DiffusionSFT(exp.args, exp.output_dir))
    after = heldout_denoising_loss(tmp_path / "run/final", held)
    assert after < 0.8 * before, (before, after)
    logged = [json.loads(l) for l in open(tmp_path / "run/metrics.jsonl")]
    assert logged[-1]["step"] == 40 and "model_err" in logged[-1]
    assert json.loads((tmp_path / "run/data_report.json").read_text())["kept"] == 96
    assert summary["step"] == 40


def test_lora_export_loads_with_load_lora_weights(tmp_path, tiny_sd_dir, shapeworld_folder):
    recipe = write_recipe(tmp_path, tiny_sd_dir, shapeworld_folder, train={"max_steps": 3},
                          model={"lora_rank": 4})
    exp = load_experiment(recipe, [], SFTConfig)
    method = DiffusionSFT(exp.args, exp.output_dir)
    train(exp, method)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 16, 32)
    with torch.no_grad():
        base = pipe.unet(x, t, ctx).sample
        pipe.load_lora_weights(str(tmp_path / "run/final"))
        with_lora = pipe.unet(x, t, ctx).sample
        pipe.unload_lora_weights()
        unloaded = pipe.unet(x, t, ctx).sample
    assert not torch.allclose(base, with_lora, atol=1e-6)
    assert torch.allclose(base, unloaded, atol=1e-6)
    # only the adapter was trained: the frozen UNet inside the method still equals the base
    trained = {n for n, p in method.parts.unet.named_parameters() if p.requires_grad}
    assert trained and all("lora" in n for n in trained)


def test_corrupt_rows_are_counted_not_fatal(tmp_path, tiny_sd_dir, shapeworld_folder):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapeworld_folder, data)
    (data / "images/000003.png").write_bytes(b"garbage")
    (data / "images/000004.png").unlink()
    recipe = write_recipe(tmp_path, tiny_sd_dir, data, train={"max_steps": 1})
    exp = load_experiment(recipe, [], SFTConfig)
    train(exp, DiffusionSFT(exp.args, exp.output_dir))
    report = json.loads((tmp_path / "run/data_report.json").read_text())
    assert report["kept"] == 94
    assert report["skipped"] == {"unreadable image": 1, "image file not found": 1}
    exp.args.data.bad_rows = "error"
    strict = DiffusionSFT(exp.args, str(tmp_path / "run2"))
    strict.build(torch.device("cpu"))
    with pytest.raises(DataError, match=r"000003\.png.*unreadable image"):  # the first bad row, in file order
        strict.dataset()


def test_random_flip_keeps_captions_aligned_with_latents(tmp_path, tiny_sd_dir, shapeworld_folder):
    recipe = write_recipe(tmp_path, tiny_sd_dir, shapeworld_folder,
                          data={"random_flip": True, "encode_batch": 7, "shard_rows": 40})
    exp = load_experiment(recipe, [], SFTConfig)
    flip = DiffusionSFT(exp.args, exp.output_dir)
    flip.build(torch.device("cpu"))
    ds, report = flip.dataset()
    exp.args.data.random_flip = False
    plain = DiffusionSFT(exp.args, str(tmp_path / "plain"))
    plain.build(torch.device("cpu"))
    ref, _ = plain.dataset()
    assert len(ds) == 2 * len(ref) == 192 and report.kept == 96
    # every cached row's text is the text of the image it was encoded from: rows 2i (as is) and 2i + 1 (mirrored)
    for i in range(len(ref)):
        a, b = ds[2 * i], ds[2 * i + 1]
        assert torch.equal(a["text"], ref[i]["text"]) and torch.equal(b["text"], ref[i]["text"])
        assert torch.allclose(a["mean"], ref[i]["mean"], atol=1e-5)
        if i % 13 == 0:  # the flipped row holds the latent of the flipped image
            x = pixels(read_caption_folder(shapeworld_folder)[0][i:i + 1]).flip(-1)
            with torch.no_grad():
                want = flip.parts.vae.encode(x).latent_dist.mean[0]
            assert torch.allclose(b["mean"], want, atol=1e-4)


def test_cache_dir_is_used_and_a_changed_image_is_a_new_entry(tmp_path, tiny_sd_dir, shapeworld_folder):
    import os
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapeworld_folder, data)
    cache = tmp_path / "cache"
    recipe = write_recipe(tmp_path, tiny_sd_dir, data, data={"cache_dir": str(cache)})
    exp = load_experiment(recipe, [], SFTConfig)

    def entry_of():
        method = DiffusionSFT(exp.args, exp.output_dir)
        method.build(torch.device("cpu"))
        rows, _ = method.dataset()
        return rows.rows.entry, len(rows)

    first, n = entry_of()
    assert n == 96 and not (tmp_path / "run/data_cache").exists()
    assert {p.parent for p in cache.glob("*/index.json")} == {first}
    assert entry_of()[0] == first  # a hit
    img = data / "images/000005.png"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the same folder listing size, a newer image
    assert len(list(cache.glob("*/index.json"))) == 1
    entry_of()
    assert len(list(cache.glob("*/index.json"))) == 2
