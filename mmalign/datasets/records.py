"""Caption datasets on disk, validated row by row under an explicit bad-row policy.

Format (Hugging Face "imagefolder"): a folder with `metadata.jsonl`, one JSON object per line with
`file_name` (path relative to the folder) and `text` (the caption); extra keys are kept in `extra`.
A bad row is either a counted skip with its reason (policy "skip") or a `DataError` naming the file and line
(policy "error") — never silently dropped or silently kept.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

POLICIES = ("skip", "error")
# What decoding an untrusted image can raise. Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) stays on:
# an image over twice that raises DecompressionBombError from Image.open, before any pixel is decoded.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
TOO_LARGE = "image too large"


class DataError(ValueError):
    pass


@dataclass
class SkipReport:
    """Counts of rows dropped, by reason, with the first few examples of each."""
    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(where)

    def to_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "skipped": dict(self.skipped), "examples": self.examples}

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.kept}/{self.total} rows kept"
        parts = ", ".join(f"{n} {r}" for r, n in self.skipped.most_common())
        return f"{self.kept}/{self.total} rows kept; skipped: {parts}"


@dataclass(frozen=True)
class CaptionRecord:
    image_path: Path
    caption: str
    extra: dict


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"bad-row policy must be one of {POLICIES}, got {policy!r}")


def reject(report: SkipReport, policy: str, reason: str, where: str) -> None:
    """Apply the policy to one bad row: raise under "error", count under "skip"."""
    check_policy(policy)
    if policy == "error":
        raise DataError(f"{where}: {reason}")
    report.skip(reason, where)


def jsonl_rows(path: str | Path, report: SkipReport, policy: str,
               bad_json: str = "invalid JSON") -> Iterator[tuple[str, Any]]:
    """(`path:line`, parsed value) of each non-blank line of a jsonl file that parses. Every non-blank line is
    counted in `report.total`; one that does not parse is rejected as `"{bad_json} ({message})"`."""
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        report.total += 1
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            reject(report, policy, f"{bad_json} ({e.msg})", where)
            continue
        yield where, obj


def caption_folder_meta(folder: str | Path) -> Path:
    """`folder/metadata.jsonl`, or a DataError saying what a caption folder needs."""
    meta = Path(folder) / "metadata.jsonl"
    if not meta.is_file():
        raise DataError(f"{folder}: no metadata.jsonl (expected one JSON object per line with file_name, text)")
    return meta


def caption_record(where: str, obj: Any, folder: Path, report: SkipReport, policy: str) -> CaptionRecord | None:
    """One parsed metadata.jsonl row as a CaptionRecord (its image file exists, its caption is a non-blank string),
    or None when rejected under `policy`. `obj` may be a str subclass naming a parse failure (`pairs.BadRow`).
    The row counts in `report.total`; `report.kept` is the caller's to count."""
    report.total += 1
    if isinstance(obj, str):  # a line that did not parse: the string is the reason
        reject(report, policy, str(obj), where)
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("file_name"), str):
        reject(report, policy, "missing file_name", where)
        return None
    if not isinstance(obj.get("text"), str):
        reject(report, policy, "missing or non-string text", where)
        return None
    if not obj["text"].strip():  # an unconditional example is caption dropout's job, not the data's
        reject(report, policy, "empty caption", where)
        return None
    path = folder / obj["file_name"]
    if not path.is_file():
        reject(report, policy, "image file not found", where)
        return None
    return CaptionRecord(path, obj["text"], {k: v for k, v in obj.items() if k not in ("file_name", "text")})


def read_caption_folder(folder: str | Path, policy: str = "skip") -> tuple[list[CaptionRecord], SkipReport]:
    """Rows of `folder/metadata.jsonl` whose image file exists and whose caption is a string."""
    check_policy(policy)
    folder = Path(folder)
    meta = caption_folder_meta(folder)
    from .row_source import RowSource  # it imports this module
    report, rows = SkipReport(), []
    for where, obj, _ in RowSource(meta).rows():
        rec = caption_record(where, obj, folder, report, policy)
        if rec is not None:
            rows.append(rec)
    report.kept = len(rows)
    return rows, report


def image_reason(e: BaseException, other: str = "unreadable image") -> str:
    """The skip reason for an error in `IMAGE_ERRORS`: TOO_LARGE for a decompression bomb, else `other`."""
    return TOO_LARGE if isinstance(e, Image.DecompressionBombError) else other


def open_rgb(path: Any, report: SkipReport, policy: str, where: str) -> Image.Image | None:
    """Decode an image (a path or a file object) fully (so a truncated file fails here, not mid-epoch); None when
    skipped ("unreadable image", or "image too large" over Pillow's decompression-bomb limit)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except IMAGE_ERRORS as e:
        name = f"{path}: " if isinstance(path, (str, os.PathLike)) and str(path) not in where else ""
        reject(report, policy, image_reason(e), f"{where} ({name}{type(e).__name__}: {e})")
        return None
