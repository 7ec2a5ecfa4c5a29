"""Multimodal DPO and its variants (IPO, hinge, robust, RPO/SFT term, MM-DPO dynamic β) and mDPO, for any
AutoModelForImageTextToText checkpoint.

One policy forward over [chosen; rejected] (image tensors duplicated); the reference is the policy with its
adapters off, a frozen copy, or log-probs computed once into an on-disk cache (`model.reference: cache`).
Metrics carry TRL's names (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected) so dashboards carry over.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from accelerate.utils import send_to_device

from ..core.config import ConfigError, bounded, not_identity
from ..core.reference import make_reference
from ..datasets.records import SkipReport
from .data import collate_pairs
from .encoding import pad_id_of
from .logps import sequence_logps
from .packing import pair_packable, pair_sequence_logps, pair_token_logps, packing_unsupported
from .losses import dpo_loss, mdpo_loss, mmdpo_beta, sft_nll
from .models import VLModelConfig, load_vlm, prepare_trainable, reference_kind, save_vlm
from .refcache import cached_reference_logps
from .sharded import EncodedRows


@dataclass
class VLPairDataConfig:
    path: str  # jsonl / parquet / HF datasets dir or hub id (formats: see mmalign.datasets.vl_records)
    format: Literal["auto", "trl", "rlaif_v", "vlfeedback", "mm_rlhf"] = "auto"
    ties: Literal["drop", "error"] = "drop"  # VLFeedback rating ties: drop (counted) or error
    bad_rows: Literal["skip", "error"] = "skip"  # skip: counted, reported
    image_root: str = ""  # base folder for relative image paths ("" = the data file's folder)
    # 0 = the model's maximum, a longer row is a counted skip; N (<= the model's maximum): longer rows lose trailing
    # answer tokens, never prompt/image tokens
    max_length: int = bounded(0, 0)
    ref_cache_dir: str = not_identity(".cache/mmalign/ref_logps")
    ref_batch_size: int = bounded(8, 1, identity=False)
    pack_pairs: Literal["auto", "on", "off"] = "auto"  # one [prompt][chosen][rejected] row per pair (packing.py)
    cache_dir: str = not_identity("")  # encoded rows (mllm/sharded.py); "" = <output_dir>/data_cache
    shard_rows: int = bounded(128, 1, identity=False)  # source rows per cache shard (in the cache key)
    encode_workers: int = bounded(0, 0, identity=False)  # processes decoding and encoding shards


@dataclass
class DPOObjective:
    beta: float = bounded(0.1, 0, lo_open=True)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    label_smoothing: float = bounded(0.0, 0, 0.5, hi_open=True)  # sigmoid (conservative DPO) and robust
    rpo_alpha: float = bounded(0.0, 0)  # + alpha * NLL of the chosen answers (RPO / DPO+SFT)
    mmdpo_w: float = bounded(0.0, 0)  # MM-DPO: beta_i = beta * (1 + w * (1 - exp(-k * margin_i))); 0 = fixed beta
    mmdpo_k: float = bounded(0.5, 0)
    # mDPO: the cropped image keeps crop_min..crop_max of the area
    crop_min: float = bounded(0.01, 0, 1, lo_open=True, hi_open=True)
    crop_max: float = bounded(0.2, 0, 1, lo_open=True, hi_open=True)
    anchor: float = bounded(0.0)  # mDPO: the anchor's margin delta


@dataclass
class VLDPOConfig:
    model: VLModelConfig
    data: VLPairDataConfig
    objective: DPOObjective = field(default_factory=DPOObjective)


class MLLMDPO:
    config_class = VLDPOConfig
    crops = False

    def __init__(self, cfg: VLDPOConfig, output_dir: str):
        self.cfg, self.output_dir = cfg, output_dir
        o = cfg.objective
        if self.crops and o.crop_min > o.crop_max:  # each in (0, 1): a field range
            raise ConfigError(f"objective.crop_min: must be <= objective.crop_max, got {o.crop_min} > {o.crop_max}")
        self.ref_kind = reference_kind(cfg.model)
        self.ref_logps = None
        self.pack = False

    def build(self, device: torch.device) -> torch.nn.Module:
        m = self.cfg.model
        self.device = device
        model, self.processor = load_vlm(m.pretrained, m.dtype, m.attn_implementation)
        self.model_config = model.config
        policy = prepare_trainable(model, m)
        self.ref = None if self.ref_kind == "cache" else make_reference(self.ref_kind, policy)
        if self.ref is not None and hasattr(self.ref, "model"):
            self.ref.model.to(device)
        self.policy = policy
        return policy

    def dataset(self) -> tuple[EncodedRows, SkipReport]:
        from .sharded import encode_rows

        o = self.cfg.objective
        crop = (0, o.crop_min, o.crop_max) if self.crops else None
        dataset, self.data_key = encode_rows("pairs", self.cfg.data, self.cfg.model.pretrained, self.processor,
                                             self.model_config, self.output_dir, crop)
        self.pad_id = pad_id_of(self.processor)
        self.pack = self._choose_packing(dataset)
        self.ref_logps = self._reference_cache(dataset) if self.ref_kind == "cache" else None
        return dataset, dataset.report

    def _choose_packing(self, rows) -> bool:
        """Pack pairs when the model and every row allow it (`auto`), insist (`on`) or never (`off`). `rows`: a
        list of EncodedPair, or EncodedRows (its per-row flags; only a refused row is read)."""
        mode = self.cfg.data.pack_pairs
        if mode == "off":
            return False
        why = packing_unsupported(self.model_config)
        if why is None and isinstance(rows, EncodedRows):
            refused = (rows.packable() == 0).nonzero()
            if len(refused):
                r = rows[int(refused[0])]
                why = f"row {r.index}: {pair_packable(r.chosen, r.rejected)}"
        elif why is None:
            why = next((f"row {r.index}: {w}" for r in rows if (w := pair_packable(r.chosen, r.rejected))), None)
        if why and mode == "on":
            raise ConfigError(f"data.pack_pairs: on, but pairs cannot be packed: {why}")
        self.packing_note = why or "packed: one [prompt][chosen][rejected] row per pair"
        return why is None

    def _reference_cache(self, dataset) -> dict[int, torch.Tensor]:
        """Reference log-probs of every row, keyed by the dataset's row index; the key is the encoded data's
        (model, data, images, reader, lengths, crops) less its shard size, plus the weights' dtype."""
        d, m = self.cfg.data, self.cfg.model
        key = {"rows": {k: v for k, v in self.data_key.items() if k != "shard_rows"}, "dtype": m.dtype,
               "n": len(dataset)}
        policy = self.policy.to(self.device)

        def compute(batch_rows):
            b = send_to_device(collate_pairs(batch_rows, self.pad_id, pack=self.pack), self.device)
            with torch.no_grad():
                parts = [pair_sequence_logps(policy, b)]
                if "cropped" in b:
                    parts.append(sequence_logps(policy, b["cropped"])[0])
            return torch.cat(parts).view(-1, len(batch_rows)).T  # (n, 2 or 3): chosen, rejected(, cropped)

        was_training = policy.training
        policy.eval()
        try:
            return cached_reference_logps(d.ref_cache_dir, key, dataset, compute, d.ref_batch_size)
        finally:
            policy.train(was_training)

    def collate(self, rows) -> dict:
        return collate_pairs(rows, self.pad_id, self.ref_logps, pack=self.pack)

    def _reference(self, batch: dict, n: int) -> torch.Tensor:
        """(2n,) or (3n,) reference log-probs: [chosen, rejected(, cropped)]."""
        if "ref_logps" in batch:
            return batch["ref_logps"]
        parts = [self.ref(lambda model: pair_sequence_logps(model, batch))]
        if "cropped" in batch:
            parts.append(self.ref(lambda model: sequence_logps(model, batch["cropped"])[0]))
        return torch.cat(parts)

    def loss(self, policy, batch):
        o = self.cfg.objective
        n = batch["margin"].shape[0]
        tok, mask = pair_token_logps(policy, batch)
        logps, lengths = tok.sum(-1), mask.sum(-1)
        ref = self._reference(batch, n).to(logps.dtype)
        pc, pr, rc, rr = logps[:n], logps[n:], ref[:n], ref[n:2 * n]
        beta = mmdpo_beta(o.beta, batch["margin"], w=o.mmdpo_w, k=o.mmdpo_k) if o.mmdpo_w else o.beta
        metrics = {}
        if self.crops:
            crop_logps = sequence_logps(policy, batch["cropped"])[0]
            losses, parts = mdpo_loss(pc, pr, rc, rr, crop_logps, ref[2 * n:], beta=o.beta, anchor=o.anchor)
            cr, rj = o.beta * (pc - rc).detach(), o.beta * (pr - rr).detach()
            metrics.update({f"mdpo/{k}": v for k, v in parts.items()})
        else:
            losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=o.loss_type,
                                      label_smoothing=o.label_smoothing,
                                      chosen_lengths=lengths[:n], rejected_lengths=lengths[n:])
        loss = losses.mean()
        if o.rpo_alpha:
            nll = sft_nll(tok[:n], mask[:n])
            loss = loss + o.rpo_alpha * nll
            metrics["nll/chosen"] = nll.detach()
        metrics.update({
            "rewards/chosen": cr.mean(), "rewards/rejected": rj.mean(),
            "rewards/accuracies": (cr > rj).float().mean(), "rewards/margins": (cr - rj).mean(),
            "logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean()})
        if torch.is_tensor(beta):
            metrics["beta/mean"] = beta.mean()
        return loss, metrics

    def save_pretrained(self, policy, out_dir: str) -> None:
        save_vlm(policy, self.processor, out_dir)


class MLLMmDPO(MLLMDPO):
    """mDPO: DPO + an image-conditional term (the chosen answer under the real vs a heavily cropped image) +
    an anchor keeping the chosen reward positive (see losses.mdpo_loss)."""
    crops = True

