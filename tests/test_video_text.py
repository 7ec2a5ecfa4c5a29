"""A video model's own text encoder (mmalign.video.text): trained jointly with the motion modules, shipped in the
adapter's text_encoder/ and used by every video path (video_pipeline, VideoMethod.build, the DPO export), while
the image pipeline keeps its own."""
import json
import math
import random

import pytest
import torch
from transformers import CLIPTextModel

from mmalign.core.config import Experiment, TrainConfig
from mmalign.core.trainer import train
from mmalign.datasets.shapeworld.video import sample_clip
from mmalign.video.methods import VideoConfig, VideoDataConfig, VideoDiffusionDPO, VideoModelConfig
from mmalign.video.sampling import video_pipeline
from mmalign.video.text import (TEXT_ENCODER, VideoTextTemporalTraining, caption_contrast_loss, direction_swaps,
                                separation_loss, shipped_text_encoder, text_encoder_differs, token_ids, word_ids)

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


def test_caption_contrast_loss_by_hand_and_against_pairwise_logistic():
    # relative gaps 1 % and 2 % at tau 0.01: logits 0, -1, -2 after the shared shift
    loss, best = caption_contrast_loss(torch.tensor([[1.0, 1.01, 1.02], [2.0, 1.98, 2.02]]), 0.01)
    row0 = math.log(1 + math.exp(-1) + math.exp(-2))  # 0.40760
    row1 = math.log(1 + math.exp(1) + math.exp(-1))  # the first swap fits better: gap -1 %
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-5)
    assert best.item() == 0.5
    # one swap: the softmax over two captions is the logistic loss on their relative gap
    e = torch.tensor([[0.3, 0.33], [0.5, 0.49]])
    two, _ = caption_contrast_loss(e, 0.05)
    logistic = torch.nn.functional.softplus(-(e[:, 1] - e[:, 0]) / (0.05 * e[:, 0])).mean()
    assert two.item() == pytest.approx(logistic.item(), rel=1e-6)
    # the true caption's error is the scale, not a gradient path: d/de_0 comes from the logit alone
    e = torch.tensor([[1.0, 1.01]], requires_grad=True)
    caption_contrast_loss(e, 0.01)[0].backward()
    p_true = 1 / (1 + math.exp(-1))
    assert e.grad[0, 0].item() == pytest.approx((1 - p_true) / 0.01, rel=1e-4)
    with pytest.raises(ValueError, match="B, 1 \\+ K"):
        caption_contrast_loss(torch.ones(3), 0.01)


def test_caption_contrast_training_logs_the_direction_gap_and_trains_the_text_encoder(tiny_sd_dir, tmp_path):
    method = VideoTextTemporalTraining(config(tiny_sd_dir), str(tmp_path), data=clips(2), contrast_weight=1.0)
    log = run(method, tmp_path, steps=2)
    for key in ("contrast_loss", "true_caption_best", "direction_gap", "model_err"):
        assert all(key in row and math.isfinite(row[key]) for row in log), key
    assert log[0]["contrast_loss"] == pytest.approx(math.log(4), abs=0.3)  # four captions, barely apart at start
    trained = shipped_text_encoder(tmp_path / "final/motion_adapter")
    assert text_encoder_differs(trained, CLIPTextModel.from_pretrained(tiny_sd_dir, subfolder="text_encoder"))


def test_caption_contrast_with_the_text_encoder_frozen_trains_only_the_video_side(tiny_sd_dir, tmp_path):
    method = VideoTextTemporalTraining(config(tiny_sd_dir, lora_rank=2, lora_where="cross"), str(tmp_path),
                                       data=clips(2), contrast_weight=1.0, text_trainable=False)
    log = run(method, tmp_path, steps=2)
    assert all("contrast_loss" in row for row in log)
    assert not text_encoder_differs(method.parts.text_encoder,
                                    CLIPTextModel.from_pretrained(tiny_sd_dir, subfolder="text_encoder"))
    assert shipped_text_encoder(tmp_path / "final/motion_adapter") is None  # unchanged: the base's is used
    assert (tmp_path / "final/motion_adapter/unet").exists()  # the cross-attention LoRA trained and ships fused
