"""Shared fixtures: tiny diffusion pipelines built from configs (no hub), ShapeWorld folders."""
import copy

import pytest
import torch

from mmalign.diffusion.tiny import build_pipeline, load_architecture

torch.set_num_threads(2)


def tiny_arch() -> dict:
    """The ShapeWorld architecture shrunk further for fast tests."""
    arch = copy.deepcopy(load_architecture("configs/models/shapeworld_sd_tiny.yaml"))
    arch["vae"].update(block_out_channels=[8, 16], norm_num_groups=4)
    arch["unet"].update(block_out_channels=[16, 32], norm_num_groups=4, cross_attention_dim=32,
                        attention_head_dim=4)
    arch["text_encoder"].update(hidden_size=32, intermediate_size=64, num_attention_heads=2, projection_dim=32)
    return arch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and a second thread stalls on a busy shared CPU (~10x slower).
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A StableDiffusion3Pipeline directory built from configs (mmalign.diffusion.tiny_flow), random weights."""
    from mmalign.diffusion.tiny_flow import build_sd3_pipeline

    out = tmp_path_factory.mktemp("tiny_sd3") / "pipe"
    build_sd3_pipeline().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A FluxPipeline directory built from configs, random weights."""
    from mmalign.diffusion.tiny_flow import build_flux_pipeline

    out = tmp_path_factory.mktemp("tiny_flux") / "pipe"
    build_flux_pipeline().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A StableDiffusionPipeline directory with the real CLIP BPE tokenizer (as SD1.5 has), random weights."""
    from mmalign.diffusion.tokenizers import clip_bpe_tokenizer

    root = tmp_path_factory.mktemp("tiny_sd")
    tok = clip_bpe_tokenizer(root / "bpe", model_max_length=16)
    pipe = build_pipeline(tiny_arch(), seed=0, tokenizer=tok)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="session")
def shapeworld_folder(tmp_path_factory):
    from mmalign.datasets.shapeworld.export import write_dataset

    root = tmp_path_factory.mktemp("sw") / "data"
    write_dataset(root, 96, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A StableDiffusionXLPipeline directory (two CLIP text encoders, text_time UNet) with the real CLIP BPE
    tokenizer for both encoders, random weights."""
    from mmalign.diffusion.tiny import build_sdxl_pipeline
    from mmalign.diffusion.tokenizers import clip_bpe_tokenizer

    root = tmp_path_factory.mktemp("tiny_sdxl")
    tok = clip_bpe_tokenizer(root / "bpe", model_max_length=16)
    pipe = build_sdxl_pipeline(tiny_arch(), seed=0, tokenizer=tok)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A LLaVA directory (tiny CLIP tower, projector, Llama LM, word-level chat tokenizer, processor), random
    weights, saved with save_pretrained."""
    from mmalign.mllm.tiny import build_tiny_llava, load_architecture

    model, processor = build_tiny_llava(load_architecture("configs/models/shapeworld_llava_tiny.yaml"), seed=0)
    out = tmp_path_factory.mktemp("tiny_llava")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


def colour_pairs(n: int):
    """(images, prompt, chosen, rejected, meta) rows about one-colour images, for the MLLM tests."""
    from PIL import Image

    colours = [("red", (220, 40, 40)), ("blue", (40, 70, 220)), ("green", (40, 170, 60)), ("yellow", (225, 200, 20))]
    rows = []
    for i in range(n):
        name, rgb = colours[i % 4]
        wrong = colours[(i + 1) % 4][0]
        rows.append(([Image.new("RGB", (32, 32), rgb)], "What colour is the circle?",
                     name if i % 2 else f"a {name} circle", f"two {wrong} squares" if i % 3 else wrong,
                     {"margin": float(i % 3)}))
    return rows


@pytest.fixture(scope="session")
def vl_pairs_dir(tmp_path_factory):
    from mmalign.datasets.vl_records import write_vl_pairs_jsonl

    out = tmp_path_factory.mktemp("vl_pairs")
    write_vl_pairs_jsonl(out, colour_pairs(8))
    return str(out)
