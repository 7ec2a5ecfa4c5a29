"""Toy method for the core trainer tests; run as a script (python/torchrun) to train from a YAML config."""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file

from mmalign.core import load_experiment, train
from mmalign.core.config import NOT_IDENTITY
from mmalign.core.distributed import end_run_processes
from mmalign.datasets.records import SkipReport


@dataclass
class ToyArgs:
    n_rows: int = 64
    dim: int = 4
    dropout: float = 0.0  # > 0: uses the torch RNG, so exact resume tests RNG restore
    noise: float = 0.0  # target noise drawn from the torch RNG
    # fault injection: not part of the run's identity, so the run resumes once it is switched off
    nan_at_call: int = field(default=0, metadata=NOT_IDENTITY)  # loss() call that returns NaN
    raise_at_call: int = field(default=0, metadata=NOT_IDENTITY)  # loss() call that raises (a clean crash)
    kill_at_call: int = field(default=0, metadata=NOT_IDENTITY)  # loss() call that SIGKILLs its process


@dataclass
class ToyConfig:
    toy: ToyArgs


class ToyMethod:
    """Regression with an MLP on a fixed synthetic dataset; rows carry ids so data order is visible."""

    def __init__(self, args: ToyArgs):
        self.args, self.calls, self.seen_ids = args, 0, []

    def build(self, device):
        a = self.args
        model = torch.nn.Sequential(torch.nn.Linear(a.dim, 8), torch.nn.Tanh(), torch.nn.Dropout(a.dropout),
                                    torch.nn.Linear(8, 1))
        model[0].bias.requires_grad_(False)  # a frozen weight: not in checkpoints, rebuilt by build()
        return model

    def dataset(self):
        g = torch.Generator().manual_seed(123)
        x = torch.randn(self.args.n_rows, self.args.dim, generator=g)
        y = x.sum(dim=1, keepdim=True).sin()
        rows = [{"id": i, "x": x[i], "y": y[i]} for i in range(self.args.n_rows)]
        return rows, SkipReport(total=len(rows), kept=len(rows))

    def collate(self, rows):
        return {"id": torch.tensor([r["id"] for r in rows]), "x": torch.stack([r["x"] for r in rows]),
                "y": torch.stack([r["y"] for r in rows])}

    def loss(self, policy, batch):
        self.calls += 1
        self.seen_ids.append(batch["id"].tolist())
        if self.calls == self.args.kill_at_call:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.calls == self.args.raise_at_call:
            raise KeyboardInterrupt("injected crash")
        target = batch["y"] + self.args.noise * torch.randn_like(batch["y"])
        loss = ((policy(batch["x"]) - target) ** 2).mean()
        if self.calls == self.args.nan_at_call:
            loss = loss * float("nan")
        return loss, {"id_sum": batch["id"].sum().float(), "abs_err": loss.detach().sqrt()}

    def save_pretrained(self, policy, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, os.path.join(out_dir, "model.safetensors"))


def main(argv):
    exp = load_experiment(argv[0], argv[1:], ToyConfig)
    train(exp, ToyMethod(exp.args.toy))
    end_run_processes()


if __name__ == "__main__":
    main(sys.argv[1:])
