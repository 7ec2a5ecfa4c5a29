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
