"""A video model's own text encoder (mmalign.video.text): trained jointly with the motion modules, shipped in the
adapter's text_encoder/ and used by every video path (video_pipeline, VideoMethod.build, the DPO export), while
the image pipeline keeps its own."""
import json
import random

import pytest
import torch
from transformers import CLIPTextModel

from mmalign.core.config import Experiment, TrainConfig
from mmalign.core.trainer import train
from mmalign.datasets.shapeworld.video import sample_clip
from mmalign.video.methods import VideoConfig, VideoDataConfig, VideoDiffusionDPO, VideoModelConfig
from mmalign.video.sampling import video_pipeline
from mmalign.video.text import (TEXT_ENCODER, VideoTextTemporalTraining, direction_swaps, separation_loss,
                                shipped_text_encoder, text_encoder_differs, token_ids, word_ids)

pytestmark = pytest.mark.usefixtures("one_thread")
F = 4


def clips(n, seed=0):
    rng = random.Random(seed)
    return [(c.caption, c.frames) for c in (sample_clip(rng, F, 32) for _ in range(n))]


def config(tiny_sd_dir, **model):
    return VideoConfig(VideoModelConfig(pretrained=str(tiny_sd_dir), motion_heads=4, **model),
                       VideoDataConfig(num_frames=F))


def run(method, out, steps=2, lr=1e-2):
    exp = Experiment("video_temporal", str(out), TrainConfig(lr=lr, max_steps=steps, batch_size=2, log_every=1,
                                                             resume="never"), method.cfg)
    train(exp, method)
    return [json.loads(x) for x in open(out / "metrics.jsonl")]


def test_direction_swaps_and_separation_hinge(tiny_sd_dir):
    method = VideoTextTemporalTraining(config(tiny_sd_dir), "unused", data=clips(1), sep_weight=1.0)
    policy = method.build(torch.device("cpu"))
    words = word_ids(method.parts.tokenizer, ("left", "right", "up", "down"))
    ids = token_ids(method.parts.tokenizer, ["a red circle moving left", "a blue square moving up"])
    alts = direction_swaps(ids, words)
    assert alts.shape == (2, 3, ids.shape[1])
    assert sorted(int(a[(a != ids[0]).nonzero()[0, 0]]) for a in alts[0]) == sorted(words[1:])
    assert ((alts[1] != ids[1]).sum(dim=-1) == 1).all()  # only the direction token changes
    assert separation_loss(policy, ids, words, margin=1e6).item() > 0
    assert separation_loss(policy, ids, words, margin=0.0).item() == 0
    with pytest.raises(ValueError, match="exactly one direction"):
        direction_swaps(token_ids(method.parts.tokenizer, ["a red circle"]), words)


def test_joint_text_training_ships_a_text_encoder_every_video_path_uses(tiny_sd_dir, tmp_path):
    first = VideoTextTemporalTraining(config(tiny_sd_dir), str(tmp_path / "first"), data=clips(2), sep_weight=1.0)
    log = run(first, tmp_path / "first")
    assert "sep_loss" in log[0] and "model_err" in log[0]
    adapter = tmp_path / "first/final/motion_adapter"
    trained = shipped_text_encoder(adapter)
    base_te = CLIPTextModel.from_pretrained(tiny_sd_dir, subfolder="text_encoder")
    assert trained is not None and text_encoder_differs(trained, base_te)  # it trained and travels with the adapter
    assert not (adapter / "unet").exists()  # the image UNet did not train

    pipe = video_pipeline(tiny_sd_dir, adapter)
    assert not text_encoder_differs(pipe.text_encoder, trained)
    assert not text_encoder_differs(CLIPTextModel.from_pretrained(tiny_sd_dir, subfolder="text_encoder"), base_te)
    full = tmp_path / "first/final/pipeline/text_encoder"
    assert not text_encoder_differs(CLIPTextModel.from_pretrained(full), trained)  # the full pipeline has it too

    # Video-DPO on top: the frozen shipped text encoder encodes the captions and is exported with the result
    dpo = VideoDiffusionDPO(config(tiny_sd_dir, motion_adapter=str(adapter)), str(tmp_path / "dpo"))
    dpo.data = [(c, f, f[::-1]) for c, f in clips(2)]
    run(dpo, tmp_path / "dpo", steps=1)
    assert not text_encoder_differs(dpo.parts.text_encoder, trained)
    assert not any(p.requires_grad for p in dpo.parts.text_encoder.parameters())
    assert not text_encoder_differs(shipped_text_encoder(tmp_path / "dpo/final/motion_adapter"), trained)


def test_plain_temporal_training_ships_no_text_encoder(tiny_sd_dir, tmp_path):
    from mmalign.video.methods import VideoTemporalTraining

    plain = VideoTemporalTraining(config(tiny_sd_dir), str(tmp_path), data=clips(2))
    run(plain, tmp_path, steps=1)
    assert not (tmp_path / "final/motion_adapter" / TEXT_ENCODER).exists()
    assert shipped_text_encoder(tmp_path / "final/motion_adapter") is None
