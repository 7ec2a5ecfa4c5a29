"""Checks of a recipe's model and data locations, run before any model loads.

A location is a local file or folder, or a hub id `owner/name`. A value that names no existing local path and
is not shaped like a hub id (an absolute or ./ path, more than one `/`) is refused at once with the key that
holds it, instead of surfacing later as a hub connection error. A hub id is accepted as it is; with
HF_HUB_OFFLINE=1 it must already be in the local hub cache.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from .config import ConfigError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# dotted key -> what it must be when local ("any": file or folder)
LOCATION_KEYS = {"model.pretrained": "folder", "model.motion_adapter": "folder", "data.path": "any",
                 "data.image_root": "folder"}


def looks_like_hub_id(value: str) -> bool:
    return bool(HUB_ID.fullmatch(value)) and not value.startswith((".", "~"))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _in_hub_cache(hub_id: str, kind: str) -> bool:
    try:
        from huggingface_hub import scan_cache_dir
        cached = {(r.repo_id, r.repo_type) for r in scan_cache_dir().repos}
    except Exception:  # no cache folder yet, or an unreadable one
        return False
    return (hub_id, "dataset" if kind == "data" else "model") in cached


def check_location(key: str, value: str, must_be: str = "any") -> None:
    """ConfigError naming `key` when `value` is neither an existing local path of the right kind nor a
    plausible (and, offline, cached) hub id."""
    p = Path(value).expanduser()
    if p.exists():
        if must_be == "folder" and not p.is_dir():
            raise ConfigError(f"{key}: {value} is a file; it must be a folder")
        return
    if not looks_like_hub_id(value):
        raise ConfigError(f"{key}: {value}: no such file or folder (a hub id looks like 'owner/name')")
    if _offline() and not _in_hub_cache(value, key.split(".")[0]):
        raise ConfigError(f"{key}: {value} is not a local path, and HF_HUB_OFFLINE=1 with no copy of that hub "
                          f"id in the local cache; pass a local folder, or download it first")


def check_paths(exp) -> None:
    """Check every location key of the experiment's method config (see LOCATION_KEYS) that is set."""
    args = exp.args
    for key, must_be in LOCATION_KEYS.items():
        obj = args
        for part in key.split("."):
            obj = getattr(obj, part, None) if dataclasses.is_dataclass(obj) else None
        if isinstance(obj, str) and obj:
            check_location(key, obj, must_be)
