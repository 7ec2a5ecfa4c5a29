"""Reference-model strategies shared by preference methods: `ref(fn)` runs `fn(model)` with reference weights."""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch

KINDS = ("frozen_copy", "shared_frozen_copy", "adapters_off", "none")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP and similar wrappers
        model = model.module
    return model


class SharedFrozenCopy:
    """A frozen deep copy of the policy taken at construction (call this before training/resume changes it) that
    shares the policy's frozen parameters instead of duplicating them: only what trains is copied."""

    shares_frozen = True

    def __init__(self, policy: torch.nn.Module):
        model = unwrap(policy)
        memo = {id(p): p for p in model.parameters() if not p.requires_grad} if self.shares_frozen else {}
        self.model = copy.deepcopy(model, memo).eval().requires_grad_(False)
        self.policy = policy

    def __call__(self, fn: Callable[[torch.nn.Module], Any]) -> Any:
        device = next(unwrap(self.policy).parameters()).device
        if next(self.model.parameters()).device != device:  # follow the policy to its device
            self.model.to(device)
        with torch.no_grad():
            return fn(self.model)


class FrozenCopy(SharedFrozenCopy):
    """A deep copy of the whole policy (frozen parameters included) taken at construction."""

    shares_frozen = False


class AdaptersOff:
    """The policy itself with its LoRA adapters disabled for the call (peft PeftModel or diffusers/transformers
    models with peft integration)."""

    def __init__(self, policy: torch.nn.Module):
        self.policy = policy
        model = unwrap(policy)
        if not (_is_peft_model(model) or (hasattr(model, "disable_adapters") and hasattr(model, "enable_adapters"))):
            raise TypeError(f"reference 'adapters_off' needs a model with LoRA adapters (peft PeftModel or a model "
                            f"with peft integration); got {type(model).__name__}")

    def __call__(self, fn: Callable[[torch.nn.Module], Any]) -> Any:
        model = unwrap(self.policy)
        with torch.no_grad():
            if _is_peft_model(model):
                with model.disable_adapter():
                    return fn(model)
            model.disable_adapters()
            try:
                return fn(model)
            finally:
                model.enable_adapters()


class NoReference:
    def __call__(self, fn):
        raise RuntimeError("this method's reference model is configured as 'none' but a reference output was requested")


def _is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def make_reference(kind: str, policy: torch.nn.Module):
    """kind: 'frozen_copy' (deep copy now), 'shared_frozen_copy' (deep copy of what trains, sharing the frozen
    parameters), 'adapters_off' (policy with LoRA disabled), 'none' (error if called)."""
    if kind == "frozen_copy":
        return FrozenCopy(policy)
    if kind == "shared_frozen_copy":
        return SharedFrozenCopy(policy)
    if kind == "adapters_off":
        return AdaptersOff(policy)
    if kind == "none":
        return NoReference()
    raise ValueError(f"unknown reference kind {kind!r} (known: {', '.join(KINDS)})")
