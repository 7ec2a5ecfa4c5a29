"""Toy method with a reference model (and optional LoRA) for the scale-out tests; run under torchrun or
accelerate launch with a YAML config, like ddp_worker.py."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import ToyArgs, ToyMethod  # noqa: E402

from mmalign.core import load_experiment, make_reference, train  # noqa: E402
from mmalign.core.distributed import end_run_processes  # noqa: E402


@dataclass
class RefToyArgs(ToyArgs):
    reference: str = "none"  # frozen_copy, shared_frozen_copy, adapters_off (needs lora) or none
    lora: bool = False  # peft LoRA on both Linear layers: frozen base, trainable adapters in the same modules


@dataclass
class RefToyConfig:
    toy: RefToyArgs


class RefToyMethod(ToyMethod):
    """ToyMethod plus a pull towards the reference's output (as DPO-style methods call it every step)."""

    def build(self, device):
        model = super().build(device)
        if self.args.lora:
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=2, target_modules=["0", "3"], init_lora_weights=False))
        self.ref = make_reference(self.args.reference, model) if self.args.reference != "none" else None
        return model

    def loss(self, policy, batch):
        loss, metrics = super().loss(policy, batch)
        if self.ref is not None:
            ref_out = self.ref(lambda m: m(batch["x"]))
            loss = loss + 0.5 * ((policy(batch["x"]) - ref_out) ** 2).mean()
        return loss, metrics


def main(argv):
    exp = load_experiment(argv[0], argv[1:], RefToyConfig)
    train(exp, RefToyMethod(exp.args.toy))
    end_run_processes()


if __name__ == "__main__":
    main(sys.argv[1:])
