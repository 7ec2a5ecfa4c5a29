"""Atomic, resumable checkpoints: <root>/step-00000100/ plus a `latest` pointer file.

A checkpoint is built in <root>/.tmp-step-XXXXXXXX, fsynced, then renamed into place; `latest` is
replaced atomically afterwards. So `latest` always names a complete checkpoint. Each one records its run's
identity (`run_identity`), so a run resumes only its own checkpoints; one damaged after the fact (a truncated
file) is a `CheckpointError` naming the checkpoint and the file, and `load_newest_intact` falls back past it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError

_STEP_DIR = re.compile(r"^step-(\d{8})$")

# Resolved-config keys that may change between a run and its resumption. Per-device batch size and accumulation
# may change too, as long as their product with the world size (`train.global_batch`, in the identity) does not.
RESUMABLE_KEYS = ("output_dir", *(f"train.{k}" for k in (
    "max_steps", "max_minutes", "log_every", "save_every", "keep_last", "tensorboard", "num_workers", "resume",
    "batch_size", "grad_accum")))


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read; the message names the checkpoint and the file. A ConfigError, so the
    CLI reports it without a traceback: the way on is a setting (train.resume=never, or another checkpoint)."""


def run_identity(exp, n_rows: int, global_batch: int) -> dict:
    """{dotted key: value} of everything that makes a run this run: the resolved config (method, model, data
    paths, objective, optimizer and schedule settings, seed) minus RESUMABLE_KEYS and config.NOT_IDENTITY fields,
    plus the dataset's length and the global batch. Data files are named by path, not by content."""
    flat: dict = {}

    def walk(obj, key):
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                if f.metadata.get("run_identity", True):
                    walk(getattr(obj, f.name), f"{key}.{f.name}" if key else f.name)
        elif isinstance(obj, dict) and obj:
            for k, v in obj.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif key and key not in RESUMABLE_KEYS:
            flat[key] = obj

    walk({"method": exp.method, "output_dir": exp.output_dir, "train": exp.train}, "")
    walk(exp.args or {}, "")
    flat.update({"dataset_length": n_rows, "train.global_batch": global_batch})
    return json.loads(json.dumps(flat, default=str))  # as it reads back from trainer_state.json


def identity_diff(saved: dict, now: dict) -> list[str]:
    """'key: saved -> now' for each key whose value differs (absent on one side included)."""
    absent = "(absent)"
    return [f"{k}: {json.dumps(saved.get(k, absent))} -> {json.dumps(now.get(k, absent))}"
            for k in sorted(saved.keys() | now.keys())
            if json.dumps(saved.get(k, absent)) != json.dumps(now.get(k, absent))]


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
                    keep_last: int = 0, rank: int = 0, barrier: Callable[[], None] = lambda: None,
                    write_shards: Callable[[str], None] | None = None) -> str:
    """Collective: every rank calls it (each writes its RNG state; `write_shards(tmp_dir)`, when given, writes
    sharded state from every rank: FSDP2's DCP shards, DeepSpeed's engine files); rank 0 writes the rest."""
    final, tmp = step_dir(root, step), os.path.join(root, f".tmp-step-{step:08d}")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of a crashed save
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    _write_torch(os.path.join(tmp, f"rng_rank{rank}.pt"), rng_state())
    if write_shards is not None:
        write_shards(tmp)
    barrier()
    if rank == 0:
        save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, os.path.join(tmp, "params.safetensors"))
        _fsync_file(os.path.join(tmp, "params.safetensors"))
        _write_torch(os.path.join(tmp, "optimizer.pt"), optimizer)
        _write_torch(os.path.join(tmp, "scheduler.pt"), scheduler)
        _write_text(os.path.join(tmp, "trainer_state.json"), json.dumps({"step": step, **trainer_state}, indent=1))
        fsync_tree(tmp)  # shard folders included
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


def _read(path: str, name: str, reader):
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise CheckpointError(f"checkpoint {path}: {name} is missing")
    try:
        return reader(file)
    except Exception as e:  # truncated or garbled: SafetensorError, torch's zip reader, JSON, OSError, ...
        raise CheckpointError(f"checkpoint {path}: {name} is unreadable ({type(e).__name__}: {str(e)[:200]})") from None


def _torch(file):
    return torch.load(file, map_location="cpu", weights_only=True)


def _trainer_state(file):
    with open(file) as f:
        state = json.load(f)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError("not a mapping with an integer 'step'")
    return state


def load_checkpoint(path: str, rank: int = 0) -> dict:
    """Everything saved in `path`; `rng` is None when no state was saved for this rank. Every file is read
    (every rank's RNG state too, so all ranks agree on whether the checkpoint is intact); a missing or
    unreadable one is a CheckpointError naming the checkpoint and the file."""
    names = sorted(os.listdir(path)) if os.path.isdir(path) else []
    rngs = {n: _read(path, n, _torch) for n in names if re.fullmatch(r"rng_rank\d+\.pt", n)}
    return {
        "trainer_state": _read(path, "trainer_state.json", _trainer_state),
        "params": _read(path, "params.safetensors", load_file),
        "optimizer": _read(path, "optimizer.pt", _torch),
        "scheduler": _read(path, "scheduler.pt", _torch),
        "rng": rngs.get(f"rng_rank{rank}.pt"),
        "sharded": _check_sharded(path, "sharded") if os.path.isdir(os.path.join(path, "sharded")) else None,
        "deepspeed": os.path.isdir(os.path.join(path, "deepspeed")),
    }


def _check_sharded(path: str, name: str) -> str:
    """The DCP folder `path/name` if its metadata reads and every shard file holds the bytes it lists;
    else a CheckpointError (a truncated shard)."""
    from torch.distributed.checkpoint import FileSystemReader

    folder = os.path.join(path, name)
    meta = _read(path, os.path.join(name, ".metadata"), lambda _: FileSystemReader(folder).read_metadata())
    need: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in sorted(need.items()):
        file = os.path.join(folder, rel)
        if not os.path.isfile(file) or os.path.getsize(file) < size:
            raise CheckpointError(f"checkpoint {path}: {name}/{rel} is missing or truncated (needs {size} bytes)")
    return folder


def _candidates(root: str) -> list[str]:
    """Checkpoints newest first, the one `latest` names (when it names one) first of all."""
    found = list_checkpoints(root)[::-1]
    try:
        with open(os.path.join(root, "latest")) as f:
            pointed = os.path.join(root, f.read().strip())
    except (OSError, UnicodeDecodeError):
        return found
    return [pointed, *(p for p in found if p != pointed)] if pointed in found else found


def load_newest_intact(root: str, rank: int = 0) -> tuple[str | None, dict | None, list[tuple[str, str]]]:
    """(path, contents, skipped): the newest checkpoint under `root` that reads completely, and (path, problem)
    for each newer one skipped as damaged. (None, None, []) when there is none; a CheckpointError when all are."""
    skipped = []
    for path in _candidates(root):
        try:
            return path, load_checkpoint(path, rank), skipped
        except CheckpointError as e:
            skipped.append((path, str(e)))
    if skipped:
        raise CheckpointError(f"no intact checkpoint in {root}: {'; '.join(m for _, m in skipped)} "
                              f"(train.resume=never starts over)")
    return None, None, []


def newest_identity(root: str) -> tuple[str, int, dict] | None:
    """(path, step, identity) from the trainer_state.json of the newest checkpoint under `root` that has a
    readable one with an identity; None when there is none. Reads no weights: a cheap check before loading."""
    for path in _candidates(root):
        try:
            state = _trainer_state(os.path.join(path, "trainer_state.json"))
        except (OSError, ValueError):
            continue
        if isinstance(state.get("identity"), dict):
            return path, state["step"], state["identity"]
    return None


def set_aside(path: str, suffix: str) -> str:
    """Rename checkpoint `path` to `path + suffix` (out of `list_checkpoints`' view; an older one there is
    replaced); return the new path."""
    target = path + suffix
    if os.path.exists(target):
        shutil.rmtree(target)
    os.rename(path, target)
    return target


def retire_checkpoints(root: str) -> int:
    """Move all checkpoints under `root` (and `latest`) into `root`/previous-run, replacing what an older
    retirement left there, so a fresh run's saves and keep_last see only its own; return how many moved."""
    found = list_checkpoints(root)
    if not found:
        return 0
    dest = os.path.join(root, "previous-run")
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    for path in found + [p for p in [os.path.join(root, "latest")] if os.path.exists(p)]:
        os.rename(path, os.path.join(dest, os.path.basename(path)))
    _fsync_dir(root)
    return len(found)


def fsync_tree(path: str) -> None:
    """fsync every file and folder under `path` (before renaming it into place)."""
    for folder, _, files in os.walk(path):
        for name in files:
            _fsync_file(os.path.join(folder, name))
        _fsync_dir(folder)
