"""Export a checkpoint of a run (`mmalign export RUN --step N`): the policy at that step, written by the method's
own `save_pretrained` exactly as the run writes `final/` (a diffusers pipeline or LoRA, a PEFT adapter, a
transformers model), so intermediate checkpoints can be sampled and evaluated like the final one.

Plain (DDP / one-process) checkpoints hold the trainable parameters in params.safetensors; they are copied into
a freshly built policy (seeded like the run's) after checking that the names match. Sharded (FSDP2 DCP / DeepSpeed) checkpoints need the
run's launcher: resume that run with train.max_steps set to the step instead.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import ConfigError


def checkpoint_path(run_dir: str | Path, step: int | None) -> Path:
    """<run>/checkpoints/step-N (the latest complete one when `step` is None); a clear error otherwise."""
    root = Path(run_dir) / "checkpoints"
    if step is None:
        latest = ckpt.latest_checkpoint(str(root))
        if latest is None:
            raise FileNotFoundError(f"{run_dir}: no complete checkpoint under {root}")
        return Path(latest)
    path = Path(ckpt.step_dir(str(root), step))
    if not path.is_dir():
        have = [Path(p).name for p in ckpt.list_checkpoints(str(root))]
        raise FileNotFoundError(f"{path}: no such checkpoint (this run has: {', '.join(have) or 'none'})")
    return path


def export_checkpoint(method, path: str | Path, out: str | Path, seed: int = 0) -> Path:
    """Build `method`'s policy on CPU after seeding like the trainer (`seed`: the run's train.seed, so weights a
    build draws at random and never trains come out the same), load the checkpoint's trainable parameters, and
    `save_pretrained` into `out`."""
    from accelerate.utils import set_seed
    from safetensors.torch import load_file

    path, out = Path(path), Path(out)
    if (path / "sharded").exists() or not (path / "params.safetensors").is_file():
        raise ConfigError(f"{path}: a sharded (FSDP2/DeepSpeed) or incomplete checkpoint; export it by resuming the "
                          f"run under its launcher with train.max_steps set to its step")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new folder")
    set_seed(seed)  # as core.trainer does before build()
    policy = method.build(torch.device("cpu"))
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    saved = load_file(str(path / "params.safetensors"))
    if set(params) != set(saved):
        diff = sorted(set(params) ^ set(saved))
        raise ConfigError(f"{path}: its parameters do not match the recipe's trainable ones (e.g. {diff[:5]}); "
                          f"was the run's config.yaml edited?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    os.makedirs(out, exist_ok=True)
    method.save_pretrained(policy, str(out))
    return out


def export_run(run_dir: str | Path, step: int | None = None, out: str | Path | None = None) -> Path:
    """Export step `step` (default: the latest) of the run in `run_dir`, from its resolved config.yaml; `out`
    defaults to <run>/export-step-N."""
    from .registry import load_recipe, method_class

    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{run_dir}: not a training run (no config.yaml)")
    path = checkpoint_path(run_dir, step)
    exp = load_recipe(str(config), [])
    method = method_class(exp.method)(exp.args, exp.output_dir)
    n = int(path.name.split("-")[-1])
    return export_checkpoint(method, path, out or Path(run_dir) / f"export-step-{n}", seed=exp.train.seed)
