"""Shared-prompt packing ([prompt][chosen][rejected] per pair, 4-D mask, restarted positions): the mask by
hand, log-probs / DPO loss / LoRA gradients equal to the two-row layout, and the fallback rules."""
import pytest
import torch
from conftest import colour_pairs
from test_mllm_dpo import _conversational, _encode, _lora_policy, _method

from mmalign.core.config import ConfigError
from mmalign.core.reference import make_reference
from mmalign.mllm.data import collate_pairs
from mmalign.mllm.dpo import DPOObjective
from mmalign.mllm.encoding import Encoded
from mmalign.mllm.packing import (pack_batch, packed_attention_mask, pair_packable, pair_token_logps,
                                  packing_unsupported)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mask_and_positions_by_hand():
    prompt = Encoded([5, 6], [0, 0])
    chosen = Encoded([5, 6, 7, 8], [0, 0, 1, 1], prompt.image_inputs)
    rejected = Encoded([5, 6, 9], [0, 0, 1], prompt.image_inputs)
    short = Encoded([5, 6, 7], [0, 0, 1], prompt.image_inputs)
    b = pack_batch([(chosen, rejected), (short, short)], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 7, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 2, 0]]
    assert b["segments"].tolist() == [[1, 1, 2, 2, 3], [1, 1, 2, 3, 0]]
    assert b["lengths"].tolist() == [[2, 2, 1], [2, 1, 1]]
    allowed = (packed_attention_mask(b["segments"], torch.float32) == 0)[:, 0].int()
    # row 0: the rejected token (4) sees the prompt (0, 1) and itself, not the chosen answer (2, 3)
    assert allowed[0].tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0],
                                   [1, 1, 0, 0, 1]]
    # row 1: no real token attends to the padding position (its own row is unused, never all hidden)
    assert allowed[1, :, 4].tolist() == [0, 0, 0, 0, 1] and allowed[1, 3].tolist() == [1, 1, 0, 1, 0]


def test_pairs_that_cannot_pack_say_why():
    a = Encoded([5, 6, 7], [0, 0, 1])
    assert "share their prompt" in pair_packable(a, Encoded([5, 9, 7], [0, 0, 1], a.image_inputs))
    assert "different images" in pair_packable(a, Encoded([5, 6, 8], [0, 0, 1], {"pixel_values": torch.ones(1)}))
    assert "per-token" in pair_packable(Encoded([5, 7], [0, 1], {}, {"token_type_ids": [0, 0]}), a)


def test_packed_dpo_equals_two_rows(tiny_llava_dir):
    """Same LoRA policy and batch: loss, TRL-named metrics and every LoRA gradient agree across layouts."""
    base, policy, processor = _lora_policy(tiny_llava_dir)
    assert packing_unsupported(base.config) is None
    pairs = _encode(processor, base.config, _conversational(colour_pairs(4)))
    results = {}
    for pack in (False, True):
        method = _method(processor, base.config, DPOObjective(beta=0.1, rpo_alpha=0.5))
        method.ref, method.pack = make_reference("adapters_off", policy), pack
        batch = method.collate(pairs)
        assert ("packed" in batch) == pack and ("pairs" in batch) != pack
        policy.zero_grad()
        loss, metrics = method.loss(policy, batch)
        loss.backward()
        results[pack] = (loss.item(), {k: float(v) for k, v in metrics.items()},
                         {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad})
    (l0, m0, g0), (l1, m1, g1) = results[False], results[True]
    assert l1 == pytest.approx(l0, abs=1e-6) and abs(l0 - 0.6931) > 1e-3
    assert m1 == pytest.approx(m0, abs=1e-5)
    scale = max(g.abs().max().item() for g in g0.values())
    assert scale > 1e-4 and max((g0[n] - g1[n]).abs().max().item() for n in g0) < 1e-5


def test_packing_modes(tiny_llava_dir):
    base, policy, processor = _lora_policy(tiny_llava_dir)
    pairs = _encode(processor, base.config, _conversational(colour_pairs(2)))
    method = _method(processor, base.config)
    for mode, want in (("auto", True), ("off", False), ("on", True)):
        method.cfg.data.pack_pairs = mode
        assert method._choose_packing(pairs) is want
    base.config.text_config._attn_implementation = "flash_attention_2"  # no custom 4-D masks there
    assert "flash_attention_2" in packing_unsupported(base.config)
    method.cfg.data.pack_pairs = "auto"
    assert method._choose_packing(pairs) is False and "flash_attention_2" in method.packing_note
    method.cfg.data.pack_pairs = "on"
    with pytest.raises(ConfigError, match="cannot be packed"):
        method._choose_packing(pairs)
    with torch.no_grad():  # both layouts give (2B, K) per-token log-probs
        lp, m = pair_token_logps(policy, collate_pairs(pairs, processor.tokenizer.pad_token_id, pack=True))
    assert lp.shape[0] == 4 and m.shape == lp.shape
