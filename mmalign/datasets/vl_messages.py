"""Validation of one vision-language row's messages and images (see `vl_records` for the formats): messages
normalised to TRL's conversational form with one image placeholder per image, images checked by decoding.
A bad value raises `Reject` with the skip reason; `vl_records` counts it or raises DataError."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from PIL import Image

from .records import IMAGE_ERRORS, image_reason

ImageSource = Union[Path, bytes]
ROLES = ("system", "user", "assistant")
MARKER = "<image>"

class Reject(Exception):
    """A bad row: the reason, and what to append to the row's location."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclass
class RowContext:
    base: Path | None
    image_root: Path | None
    allow_text_only: bool
    check: str
    seen: dict = field(default_factory=dict)  # path -> None (decodes) or the Reject


# ---- messages ----

def _split(text: str) -> list[dict]:
    parts = []
    for k, seg in enumerate(text.split(MARKER)):
        if k:
            parts.append({"type": "image"})
        if seg.strip():
            parts.append({"type": "text", "text": seg.strip()})
    return parts


def _content(content: Any, col: str) -> list[dict]:
    if isinstance(content, str):
        return _split(content)
    if not isinstance(content, list):
        raise Reject(f"non-string text in {col}")
    parts = []
    for p in content:
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "image":
            parts.append({"type": "image"})
        elif kind == "text":
            if not isinstance(p.get("text"), str):
                raise Reject(f"non-string text in {col}")
            parts.extend(_split(p["text"]))
        else:
            raise Reject(f"unsupported content part in {col}")
    return parts


def row_messages(value: Any, col: str, role: str) -> list[dict]:
    """A string or a list of {role, content} turns, normalised; a string becomes one `role` turn."""
    if isinstance(value, str):
        return [{"role": role, "content": _split(value)}]
    if not isinstance(value, list) or not all(isinstance(m, dict) and "content" in m for m in value):
        raise Reject(f"non-string text in {col}")
    out = []
    for m in value:
        if m.get("role") not in ROLES:
            raise Reject(f"unknown role in {col}")
        out.append({"role": m["role"], "content": _content(m["content"], col)})
    return out


def _count(msgs: list[dict]) -> int:
    return sum(p["type"] == "image" for m in msgs for p in m["content"])


def has_text(msgs: list[dict]) -> bool:
    return any(p["type"] == "text" for m in msgs for p in m["content"])


def place_images(msgs: list[dict], n: int, col: str) -> list[dict]:
    """Check one placeholder per image; with none at all, put them first in the first user turn."""
    if any(_count([m]) for m in msgs if m["role"] == "assistant"):
        raise Reject("image placeholder in an assistant turn")
    have = _count(msgs)
    if have == n:
        return msgs
    first_user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
    if have or first_user is None:
        raise Reject(f"image placeholder count != image count in {col}" if have else f"no user turn in {col}")
    msgs = [dict(m) for m in msgs]
    msgs[first_user]["content"] = [{"type": "image"}] * n + msgs[first_user]["content"]
    return msgs


def prompt_of(value: Any, col: str, n_images: int) -> list[dict]:
    msgs = row_messages(value, col, "user")
    if not msgs or msgs[-1]["role"] != "user":
        raise Reject(f"{col} does not end with a user turn")
    if not has_text(msgs) and not n_images:
        raise Reject(f"empty {col}")
    return place_images(msgs, n_images, col)


def reply_of(value: Any, col: str) -> list[dict]:
    msgs = row_messages(value, col, "assistant")
    if any(m["role"] != "assistant" for m in msgs):
        raise Reject(f"non-assistant turn in {col}")
    if _count(msgs):
        raise Reject(f"image placeholder in {col}")
    if not has_text(msgs):
        raise Reject(f"empty {col}")
    return msgs


# ---- images ----

def _one_image(value: Any, ctx: RowContext) -> ImageSource:
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, "PNG")
        return buf.getvalue()
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value):
        data = bytes(value)
        _verify(data, ctx)
        return data
    if isinstance(value, (str, os.PathLike)) and str(value):
        p = Path(value)
        root = ctx.image_root if ctx.image_root is not None else ctx.base
        if not p.is_absolute() and root is not None:
            p = root / p
        if not p.is_file():
            raise Reject("image file not found", f" ({p})")
        if str(p) not in ctx.seen:
            try:
                _verify(p, ctx)
                ctx.seen[str(p)] = None
            except Reject as r:
                ctx.seen[str(p)] = r
        if ctx.seen[str(p)] is not None:
            raise ctx.seen[str(p)]
        return p
    if value is None or isinstance(value, (str, bytes)):
        raise Reject("missing image")
    raise Reject("unsupported image value", f" ({type(value).__name__})")


def _verify(src: Path | bytes, ctx: RowContext) -> None:
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            im.load() if ctx.check == "load" else im.verify()
    except IMAGE_ERRORS as e:
        raise Reject(image_reason(e), f" ({type(e).__name__}: {e})") from None


def message_images(row: dict, cols: tuple[str, ...], ctx: RowContext) -> tuple[ImageSource, ...]:
    col = next((c for c in cols if row.get(c) is not None), None)
    value = row.get(col) if col else None
    values = value if isinstance(value, (list, tuple)) else [] if value is None else [value]
    out = []
    for k, v in enumerate(values):
        try:
            out.append(_one_image(v, ctx))
        except Reject as r:
            raise Reject(r.reason, f" {col}[{k}]{r.detail}") from None
    if not out and not ctx.allow_text_only:
        raise Reject("no image (text-only rows need allow_text_only=True)")
    return tuple(out)
