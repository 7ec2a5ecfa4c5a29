"""Vision-language preference pairs and SFT conversations, validated row by row.

Records carry messages in TRL's conversational form: `prompt` is a list of turns whose `content` is a list of parts
`{"type": "image"}` / `{"type": "text", "text": ...}`; `chosen` / `rejected` are assistant turns. Every record has
exactly one image placeholder per image, all in user/system turns. A plain string becomes one turn (user for
prompts, assistant for replies); literal "<image>" markers in text become placeholders (their number must equal the
number of images); a prompt with no placeholder at all gets them first in its first user turn (as TRL does), which
is what RLAIF-V / MM-RLHF / VLFeedback need. Text around a marker is stripped.

Formats (`format="auto"` looks at the first row's columns):
- trl: `images` (list) or `image`, `prompt`, `chosen`, `rejected` (conversational or plain strings);
- rlaif_v: `image`, `question`, `chosen`, `rejected`;
- mm_rlhf: `image` (path or list), `prompt`, `chosen`, `rejected` and `chosen_reason` / `rejected_reason`
  (without the reasons the same columns read as trl, with the same result);
- vlfeedback: `prompt`, `completions` [{model, response, annotations {aspect: {"Rating": ...}}}], `image` or
  `img_path`. A completion's score is the mean of its aspects' ratings. pairing="best" makes one pair per row,
  the best- vs the worst-scored completion (the first in source order among equals); pairing="all" makes one per
  two completions with different scores. Equal scores are ties (ties="drop": counted, "error": DataError); a gap
  below `min_rating_gap` is counted and dropped. For this format `report.total` counts rows, `kept` counts pairs,
  reasons starting "completion:" count completions and ties / gaps count candidate pairs.
Other columns go to `meta`. Sources are those of `pairs.py` (jsonl, parquet file or shards, save_to_disk folder,
Dataset, hub id); images are paths (relative to `image_root`, else to the data file's folder), encoded bytes,
{"bytes", "path"} dicts or PIL images (kept as PNG bytes). Every image is decoded once while reading
(check_images="load"; "verify" is PIL's faster, weaker check) and then dropped, so a corrupt file is a counted
skip (bad_rows="skip") or a DataError naming file:line / dataset[row] (bad_rows="error") before training.
"""
from __future__ import annotations

import io
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

from PIL import Image

from .pairs import HUB_ID, BadRow, source_rows
from .records import IMAGE_ERRORS, DataError, SkipReport, check_policy, image_reason, reject

ImageSource = Union[Path, bytes]
FORMATS = ("trl", "rlaif_v", "vlfeedback", "mm_rlhf")
PAIRINGS = ("best", "all")
CHECKS = ("load", "verify")
ROLES = ("system", "user", "assistant")
MARKER = "<image>"
TIE_REASON = "tie (equal ratings)"
GAP_REASON = "rating gap below min_rating_gap"
_TEXT_COLS = {"trl": ("prompt", "chosen", "rejected"), "rlaif_v": ("question", "chosen", "rejected"),
              "mm_rlhf": ("prompt", "chosen", "rejected"), "vlfeedback": ("prompt", "completions")}
_IMAGE_COLS = {"trl": ("images", "image"), "rlaif_v": ("image",), "mm_rlhf": ("images", "image"),
               "vlfeedback": ("image", "img_path")}


@dataclass(frozen=True)
class VLPair:
    images: tuple[ImageSource, ...]
    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    meta: dict
    where: str = ""  # "file:line" or "dataset[row]"


@dataclass(frozen=True)
class VLConversation:
    images: tuple[ImageSource, ...]
    messages: list[dict]
    meta: dict
    where: str = ""


class _Reject(Exception):
    """A bad row: the reason, and what to append to the row's location."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


@dataclass
class _Ctx:
    base: Path | None
    image_root: Path | None
    allow_text_only: bool
    check: str
    seen: dict = field(default_factory=dict)  # path -> None (decodes) or the _Reject


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
        raise _Reject(f"non-string text in {col}")
    parts = []
    for p in content:
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "image":
            parts.append({"type": "image"})
        elif kind == "text":
            if not isinstance(p.get("text"), str):
                raise _Reject(f"non-string text in {col}")
            parts.extend(_split(p["text"]))
        else:
            raise _Reject(f"unsupported content part in {col}")
    return parts


def _messages(value: Any, col: str, role: str) -> list[dict]:
    """A string or a list of {role, content} turns, normalised; a string becomes one `role` turn."""
    if isinstance(value, str):
        return [{"role": role, "content": _split(value)}]
    if not isinstance(value, list) or not all(isinstance(m, dict) and "content" in m for m in value):
        raise _Reject(f"non-string text in {col}")
    out = []
    for m in value:
        if m.get("role") not in ROLES:
            raise _Reject(f"unknown role in {col}")
        out.append({"role": m["role"], "content": _content(m["content"], col)})
    return out


def _count(msgs: list[dict]) -> int:
    return sum(p["type"] == "image" for m in msgs for p in m["content"])


def _has_text(msgs: list[dict]) -> bool:
    return any(p["type"] == "text" for m in msgs for p in m["content"])


def _place_images(msgs: list[dict], n: int, col: str) -> list[dict]:
    """Check one placeholder per image; with none at all, put them first in the first user turn."""
    if any(_count([m]) for m in msgs if m["role"] == "assistant"):
        raise _Reject("image placeholder in an assistant turn")
    have = _count(msgs)
    if have == n:
        return msgs
    first_user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
    if have or first_user is None:
        raise _Reject(f"image placeholder count != image count in {col}" if have else f"no user turn in {col}")
    msgs = [dict(m) for m in msgs]
    msgs[first_user]["content"] = [{"type": "image"}] * n + msgs[first_user]["content"]
    return msgs


def _prompt(value: Any, col: str, n_images: int) -> list[dict]:
    msgs = _messages(value, col, "user")
    if not msgs or msgs[-1]["role"] != "user":
        raise _Reject(f"{col} does not end with a user turn")
    if not _has_text(msgs) and not n_images:
        raise _Reject(f"empty {col}")
    return _place_images(msgs, n_images, col)


def _reply(value: Any, col: str) -> list[dict]:
    msgs = _messages(value, col, "assistant")
    if any(m["role"] != "assistant" for m in msgs):
        raise _Reject(f"non-assistant turn in {col}")
    if _count(msgs):
        raise _Reject(f"image placeholder in {col}")
    if not _has_text(msgs):
        raise _Reject(f"empty {col}")
    return msgs


# ---- images ----

def _one_image(value: Any, ctx: _Ctx) -> ImageSource:
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
            raise _Reject("image file not found", f" ({p})")
        if str(p) not in ctx.seen:
            try:
                _verify(p, ctx)
                ctx.seen[str(p)] = None
            except _Reject as r:
                ctx.seen[str(p)] = r
        if ctx.seen[str(p)] is not None:
            raise ctx.seen[str(p)]
        return p
    if value is None or isinstance(value, (str, bytes)):
        raise _Reject("missing image")
    raise _Reject("unsupported image value", f" ({type(value).__name__})")


def _verify(src: Path | bytes, ctx: _Ctx) -> None:
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            im.load() if ctx.check == "load" else im.verify()
    except IMAGE_ERRORS as e:
        raise _Reject(image_reason(e), f" ({type(e).__name__}: {e})") from None


def _images(row: dict, cols: tuple[str, ...], ctx: _Ctx) -> tuple[ImageSource, ...]:
    col = next((c for c in cols if row.get(c) is not None), None)
    value = row.get(col) if col else None
    values = value if isinstance(value, (list, tuple)) else [] if value is None else [value]
    out = []
    for k, v in enumerate(values):
        try:
            out.append(_one_image(v, ctx))
        except _Reject as r:
            raise _Reject(r.reason, f" {col}[{k}]{r.detail}") from None
    if not out and not ctx.allow_text_only:
        raise _Reject("no image (text-only rows need allow_text_only=True)")
    return tuple(out)


def load_images(record: VLPair | VLConversation) -> list[Image.Image]:
    """The record's images decoded as RGB (they were checked while reading; a failure now is a DataError)."""
    out = []
    for k, src in enumerate(record.images):
        try:
            with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
                im.load()
                out.append(im.convert("RGB"))
        except IMAGE_ERRORS as e:
            raise DataError(f"{record.where} images[{k}]: {image_reason(e)} ({type(e).__name__}: {e})") from e
    return out


def image_files(records: Iterable[VLPair | VLConversation]) -> Iterator[Path]:
    """The image files `records` point to, as placed while reading (under `image_root`, else the data file's
    folder, or absolute); embedded images name none. A cache key covers them with `cache.files_fingerprint`."""
    return (src for rec in records for src in rec.images if isinstance(src, Path))


# ---- sources ----

def _source_rows(source: Any, jsonl_names: tuple[str, ...]):
    hub = (isinstance(source, str) and not Path(source).exists() and HUB_ID.fullmatch(source)
           and Path(source).suffix not in (".jsonl", ".parquet", ".json", ".arrow"))
    try:
        return source_rows(source, image_columns=None, jsonl_names=jsonl_names)
    except Exception as e:
        if not hub or isinstance(e, (DataError, ImportError)):
            raise
        raise DataError(f"could not load hub dataset {source!r} with datasets.load_dataset ({type(e).__name__}: "
                        f"{e}); offline? pass a local .jsonl / .parquet / save_to_disk copy instead") from e


def _parsed(row: Any) -> dict:
    if isinstance(row, BadRow):
        raise _Reject(str(row))
    if not isinstance(row, dict):
        raise _Reject("row is not a JSON object")
    return row


def detect_format(columns: Iterable[str]) -> str:
    """The pair format a row with these columns is in; DataError when none or several fit."""
    cols = set(columns)
    fits = [f for f in FORMATS if set(_TEXT_COLS[f]) <= cols]
    if "mm_rlhf" in fits and cols & {"chosen_reason", "rejected_reason"}:
        fits = ["mm_rlhf"]
    elif "mm_rlhf" in fits:
        fits.remove("mm_rlhf")  # same columns as trl and the same reading
    if len(fits) == 1:
        return fits[0]
    what = "ambiguous: fits " + ", ".join(fits) if fits else "unknown format"
    expected = "; ".join(f"{f}: {', '.join(_TEXT_COLS[f])}" for f in FORMATS)
    raise DataError(f"{what} (columns found: {sorted(cols)}); expected one of {expected}; pass format=...")


def _mean_rating(c: dict) -> float | str:
    """The mean rating of a completion, or the reason it has none."""
    ann = c.get("annotations")
    if not isinstance(ann, dict) or not ann:
        return "completion: missing annotations"
    vals = []
    for a in ann.values():
        r = a.get("Rating") if isinstance(a, dict) else None
        try:
            v = float(r) if isinstance(r, (str, int, float)) and not isinstance(r, bool) else math.nan
        except ValueError:
            v = math.nan
        if not math.isfinite(v):
            return "completion: non-numeric rating"
        vals.append(v)
    return sum(vals) / len(vals)


# ---- readers ----

def read_vl_pairs(source: Any, format: str = "auto", ties: str = "drop", bad_rows: str = "skip",
                  image_root: str | Path | None = None, min_rating_gap: float = 0.0, pairing: str = "best",
                  allow_text_only: bool = False, check_images: str = "load") -> tuple[list[VLPair], SkipReport]:
    """The valid pairs of `source` and a report of every row (or completion / candidate pair) left out."""
    check_policy(bad_rows)
    for name, val, ok in (("format", format, ("auto",) + FORMATS), ("tie policy", ties, ("drop", "error")),
                          ("pairing", pairing, PAIRINGS), ("check_images", check_images, CHECKS)):
        if val not in ok:
            raise ValueError(f"{name} must be one of {ok}, got {val!r}")
    rows, fmt = _detect(_source_rows(source, ("pairs.jsonl", "metadata.jsonl")), format)
    if fmt != "vlfeedback" and (min_rating_gap or pairing != "best"):
        raise ValueError(f"min_rating_gap and pairing apply to rated (vlfeedback) data, not {fmt}")
    ctx = _Ctx(None, Path(image_root) if image_root is not None else None, allow_text_only, check_images)
    report, out = SkipReport(), []
    for where, row, base in rows:
        report.total += 1
        ctx.base = base
        try:
            row = _parsed(row)
            missing = [c for c in _TEXT_COLS[fmt] if row.get(c) is None]
            if missing:
                raise _Reject(f"missing {', '.join(missing)}")
            if fmt == "vlfeedback":
                out.extend(_vlfeedback(row, where, ctx, report, bad_rows, ties, min_rating_gap, pairing))
            else:
                out.append(_simple(row, where, fmt, ctx))
        except _Reject as r:
            reject(report, bad_rows, r.reason, where + r.detail)
    report.kept = len(out)
    return out, report


def _detect(rows, format: str):
    """(rows, format): with "auto", the first JSON object's columns decide (rows before it are kept)."""
    if format != "auto":
        return rows, format
    rows, head = iter(rows), []
    for item in rows:
        head.append(item)
        if isinstance(item[1], dict) and not isinstance(item[1], BadRow):
            return itertools.chain(head, rows), detect_format(item[1])
    raise DataError("no JSON object row to detect the format from; pass format=...")


def _simple(row: dict, where: str, fmt: str, ctx: _Ctx) -> VLPair:
    """A trl / rlaif_v / mm_rlhf row."""
    pcol = _TEXT_COLS[fmt][0]
    chosen, rejected = _reply(row["chosen"], "chosen"), _reply(row["rejected"], "rejected")
    if chosen == rejected:
        raise _Reject("chosen == rejected")
    prompt = _messages(row[pcol], pcol, "user")  # text checks before the (slower) image checks
    images = _images(row, _IMAGE_COLS[fmt], ctx)
    prompt = _prompt(row[pcol], pcol, len(images))
    used = set(_TEXT_COLS[fmt]) | set(_IMAGE_COLS[fmt])
    return VLPair(images, prompt, chosen, rejected, {k: v for k, v in row.items() if k not in used}, where)


def _vlfeedback(row, where, ctx, report, bad_rows, ties, min_gap, pairing) -> list[VLPair]:
    _messages(row["prompt"], "prompt", "user")
    if not isinstance(row["completions"], list):
        raise _Reject("completions is not a list")
    images = _images(row, _IMAGE_COLS["vlfeedback"], ctx)
    prompt = _prompt(row["prompt"], "prompt", len(images))
    scored = []  # (score, index, completion, reply messages)
    for i, c in enumerate(row["completions"]):
        cw = f"{where} completions[{i}]"
        if not isinstance(c, dict) or not isinstance(c.get("response"), str):
            reject(report, bad_rows, "completion: missing or non-string response", cw)
            continue
        score = _mean_rating(c)
        if isinstance(score, str):
            reject(report, bad_rows, score, cw)
            continue
        try:
            scored.append((score, i, c, _reply(c["response"], "response")))
        except _Reject as r:
            reject(report, bad_rows, f"completion: {r.reason}", cw)
    if len(scored) < 2:
        raise _Reject("fewer than two rated completions")
    if pairing == "best":
        best = max(scored, key=lambda s: s[0])  # max / min keep the first of equals
        candidates = [(best, min(scored, key=lambda s: s[0]))]
    else:
        candidates = [(a, b) if a[0] >= b[0] else (b, a) for a, b in itertools.combinations(scored, 2)]
    meta = {k: v for k, v in row.items() if k not in ("prompt", "completions", "image", "img_path")}
    meta.update({k: row[k] for k in ("image", "img_path") if isinstance(row.get(k), str)})
    out = []
    for w, l in candidates:
        pw = where if pairing == "best" else f"{where} completions[{w[1]}] vs [{l[1]}]"
        if w[0] == l[0]:
            if ties == "error":
                raise DataError(f"{pw}: {TIE_REASON} ({w[0]}): no preferred completion (use ties='drop')")
            report.skip(TIE_REASON, pw)
        elif w[0] - l[0] < min_gap:
            report.skip(GAP_REASON, pw)
        elif w[3] == l[3]:
            reject(report, bad_rows, "chosen == rejected", pw)
        else:
            out.append(VLPair(images, prompt, w[3], l[3], {
                **meta, "chosen_model": w[2].get("model"), "rejected_model": l[2].get("model"),
                "chosen_score": w[0], "rejected_score": l[0]}, where))
    return out


def read_vl_conversations(source: Any, bad_rows: str = "skip", image_root: str | Path | None = None,
                          allow_text_only: bool = False,
                          check_images: str = "load") -> tuple[list[VLConversation], SkipReport]:
    """SFT rows: `images` + `messages`, or conversational `prompt` + `completion`; the last turn is the assistant's."""
    check_policy(bad_rows)
    if check_images not in CHECKS:
        raise ValueError(f"check_images must be one of {CHECKS}, got {check_images!r}")
    ctx = _Ctx(None, Path(image_root) if image_root is not None else None, allow_text_only, check_images)
    report, out = SkipReport(), []
    for where, row, base in _source_rows(source, ("conversations.jsonl", "metadata.jsonl")):
        report.total += 1
        ctx.base = base
        try:
            row = _parsed(row)
            if row.get("messages") is not None:
                msgs, used = _messages(row["messages"], "messages", "user"), {"messages"}
            elif row.get("prompt") is not None and row.get("completion") is not None:
                msgs = _messages(row["prompt"], "prompt", "user") + _messages(row["completion"], "completion",
                                                                                "assistant")
                used = {"prompt", "completion"}
            else:
                raise _Reject("missing messages (or prompt and completion)")
            if not msgs or msgs[-1]["role"] != "assistant":
                raise _Reject("last message is not from the assistant")
            if not _has_text(msgs[-1:]):
                raise _Reject("empty assistant reply")
            images = _images(row, ("images", "image"), ctx)
            msgs = _place_images(msgs, len(images), "messages")
            meta = {k: v for k, v in row.items() if k not in used | {"images", "image"}}
            out.append(VLConversation(images, msgs, meta, where))
        except _Reject as r:
            reject(report, bad_rows, r.reason, where + r.detail)
    report.kept = len(out)
    return out, report


# ---- writers ----

def _save_images(out_dir: Path, i: int, images: list) -> list[str]:
    names = [f"images/{i:06d}_{k}.png" for k in range(len(images))]
    for name, im in zip(names, images):
        im.convert("RGB").save(out_dir / name)
    return names


def _write_jsonl(out_dir: str | Path, name: str, rows: Iterable, make_row) -> Path:
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    path, tmp = out_dir / name, out_dir / (name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            try:
                obj = make_row(out_dir, i, *r)
            except _Reject as e:
                raise ValueError(f"row {i}: {e.reason}") from None
            f.write(json.dumps(obj) + "\n")
    os.replace(tmp, path)
    return path


def _check_meta(meta: dict | None, core: tuple[str, ...], i: int) -> dict:
    clash = set(meta or {}) & set(core)
    if clash:
        raise ValueError(f"row {i}: meta keys {sorted(clash)} clash with the columns {core}")
    return dict(meta or {})


def write_vl_pairs_jsonl(out_dir: str | Path, rows: Iterable[tuple[list, str, str, str, dict]]) -> Path:
    """Write (images, prompt_text, chosen_text, rejected_text, meta) as `images/*.png` + `pairs.jsonl` (trl format).

    "<image>" markers in the prompt place the images; without any they go first. Returns the jsonl path.
    """
    core = ("images", "prompt", "chosen", "rejected")

    def make(out_dir, i, images, prompt, chosen, rejected, meta):
        meta = _check_meta(meta, core, i)
        row = {"prompt": _prompt(prompt, "prompt", len(images)), "chosen": _reply(chosen, "chosen"),
               "rejected": _reply(rejected, "rejected")}
        return {"images": _save_images(out_dir, i, images), **row, **meta}
    return _write_jsonl(out_dir, "pairs.jsonl", rows, make)


def write_vl_conversations_jsonl(out_dir: str | Path, rows: Iterable[tuple[list, list[dict], dict]]) -> Path:
    """Write (images, messages, meta) as `images/*.png` + `conversations.jsonl` (TRL `images` + `messages`)."""
    def make(out_dir, i, images, messages, meta):
        meta = _check_meta(meta, ("images", "messages"), i)
        msgs = _place_images(_messages(messages, "messages", "user"), len(images), "messages")
        if not msgs or msgs[-1]["role"] != "assistant":
            raise _Reject("last message is not from the assistant")
        return {"images": _save_images(out_dir, i, images), "messages": msgs, **meta}
    return _write_jsonl(out_dir, "conversations.jsonl", rows, make)
