"""Multimodal DPO on a tiny LLaVA: TRL DPOTrainer parity, batched = per pair, reference strategies and the
on-disk reference cache, training through the core loop with every variant, and native exports."""
import copy
import json
import types

import pytest
import torch
from conftest import colour_pairs

from mmalign.core.config import Experiment, TrainConfig
from mmalign.core.reference import make_reference
from mmalign.core.trainer import train
from mmalign.datasets.records import SkipReport
from mmalign.mllm.data import Encoder
from mmalign.mllm.dpo import DPOObjective, MLLMDPO, MLLMmDPO, VLDPOConfig, VLPairDataConfig
from mmalign.mllm.models import VLModelConfig, load_vlm, prepare_trainable


def _conversational(rows):
    out = []
    for images, prompt, chosen, rejected, _ in rows:
        out.append({"images": images,
                    "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                    "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
                    "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}]})
    return out


def _records(rows):
    return [types.SimpleNamespace(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"], meta={},
                                  where=f"row {i}") for i, r in enumerate(rows)]


def _lora_policy(tiny_llava_dir, seed=1):
    """(base copy, LoRA policy with non-zero B so policy != reference, processor)."""
    model, processor = load_vlm(tiny_llava_dir)
    base = copy.deepcopy(model)
    policy = prepare_trainable(model, VLModelConfig(pretrained=tiny_llava_dir, lora_rank=4))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return base, policy, processor


def _method(processor, model_config, objective=None, lora=4, cls=MLLMDPO):
    cfg = VLDPOConfig(model=VLModelConfig(pretrained="unused", lora_rank=lora),
                      data=VLPairDataConfig(path="unused"), objective=objective or DPOObjective())
    m = cls(cfg, "unused")
    m.processor, m.model_config, m.pad_id = processor, model_config, processor.tokenizer.pad_token_id
    return m


def _encode(processor, model_config, rows):
    enc = Encoder(processor, model_config, None, "error", SkipReport())
    return [enc.pair(i, rec, r["images"], None) for i, (rec, r) in enumerate(zip(_records(rows), rows))]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_first_step_equals_trl_dpo_trainer(tiny_llava_dir, tmp_path, loss_type):
    """Same tiny LLaVA, LoRA init, batch and reference model: TRL 1.16's DPOTrainer and ours give the same loss,
    metrics and LoRA gradients. (TRL's DPOConfig turns bf16 on by default even on CPU and then runs its reference
    under bf16 autocast; fp32 is asked for explicitly so both compute the same thing.)"""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    base, policy, processor = _lora_policy(tiny_llava_dir)
    rows = _conversational(colour_pairs(4))
    trl_model = copy.deepcopy(policy)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, report_to=[], beta=0.1,
                     loss_type=[loss_type], use_cpu=True, bf16=False, max_length=None)
    trainer = DPOTrainer(model=trl_model, ref_model=copy.deepcopy(base), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=processor)
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()
    loss_trl = trainer.compute_loss(trainer.model, inputs)
    loss_trl.backward()
    grads_trl = {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    ours = copy.deepcopy(policy).train()
    method = _method(processor, base.config, DPOObjective(beta=0.1, loss_type=loss_type))
    method.ref = make_reference("adapters_off", ours)
    loss, metrics = method.loss(ours, method.collate(_encode(processor, base.config, rows)))
    loss.backward()
    assert abs(loss.item() - loss_trl.item()) < 1e-6 and abs(loss.item() - 0.6931) > 1e-3  # not the trivial log 2
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected"):
        assert float(metrics[k]) == pytest.approx(logged[k], abs=2e-5), k
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads.keys() == grads_trl.keys() and len(grads) == 42  # 3 layers x 7 projections x (A, B)
    scale = max(g.abs().max().item() for g in grads.values())
    assert scale > 1e-4
    assert max((grads[n] - grads_trl[n]).abs().max().item() for n in grads) < 1e-5 * max(1.0, scale * 100)


def test_batched_loss_equals_per_pair(tiny_llava_dir):
    """Padding and [chosen; rejected] batching change nothing: the batch mean equals the mean of single pairs."""
    base, policy, processor = _lora_policy(tiny_llava_dir)
    rows = _conversational(colour_pairs(4))  # answers of different lengths -> padding
    method = _method(processor, base.config, DPOObjective(beta=0.5, rpo_alpha=0.0))
    method.ref = make_reference("adapters_off", policy)
    pairs = _encode(processor, base.config, rows)
    with torch.no_grad():
        batched = method.loss(policy, method.collate(pairs))[0]
        single = torch.stack([method.loss(policy, method.collate([p]))[0] for p in pairs]).mean()
    assert batched.item() == pytest.approx(single.item(), abs=1e-5)


def _experiment(out, method, steps=2, **train):
    return Experiment(method="mllm_dpo", output_dir=str(out),
                      train=TrainConfig(max_steps=steps, batch_size=4, lr=1e-3, log_every=1, **train), args=method.cfg)


def _cfg(tiny_llava_dir, vl_pairs_dir, tmp_path, lora=4, reference="", **objective):
    return VLDPOConfig(model=VLModelConfig(pretrained=tiny_llava_dir, lora_rank=lora, reference=reference),
                       data=VLPairDataConfig(path=vl_pairs_dir, ref_cache_dir=str(tmp_path / "refcache")),
                       objective=DPOObjective(**objective))


@pytest.mark.parametrize("variant", [
    dict(loss_type="sigmoid", rpo_alpha=0.5),
    dict(loss_type="ipo", beta=0.5),
    dict(loss_type="hinge"),
    dict(loss_type="robust", label_smoothing=0.1),
    dict(loss_type="sigmoid", mmdpo_w=0.5),
])
def test_dpo_variants_train_and_export_lora(tiny_llava_dir, vl_pairs_dir, tmp_path, variant):
    from peft import PeftModel

    cfg = _cfg(tiny_llava_dir, vl_pairs_dir, tmp_path, **variant)
    method = MLLMDPO(cfg, str(tmp_path / "run"))
    result = train(_experiment(tmp_path / "run", method), method)
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(logged) == 2 and all(k in logged[-1] for k in ("rewards/margins", "logps/chosen", "logps/rejected"))
    assert ("nll/chosen" in logged[-1]) == bool(variant.get("rpo_alpha"))
    assert ("beta/mean" in logged[-1]) == bool(variant.get("mmdpo_w"))
    base, _ = load_vlm(tiny_llava_dir)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "run" / "final"))
    trained = {n: p for n, p in loaded.named_parameters() if "lora_B" in n}
    assert trained and any(p.abs().sum() > 0 for p in trained.values())  # B moved off its zero init
    assert result["step"] == 2


def test_reference_cache_equals_frozen_copy_and_resumes(tiny_llava_dir, vl_pairs_dir, tmp_path, capsys):
    """A full fine-tune trained against cached reference log-probs follows the same trajectory as one with a
    frozen copy; a removed cache part is recomputed alone."""
    from transformers import AutoModelForImageTextToText

    runs = {}
    for ref in ("frozen_copy", "cache"):
        method = MLLMmDPO(_cfg(tiny_llava_dir, vl_pairs_dir, tmp_path, lora=0, reference=ref), str(tmp_path / ref))
        train(_experiment(tmp_path / ref, method, steps=3), method)
        runs[ref] = [json.loads(line)["loss"] for line in open(tmp_path / ref / "metrics.jsonl")]
    assert runs["cache"] == pytest.approx(runs["frozen_copy"], abs=1e-5)
    assert len(set(runs["cache"])) == 3  # the policy moved
    AutoModelForImageTextToText.from_pretrained(str(tmp_path / "cache" / "final"))

    entry = next((tmp_path / "refcache").iterdir())
    parts = sorted(entry.glob("part*.safetensors"))
    assert len(parts) == 1
    parts[0].unlink()
    method = MLLMmDPO(_cfg(tiny_llava_dir, vl_pairs_dir, tmp_path, lora=0, reference="cache"), str(tmp_path / "again"))
    method.build(torch.device("cpu"))
    capsys.readouterr()
    method.dataset()
    out = capsys.readouterr().out
    assert "0 rows from" in out and "8 computed" in out
    method.dataset()
    assert "8 rows from" in capsys.readouterr().out


def test_adapters_off_with_trained_projector_is_refused(tiny_llava_dir):
    from mmalign.core.config import ConfigError
    cfg = VLDPOConfig(model=VLModelConfig(pretrained=tiny_llava_dir, lora_rank=4, train_projector=True,
                                          reference="adapters_off"), data=VLPairDataConfig(path="x"))
    with pytest.raises(ConfigError, match="projector"):
        MLLMDPO(cfg, "unused")


def test_what_trains_by_default_and_by_option(tiny_llava_dir):
    def trainable(cfg):
        model = prepare_trainable(load_vlm(tiny_llava_dir)[0], cfg)
        return {n for n, p in model.named_parameters() if p.requires_grad}

    full = trainable(VLModelConfig(pretrained=tiny_llava_dir))
    assert full and not any("vision_tower" in n or "multi_modal_projector" in n for n in full)
    assert any("language_model" in n for n in full) and any("lm_head" in n for n in full)
    with_proj = trainable(VLModelConfig(pretrained=tiny_llava_dir, train_projector=True))
    assert {n for n in with_proj - full} and all("multi_modal_projector" in n for n in with_proj - full)
    lora = trainable(VLModelConfig(pretrained=tiny_llava_dir, lora_rank=2, train_projector=True))
    assert all("lora_" in n or "multi_modal_projector.modules_to_save" in n for n in lora)
    assert any("modules_to_save" in n for n in lora) and not any("vision_tower" in n for n in lora)


def test_lora_with_trained_projector_exports_it(tiny_llava_dir, vl_pairs_dir, tmp_path):
    from peft import PeftModel

    cfg = _cfg(tiny_llava_dir, vl_pairs_dir, tmp_path, lora=2, reference="cache")
    cfg.model.train_projector = True
    method = MLLMDPO(cfg, str(tmp_path / "run"))
    train(_experiment(tmp_path / "run", method, steps=2), method)
    base, _ = load_vlm(tiny_llava_dir)
    before = base.model.multi_modal_projector.linear_1.weight.clone()
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "run" / "final"))
    after = loaded.base_model.model.model.multi_modal_projector.linear_1.weight
    assert not torch.equal(before, after)
