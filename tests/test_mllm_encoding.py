"""Encoding conversations for training: prompt/answer split from the chat template, side inputs passed through,
truncation that never cuts an image span, image-token checks naming the row, multi-turn masks; SFT and SteerLM
through the core loop."""
import json
import types

import pytest
import torch
from PIL import Image

from mmalign.core.config import ConfigError, Experiment, TrainConfig
from mmalign.core.trainer import train
from mmalign.datasets.records import DataError, SkipReport
from mmalign.mllm.data import Encoder, collate_pairs, conversation_pieces
from mmalign.mllm.encoding import (ImageTokenMismatch, check_image_tokens, encode_pieces, expected_image_tokens,
                                   image_token_id, pad_batch, render)
from mmalign.mllm.models import VLModelConfig, load_vlm
from mmalign.mllm.sft import MLLMSFT, MLLMSteerLM, SteerConfig, VLConversationDataConfig, VLSFTConfig, steer_messages


def user(*parts):
    return {"role": "user", "content": [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def image(rgb=(220, 40, 40)):
    return Image.new("RGB", (32, 32), rgb)


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    return load_vlm(tiny_llava_dir)


def pair(prompt, chosen, rejected, where="data.jsonl:3"):
    return types.SimpleNamespace(prompt=prompt, chosen=[assistant(chosen)], rejected=[assistant(rejected)], meta={},
                                 where=where)


def test_pair_split_trains_only_the_answers(llava):
    model, proc = llava
    enc = Encoder(proc, model.config, None, "error", SkipReport())
    row = enc.pair(0, pair([user(None, "What colour is the circle?")], "red", "a blue square"), [image()], None)
    tok = proc.tokenizer
    trained_c = [t for t, m in zip(row.chosen.ids, row.chosen.train_mask) if m]
    trained_r = [t for t, m in zip(row.rejected.ids, row.rejected.train_mask) if m]
    assert tok.convert_ids_to_tokens(trained_c) == ["red", "<|end|>"]
    assert tok.convert_ids_to_tokens(trained_r) == ["a", "blue", "square", "<|end|>"]
    assert row.chosen.ids[:row.chosen.prompt_len] == row.rejected.ids[:row.rejected.prompt_len]
    assert row.chosen.ids.count(image_token_id(proc)) == expected_image_tokens(model.config) == 16


class SideInputs:
    """The tiny processor plus LLaVA-NeXT/Gemma-style side inputs: image_sizes per image, token_type_ids per token."""

    def __init__(self, proc):
        self.proc, self.tokenizer, self.image_token = proc, proc.tokenizer, proc.image_token

    def apply_chat_template(self, *a, **k):
        return self.proc.apply_chat_template(*a, **k)

    def __call__(self, text, images=None, **kw):
        out = self.proc(text=text, images=images, **kw)
        if images:
            out["image_sizes"] = torch.tensor([[im.height, im.width] for im in images])
            out["token_type_ids"] = (out["input_ids"] == image_token_id(self.proc)).long()
        return out


def test_side_inputs_pass_through_in_order(llava):
    model, proc = llava
    side = SideInputs(proc)
    enc = Encoder(side, model.config, None, "error", SkipReport())
    rows = [enc.pair(i, pair([user(None, "What colour is the circle?")], "red", "blue green"), [image()], None)
            for i in range(2)]
    rows[1] = enc.pair(1, pair([user(None, "Is there a circle?")], "yes", "no"), [Image.new("RGB", (40, 24))], None)
    batch = collate_pairs(rows, proc.tokenizer.pad_token_id)["pairs"]
    # [chosen rows; rejected rows]: image tensors duplicated in the same order
    assert batch["image_sizes"].tolist() == [[32, 32], [24, 40], [32, 32], [24, 40]]
    assert batch["pixel_values"].shape[0] == 4
    assert torch.equal(batch["token_type_ids"].bool(), batch["input_ids"] == image_token_id(proc))


def test_truncation_keeps_image_span_and_counts_skips(llava):
    model, proc = llava
    prompt = [user(None, "Describe the image.")]
    full = Encoder(proc, model.config, None, "error", SkipReport()).pair(0, pair(prompt, "a red circle", "x"),
                                                                         [image()], None)
    p_len = full.chosen.prompt_len
    report = SkipReport()
    cut = Encoder(proc, model.config, p_len + 1, "skip", report).pair(0, pair(prompt, "a red circle", "x"), [image()],
                                                                      None)
    assert len(cut.chosen.ids) == p_len + 1 and sum(cut.chosen.train_mask) == 1  # only "a" left
    assert Encoder(proc, model.config, p_len, "skip", report).pair(1, pair(prompt, "a", "b"), [image()], None) is None
    assert sum(report.skipped.values()) == 1 and "too long" in next(iter(report.skipped))
    with pytest.raises(DataError, match="data.jsonl:3"):
        Encoder(proc, model.config, p_len, "error", SkipReport()).pair(1, pair(prompt, "a", "b"), [image()], None)


def test_truncation_never_cuts_a_later_image(llava):
    model, proc = llava
    msgs = [user(None, "What colour is the circle?"), assistant("red"), user(None, "And this one?"), assistant("blue")]
    enc = Encoder(proc, model.config, None, "error", SkipReport())
    full = enc.conversation(0, msgs, [image(), image((40, 70, 220))], "conv 0")
    second_image_end = max(i for i, t in enumerate(full.ids) if t == image_token_id(proc))
    report = SkipReport()
    short = Encoder(proc, model.config, second_image_end, "skip", report)
    assert short.conversation(0, msgs, [image(), image()], "conv 0") is None
    assert "image span" in str(report.to_dict())
    ok = Encoder(proc, model.config, second_image_end + 2, "skip", SkipReport())
    assert ok.conversation(0, msgs, [image(), image()], "conv 0") is not None


def test_multi_turn_mask_covers_each_assistant_turn(llava):
    model, proc = llava
    msgs = [user(None, "What colour is the circle?"), assistant("red"), user("How many shapes are there?"),
            assistant("two")]
    pieces = conversation_pieces(proc, msgs)
    assert [t for t, trained in pieces if trained] == [" red <|end|>\n", " two <|end|>\n"]
    assert "".join(t for t, _ in pieces) == render(proc, msgs)
    enc = encode_pieces(proc, pieces, [image()])
    trained = [t for t, m in zip(enc.ids, enc.train_mask) if m]
    assert proc.tokenizer.convert_ids_to_tokens(trained) == ["red", "<|end|>", "two", "<|end|>"]


def test_image_token_mismatches_name_the_row(llava):
    model, proc = llava
    enc = Encoder(proc, model.config, None, "error", SkipReport())
    two_placeholders = [user(None, None, "Which is red?")]
    with pytest.raises(DataError, match="data.jsonl:3.*image"):
        enc.pair(0, pair(two_placeholders, "left", "right"), [image()], None)
    # the classic LLaVA pitfall: a processor that forgets the CLS token's extra image token
    good = encode_pieces(proc, [(render(proc, [user(None, "hi")], True), False)], [image()])
    drop = good.ids.index(image_token_id(proc))
    short = type(good)(good.ids[:drop] + good.ids[drop + 1:], good.train_mask[1:])
    with pytest.raises(ImageTokenMismatch, match="row 7: 15 image tokens for 1 image.*16 per image"):
        check_image_tokens(short, 1, image_token_id(proc), expected_image_tokens(model.config), "row 7")


def test_steer_messages_and_missing_attributes():
    msgs = steer_messages([user("hi"), assistant("yo")], {"correctness": 1.0, "helpfulness": 0.5},
                          ["correctness", "helpfulness"])
    assert msgs[0] == {"role": "system",
                       "content": [{"type": "text", "text": "attributes: correctness 1 , helpfulness 0.5"}]}
    with pytest.raises(ValueError, match="verbosity"):
        steer_messages([user("hi")], {"correctness": 1}, ["correctness", "verbosity"])
    with pytest.raises(ConfigError, match="steer.attributes"):
        MLLMSteerLM(VLSFTConfig(model=VLModelConfig(pretrained="x"), data=VLConversationDataConfig(path="x")), "o")


@pytest.fixture(scope="module")
def conversations_dir(tmp_path_factory):
    from mmalign.datasets.vl_records import write_vl_conversations_jsonl

    out = tmp_path_factory.mktemp("vl_conv")
    rows = []
    for i, (name, rgb) in enumerate([("red", (220, 40, 40)), ("blue", (40, 70, 220))] * 4):
        attrs = {"correctness": i % 2, "verbosity": 1} if i != 7 else {"verbosity": 1}  # row 7 lacks one
        rows.append(([image(rgb)], [user("What colour is the circle?"), assistant(name)], {"attributes": attrs}))
    write_vl_conversations_jsonl(out, rows)
    return str(out)


@pytest.mark.parametrize("steer", [False, True])
def test_sft_and_steerlm_train_and_export(tiny_llava_dir, conversations_dir, tmp_path, steer):
    from transformers import AutoModelForImageTextToText

    cls = MLLMSteerLM if steer else MLLMSFT
    cfg = VLSFTConfig(model=VLModelConfig(pretrained=tiny_llava_dir), data=VLConversationDataConfig(
        path=conversations_dir), steer=SteerConfig(attributes=["correctness", "verbosity"] if steer else []))
    method = cls(cfg, str(tmp_path))
    train(Experiment(method="mllm_sft", output_dir=str(tmp_path), args=cfg,
                     train=TrainConfig(max_steps=3, batch_size=4, lr=3e-3, log_every=1)), method)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")]
    assert len(losses) == 3 and losses[-1] < losses[0]
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["encoded"] == (7 if steer else 8)
    model = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "final"))
    assert not torch.equal(model.lm_head.weight, load_vlm(tiny_llava_dir)[0].lm_head.weight)
