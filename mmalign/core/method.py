"""The contract between the generic training loop and a training method (DPO for diffusion, for LLaVA, ...)."""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Method(Protocol):
    def build(self, device: torch.device) -> torch.nn.Module:
        """Build all models, placing frozen helpers (VAE, text encoder, reference) on `device`; return the
        trainable policy (the trainer moves it to `device` and wraps it)."""

    def dataset(self) -> torch.utils.data.Dataset:
        """A map-style dataset of rows."""

    def collate(self, rows: list) -> Any:
        """Rows -> batch with CPU tensors (the trainer moves tensors to the device)."""

    def loss(self, policy: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """Mean loss over the batch plus metrics to log. Call the policy as `policy(...)`: it is the wrapped module."""

    def save_pretrained(self, policy: torch.nn.Module, out_dir: str) -> None:
        """Export the (unwrapped) policy in the model family's native format. Main process only."""
