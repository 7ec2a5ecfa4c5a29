"""The MLLM code path on checkpoints other than LLaVA-1.5, built tiny from configs (mmalign.mllm.tiny_others)
and loaded back through AutoProcessor / AutoModelForImageTextToText: LLaVA-NeXT (5-D pixel_values with a
per-image patch count, image_sizes), Qwen2-VL (flattened pixel_values, image_grid_thw, mm_token_type_ids) and
Gemma-3 (token_type_ids), plus Qwen2.5-VL (windowed vision attention, Qwen2-VL's side inputs). Images of
different sizes share a batch, so per-image side inputs differ per row."""
import types

import pytest
import torch
from PIL import Image

from mmalign.core.reference import make_reference
from mmalign.datasets.records import SkipReport
from mmalign.mllm.data import Encoder, collate_pairs
from mmalign.mllm.dpo import DPOObjective, MLLMDPO, VLDPOConfig, VLPairDataConfig
from mmalign.mllm.generate import generate_answers
from mmalign.mllm.logps import sequence_logps
from mmalign.mllm.models import VISION_NAMES, VLModelConfig, load_vlm, prepare_trainable
from mmalign.mllm.tiny_others import BUILDERS

MODELS = ["llava_next", "qwen2_vl", "qwen2_5_vl", "gemma3"]
# Per-image side inputs each family's processor must produce, and per-token ones.
SIDE = {"llava_next": (("pixel_values", "image_sizes"), ()),
        "qwen2_vl": (("pixel_values", "image_grid_thw"), ("mm_token_type_ids",)),
        "qwen2_5_vl": (("pixel_values", "image_grid_thw"), ("mm_token_type_ids",)),
        "gemma3": (("pixel_values",), ("token_type_ids",))}
# (w, h): NeXT picks 16x32 / 32x16 / 32x32 grids (3 or 5 tiles), Qwen2-VL grids 4x4, 8x8, 4x10, 10x4.
SIZES = [(16, 16), (64, 64), (40, 20), (20, 40)]
COLOURS = [("red", (220, 40, 40)), ("blue", (40, 70, 220)), ("green", (40, 170, 60)), ("yellow", (225, 200, 20))]


@pytest.fixture(scope="module", params=MODELS)
def model_dir(request, tmp_path_factory):
    model, processor = BUILDERS[request.param](seed=0)
    out = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return request.param, str(out)


def _rows():
    """(images, prompt messages, record): four pairs, images of four sizes; the last row has two images."""
    out = []
    for i, (size, (name, rgb)) in enumerate(zip(SIZES, COLOURS)):
        images = [Image.new("RGB", size, rgb)]
        if i == 3:
            images.append(Image.new("RGB", SIZES[1], COLOURS[0][1]))
        prompt = [{"role": "user", "content": [{"type": "image"}] * len(images)
                   + [{"type": "text", "text": "What colour is the circle?"}]}]
        wrong = COLOURS[(i + 1) % 4][0]
        chosen = name if i % 2 else f"a {name} circle"
        rejected = f"two {wrong} squares" if i % 3 else wrong
        rec = types.SimpleNamespace(
            prompt=prompt, chosen=[{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
            rejected=[{"role": "assistant", "content": [{"type": "text", "text": rejected}]}], meta={},
            where=f"row {i}")
        out.append((images, prompt, rec))
    return out


def _encode(processor, config):
    enc = Encoder(processor, config, max_length=None, bad_rows="error", report=SkipReport())
    return [enc.pair(i, rec, images, None) for i, (images, _, rec) in enumerate(_rows())]


def test_batched_logps_equal_per_pair(model_dir):
    name, path = model_dir
    model, processor = load_vlm(path)
    pairs = _encode(processor, model.config)
    assert all(p is not None for p in pairs)
    image_keys, token_keys = SIDE[name]
    for p in pairs:
        assert set(image_keys) <= set(p.chosen.image_inputs) and set(token_keys) == set(p.chosen.token_inputs)
        for k in token_keys:  # per-token side inputs: 1 on image tokens only, aligned with the ids
            assert len(p.chosen.token_inputs[k]) == len(p.chosen.ids) and 1 in p.chosen.token_inputs[k]
    pad_id = processor.tokenizer.pad_token_id
    batch = collate_pairs(pairs, pad_id)["pairs"]
    if name == "llava_next":  # tiles per image differ (3 or 5): padded to the widest, image_sizes says how many
        assert batch["pixel_values"].dim() == 5 and batch["pixel_values"].shape[:2] == (10, 5)
        assert len({p.chosen.image_inputs["pixel_values"].shape[1] for p in pairs}) == 2
    if name.startswith("qwen"):
        assert len({tuple(t) for t in batch["image_grid_thw"].tolist()}) == 4
        assert batch["pixel_values"].shape[0] == 2 * int(sum(p.chosen.image_inputs["image_grid_thw"].prod(-1).sum()
                                                              for p in pairs))
    with torch.no_grad():
        logps, counts = sequence_logps(model, batch)
        single = [sequence_logps(model, collate_pairs([p], pad_id)["pairs"]) for p in pairs]
        blank = sequence_logps(model, {**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])})[0]
    n = len(pairs)
    want = torch.cat([torch.stack([s[0][0] for s in single]), torch.stack([s[0][1] for s in single])])
    want_counts = torch.cat([torch.stack([s[1][0] for s in single]), torch.stack([s[1][1] for s in single])])
    assert logps.shape == (2 * n,) and torch.isfinite(logps).all()
    assert torch.equal(counts, want_counts)
    torch.testing.assert_close(logps, want, atol=1e-5, rtol=0)
    assert (logps - blank).abs().max() > 1e-4  # the images reach the answer log-probs


def _method(processor, config):
    cfg = VLDPOConfig(model=VLModelConfig(pretrained="unused", lora_rank=4), data=VLPairDataConfig(path="unused"),
                      objective=DPOObjective(beta=0.1))
    m = MLLMDPO(cfg, "unused")
    m.processor, m.model_config, m.pad_id = processor, config, processor.tokenizer.pad_token_id
    return m


def test_dpo_step_with_lora(model_dir):
    name, path = model_dir
    model, processor = load_vlm(path)
    config = model.config
    policy = prepare_trainable(model, VLModelConfig(pretrained=path, lora_rank=4))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # policy != reference
    lora = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert not any(part in VISION_NAMES for n in lora for part in n.split("."))
    method = _method(processor, config)
    method.ref = make_reference("adapters_off", policy)
    pairs = _encode(processor, config)
    policy.train()
    loss, metrics = method.loss(policy, method.collate(pairs))
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - 0.6931) > 1e-4  # not the trivial log 2
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in metrics.values())
    grads = [p.grad for p in lora.values() if p.grad is not None]
    assert len(grads) == len(lora) and max(g.abs().max().item() for g in grads) > 1e-6
    with torch.no_grad():  # the batch mean equals the mean over single pairs (reference side included)
        batched = method.loss(policy, method.collate(pairs))[0]
        single = torch.stack([method.loss(policy, method.collate([p]))[0] for p in pairs]).mean()
    assert batched.item() == pytest.approx(single.item(), abs=1e-5)


def test_generate_answers(model_dir):
    name, path = model_dir
    model, processor = load_vlm(path)
    items = [(images, prompt) for images, prompt, _ in _rows()]
    batched = generate_answers(model, processor, items, max_new_tokens=3)
    assert len(batched) == len(items) and all(isinstance(a, str) for a in batched)
    one_by_one = [generate_answers(model, processor, [it], max_new_tokens=3)[0] for it in items]
    assert batched == one_by_one  # left padding and mixed image sizes change no greedy answer


def test_truncation_never_cuts_into_image_features_of_any_family(model_dir):
    """Gemma-3 expands <start_of_image> into <image_soft_token>s: the span check must look at the tokens the
    features fill (config.image_token_id), not at the marker. A cut inside the second image is refused."""
    name, path = model_dir
    model, processor = load_vlm(path)
    turn = lambda role, *parts: {"role": role, "content": list(parts)}  # noqa: E731
    msgs = [turn("user", {"type": "image"}, {"type": "text", "text": "What colour is the circle?"}),
            turn("assistant", {"type": "text", "text": "red"}),
            turn("user", {"type": "image"}, {"type": "text", "text": "And this one?"}),
            turn("assistant", {"type": "text", "text": "blue"})]
    images = [Image.new("RGB", (32, 32), (220, 40, 40)), Image.new("RGB", (32, 32), (40, 70, 220))]
    full = Encoder(processor, model.config, None, "error", SkipReport()).conversation(0, msgs, images, "c0")
    span = [i for i, t in enumerate(full.ids) if t == model.config.image_token_id]
    assert span, name
    cut_inside = span[-1]  # keeps all but the last feature token of the second image
    report = SkipReport()
    enc = Encoder(processor, model.config, cut_inside, "skip", report)
    assert enc.conversation(0, msgs, images, "c0") is None and sum(report.skipped.values()) == 1


def test_packed_pairs_equal_two_rows_or_are_refused(model_dir):
    """LLaVA-NeXT takes [prompt][chosen][rejected] rows (one image pass per pair) with the same answer log-probs;
    models with per-token inputs or 3-D rotary positions are refused with the reason (they keep two rows)."""
    from mmalign.mllm.packing import pair_packable, pair_token_logps, packing_unsupported

    name, path = model_dir
    model, processor = load_vlm(path)
    pairs = _encode(processor, model.config)
    why = packing_unsupported(model.config) or next(
        (w for p in pairs if (w := pair_packable(p.chosen, p.rejected))), None)
    if name != "llava_next":
        assert why is not None
        return
    assert why is None
    pad_id = processor.tokenizer.pad_token_id
    packed = collate_pairs(pairs, pad_id, pack=True)["packed"]
    assert packed["pixel_values"].shape[0] == 5  # each pair's images once (the last row has two)
    with torch.no_grad():
        lp_packed, m_packed = pair_token_logps(model, {"packed": packed})
        lp_rows, m_rows = pair_token_logps(model, collate_pairs(pairs, pad_id))
    assert torch.equal(m_packed.sum(-1), m_rows.sum(-1))
    torch.testing.assert_close(lp_packed.sum(-1), lp_rows.sum(-1), atol=1e-5, rtol=0)
