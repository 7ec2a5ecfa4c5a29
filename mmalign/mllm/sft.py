"""Supervised fine-tuning of a vision-language model on conversations with images (every assistant turn is
trained, everything else is context), and SteerLM: the same, with each example's attribute scores written
into the prompt so that at inference the wanted attributes can be asked for."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from ..core.config import ConfigError, bounded, not_identity
from .encoding import pad_batch, pad_id_of
from .logps import token_logps
from .models import VLModelConfig, load_vlm, prepare_trainable, save_vlm

STEER_ATTRIBUTES = ("quality", "helpfulness", "correctness", "coherence", "complexity", "verbosity")


@dataclass
class VLConversationDataConfig:
    path: str  # TRL VLM SFT format (images + messages, or prompt + completion); jsonl / parquet / HF datasets
    bad_rows: Literal["skip", "error"] = "skip"  # skip: counted, reported
    image_root: str = ""
    # 0 = the model's maximum, a longer row is a counted skip; N (<= the model's maximum): longer rows are cut,
    # only after their last image token
    max_length: int = bounded(0, 0)
    cache_dir: str = not_identity("")  # encoded rows (mllm/sharded.py); "" = <output_dir>/data_cache
    shard_rows: int = bounded(128, 1, identity=False)  # source rows per cache shard (in the cache key)
    encode_workers: int = bounded(0, 0, identity=False)  # processes decoding and encoding shards


@dataclass
class SteerConfig:
    attributes: list[str] = field(default_factory=list)  # SteerLM: meta["attributes"] keys, in prompt order


@dataclass
class VLSFTConfig:
    model: VLModelConfig
    data: VLConversationDataConfig
    steer: SteerConfig = field(default_factory=SteerConfig)


def steer_messages(messages: list[dict], attributes: dict[str, float], names: list[str]) -> list[dict]:
    """The conversation with a system turn "attributes: name value, ..." (SteerLM's conditioning) in front;
    `names` fixes the order, and every name must be present."""
    missing = [n for n in names if n not in attributes]
    if missing:
        raise ValueError(f"attribute(s) {missing} missing (have {sorted(attributes)})")
    text = "attributes: " + " , ".join(f"{n} {_fmt(attributes[n])}" for n in names)
    return [{"role": "system", "content": [{"type": "text", "text": text}]}] + list(messages)


def _fmt(v) -> str:
    return str(int(v)) if float(v).is_integer() else f"{float(v):g}"


class MLLMSFT:
    config_class = VLSFTConfig

    def __init__(self, cfg: VLSFTConfig, output_dir: str):
        self.cfg, self.output_dir = cfg, output_dir

    def build(self, device: torch.device) -> torch.nn.Module:
        m = self.cfg.model
        model, self.processor = load_vlm(m.pretrained, m.dtype, m.attn_implementation)
        self.model_config = model.config
        return prepare_trainable(model, m)

    def messages(self, rec) -> list[dict]:
        names = self.cfg.steer.attributes
        if not names:
            return rec.messages
        return steer_messages(rec.messages, rec.meta.get("attributes", {}), names)

    def dataset(self):
        from .sharded import encode_rows

        dataset, self.data_key = encode_rows("conversations", self.cfg.data, self.cfg.model.pretrained,
                                             self.processor, self.model_config, self.output_dir,
                                             steer=self.cfg.steer.attributes)
        self.pad_id = pad_id_of(self.processor)
        return dataset, dataset.report

    def collate(self, rows) -> dict:
        return pad_batch(rows, self.pad_id)

    def loss(self, policy, batch):
        lp, m = token_logps(policy, batch)
        n_tokens = m.sum()
        loss = -lp.sum() / n_tokens
        return loss, {"nll": loss.detach(), "tokens": n_tokens.detach()}

    def save_pretrained(self, policy, out_dir: str) -> None:
        save_vlm(policy, self.processor, out_dir)


class MLLMSteerLM(MLLMSFT):
    """SFT with attribute conditioning; `steer.attributes` must name at least one attribute."""

    def __init__(self, cfg: VLSFTConfig, output_dir: str):
        if not cfg.steer.attributes:
            raise ConfigError(f"steer.attributes: SteerLM needs attribute names (e.g. {list(STEER_ATTRIBUTES)})")
        super().__init__(cfg, output_dir)
