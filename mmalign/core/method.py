"""The contract between the training loop (`core/trainer.py`, `mmalign train`) and a training method.

A method is a plain class registered by name in `core/registry.py`. What the CLI and the loop rely on, in order:

1. `config_class`: a dataclass for the recipe's method sections (`model:`, `data:`, `objective:`, ...). The
   loader (`core/config.py`) validates the YAML plus overrides against it; choice fields are `Literal[...]`.
2. `Method(cfg, output_dir)`: cheap; validates combinations of settings (raise `ConfigError`), loads nothing.
3. `build(device)`: loads the models, places frozen helpers (encoders, reference) on `device`, and returns the
   trainable policy as one `nn.Module` (the loop moves it to the device and wraps it for DDP/FSDP).
4. `dataset()`: reads and encodes the data; returns `(dataset, report)`, a map-style dataset of rows and the
   `SkipReport` of the rows read (kept, skipped by reason). The loop writes it to `data_report.json`.
5. `collate(rows)`: rows -> a batch of CPU tensors (the loop moves them to the device).
6. `loss(policy, batch)`: `(mean loss, metrics to log)`. Call `policy(...)`: it is the wrapped module.
7. `save_pretrained(policy, out_dir)`: export the unwrapped policy in its family's native format (diffusers,
   PEFT, transformers). Main process only.

Optional: `wants_row_seed = True` (class attribute) makes the loop add `batch["row_seed"]` (LongTensor [B]) after
`collate`; `loss` then draws its randomness per row with `core.row_rng.RowRandom.of(batch)`, so a run trains the
same whatever its batch size x accumulation x process layout (the latent-diffusion methods do this).

A method never touches the loop's internals (optimizer, accelerator, checkpoints); the loop knows nothing about
diffusion or LLaVA.
"""
from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch


@runtime_checkable
class SkipReportLike(Protocol):
    kept: int

    def to_dict(self) -> dict: ...

    def summary(self) -> str: ...


@runtime_checkable
class Method(Protocol):
    config_class: ClassVar[type]

    def __init__(self, cfg: Any, output_dir: str) -> None: ...

    def build(self, device: torch.device) -> torch.nn.Module:
        """Build all models; return the trainable policy."""

    def dataset(self) -> tuple[torch.utils.data.Dataset, SkipReportLike]:
        """(map-style dataset of rows, its skip report)."""

    def collate(self, rows: list) -> Any:
        """Rows -> batch with CPU tensors."""

    def loss(self, policy: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """Mean loss over the batch plus metrics to log."""

    def save_pretrained(self, policy: torch.nn.Module, out_dir: str) -> None:
        """Export the (unwrapped) policy in the model family's native format."""
