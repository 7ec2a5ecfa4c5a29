"""A persistent tensor cache (e.g. VAE latents, text embeddings) keyed by everything that produced the tensors.

An entry is `root/<fingerprint(key)[:20]>/` holding `tensors.safetensors` and `key.json` (the full key, for humans).
The key should name the model (`model_fingerprint`: file sizes and mtimes, so replaced weights invalidate), the
data (`file_fingerprint` of the data file or folder, plus `files_fingerprint` of every file its records point to,
such as images beside a jsonl or outside the folder) and the preprocessing (resolution, crop, flip); anything
applied per step, such as caption dropout, stays out. Any change in the key gives a different entry, so a stale
entry is never reused. Entries are written into a temp dir and renamed into place; an entry without a matching
key.json or with unreadable tensors is a miss and is recomputed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file, save_file


def canonical(key: dict) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def fingerprint(key: dict) -> str:
    return hashlib.sha256(canonical(key).encode()).hexdigest()


def _stat(p: Path) -> list:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns]


def file_fingerprint(path: str | Path) -> list:
    """[size, mtime_ns] of a file; for a folder, ["dir", n_files, total_bytes, sha256 of every file's path+stat]."""
    p = Path(path)
    if p.is_file():
        return _stat(p)
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such file or folder to fingerprint")
    files = sorted(f for f in p.rglob("*") if f.is_file())
    listing = [[f.relative_to(p).as_posix(), *_stat(f)] for f in files]
    return ["dir", len(listing), sum(s for _, s, _ in listing), hashlib.sha256(json.dumps(listing).encode()).hexdigest()]


def files_fingerprint(paths: Iterable[str | Path]) -> dict:
    """A compact digest of the files `paths` name (e.g. the images a data file's records point to), from stat
    alone: {"references": how many, "missing": those naming no regular file, "bytes": total size, "digest": an
    order-independent sum of sha256([absolute path, size, mtime_ns]) per reference}. Nothing is read and no list
    is kept, so a million references cost a million stats; a missing file is recorded, not raised (readers count
    it as a skip), and its later appearance changes the digest."""
    n = missing = total = acc = 0
    for p in paths:
        try:
            st = os.stat(p)
            entry = [st.st_size, st.st_mtime_ns] if stat.S_ISREG(st.st_mode) else None
        except OSError:
            entry = None
        n += 1
        if entry is None:
            missing += 1
        else:
            total += entry[0]
        row = json.dumps([os.path.abspath(p), entry]).encode()
        acc = (acc + int.from_bytes(hashlib.sha256(row).digest(), "big")) % (1 << 256)
    return {"references": n, "missing": missing, "bytes": total, "digest": f"{acc:064x}"}


def _hub_snapshot(hub_id: str, subfolders: list[str]) -> str | None:
    """The locally cached snapshot folder of `hub_id` (no network), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in ["model_index.json", *(f"{s}/config.json" for s in subfolders)]:
        try:
            hit = try_to_load_from_cache(hub_id, name)
        except Exception:  # malformed id, unreadable cache: fingerprint by id only
            return None
        if isinstance(hit, str):
            return str(Path(hit).parents[len(Path(name).parts) - 1])
    return None


def model_fingerprint(source: str, subfolders: list[str]) -> dict:
    """Local pipeline dir: {"files": {subfolder: {file: [size, mtime_ns]}}}; hub id: {"hub_id", "snapshot"}."""
    root = Path(source)
    if root.is_dir():
        files = {}
        for sub in subfolders:
            d = root / sub
            files[sub] = {f.relative_to(d).as_posix(): _stat(f) for f in sorted(d.rglob("*")) if f.is_file()}
        return {"files": files}
    return {"hub_id": source, "snapshot": _hub_snapshot(source, subfolders)}


def _read_entry(entry: Path, key: dict) -> tuple[dict[str, torch.Tensor] | None, str]:
    """(tensors, "") for a complete entry for `key`, else (None, why it is a miss)."""
    if not entry.is_dir():
        return None, "no entry"
    try:
        stored = json.loads((entry / "key.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, "missing or unreadable key.json (partial entry)"
    if stored != json.loads(canonical(key)):
        return None, "key.json does not match the key"
    try:
        return load_file(str(entry / "tensors.safetensors")), ""
    except Exception as e:  # safetensors raises its own error types for truncated files
        return None, f"unreadable tensors ({type(e).__name__})"


def load_or_compute(root: str | Path, key: dict, compute: Callable[[], dict[str, torch.Tensor]],
                    log: Callable[[str], None] = print) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors cached under `key` in `root` (hit=True), or `compute()`'s, saved there first (hit=False)."""
    root = Path(root)
    entry = root / fingerprint(key)[:20]
    tensors, why = _read_entry(entry, key)
    if tensors is not None:
        log(f"tensor cache hit: {entry}")
        return tensors, True
    log(f"tensor cache miss ({why}): computing {entry}")
    out, seen = {}, set()
    for name, t in compute().items():
        t = t.detach().cpu().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:  # safetensors refuses shared memory
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=root))
    try:
        save_file(out, str(tmp / "tensors.safetensors"))
        (tmp / "key.json").write_text(json.dumps(key, sort_keys=True, indent=1, default=str), encoding="utf-8")
        if entry.exists():  # a stale or partial entry: move it aside, then swap ours in
            shutil.rmtree(entry.rename(root / f"{tmp.name}-old"), ignore_errors=True)
        try:
            os.rename(tmp, entry)
        except OSError:  # another process put an entry in place meanwhile: keep it if it is complete
            if _read_entry(entry, key)[0] is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, False
