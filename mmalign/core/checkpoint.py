"""Atomic, resumable checkpoints: <root>/step-00000100/ plus a `latest` pointer file.

A checkpoint is built in <root>/.tmp-step-XXXXXXXX, fsynced, then renamed into place; `latest` is
replaced atomically afterwards. So `latest` always names a complete checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:08d}")


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoints (renamed into place), oldest first."""
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, n) for n in sorted(os.listdir(root)) if _STEP_DIR.match(n)]


def latest_checkpoint(root: str) -> str | None:
    pointer = os.path.join(root, "latest")
    if os.path.exists(pointer):
        with open(pointer) as f:
            path = os.path.join(root, f.read().strip())
        if os.path.isfile(os.path.join(path, "trainer_state.json")):
            return path
    found = list_checkpoints(root)  # no pointer (e.g. crash before the first one was written)
    return found[-1] if found else None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_torch(path: str, obj) -> None:
    torch.save(obj, path)
    _fsync_file(path)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict:
    """This process's RNG states, in a form `torch.load(weights_only=True)` accepts."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str, step: int, params: dict, optimizer: dict, scheduler: dict, trainer_state: dict,
                    keep_last: int = 0, rank: int = 0, barrier: Callable[[], None] = lambda: None) -> str:
    """Collective: every rank calls it (each writes its RNG state); rank 0 writes the rest."""
    final, tmp = step_dir(root, step), os.path.join(root, f".tmp-step-{step:08d}")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of a crashed save
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    _write_torch(os.path.join(tmp, f"rng_rank{rank}.pt"), rng_state())
    barrier()
    if rank == 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, os.path.join(tmp, "params.safetensors"))
        _fsync_file(os.path.join(tmp, "params.safetensors"))
        _write_torch(os.path.join(tmp, "optimizer.pt"), optimizer)
        _write_torch(os.path.join(tmp, "scheduler.pt"), scheduler)
        _write_text(os.path.join(tmp, "trainer_state.json"), json.dumps({"step": step, **trainer_state}, indent=1))
        _fsync_dir(tmp)
        if os.path.exists(final):  # same step saved by an earlier run: move it aside, cleaned next save
            os.rename(final, os.path.join(root, f".tmp-replaced-{step:08d}"))
        os.rename(tmp, final)
        _write_text(os.path.join(root, "latest.tmp"), os.path.basename(final))
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        _fsync_dir(root)
        if keep_last and keep_last > 0:
            for old in list_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old)
    barrier()
    return final


def load_checkpoint(path: str, rank: int = 0) -> dict:
    """Everything saved in `path`; `rng` is None when no state was saved for this rank."""
    def load(name):
        return torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)

    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    rng_file = f"rng_rank{rank}.pt"
    return {
        "trainer_state": state,
        "params": load_file(os.path.join(path, "params.safetensors")),
        "optimizer": load("optimizer.pt"),
        "scheduler": load("scheduler.pt"),
        "rng": load(rng_file) if os.path.exists(os.path.join(path, rng_file)) else None,
    }
