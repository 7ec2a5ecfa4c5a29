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

One code path: `PairReader` / `ConversationReader` turn one raw row into its records (counting skips); the lazy
`iter_vl_pairs` / `iter_vl_conversations` and the list readers `read_vl_pairs` / `read_vl_conversations` (small
sources, tests) run them over a source, and the sharded MLLM encoder (`mllm/sharded.py`) over ranges of it.
Message and image checks live in `vl_messages.py`.
"""
from __future__ import annotations

import io
import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image

from .pairs import HUB_ID, BadRow, source_rows
from .records import IMAGE_ERRORS, DataError, SkipReport, check_policy, image_reason, reject
from .vl_messages import (MARKER, ROLES, ImageSource, RowContext, has_text, message_images, row_messages, place_images,  # noqa: F401
                          prompt_of, Reject, reply_of)

FORMATS = ("trl", "rlaif_v", "vlfeedback", "mm_rlhf")
PAIRINGS = ("best", "all")
CHECKS = ("load", "verify")
TIE_REASON = "tie (equal ratings)"
GAP_REASON = "rating gap below min_rating_gap"
_TEXT_COLS = {"trl": ("prompt", "chosen", "rejected"), "rlaif_v": ("question", "chosen", "rejected"),
              "mm_rlhf": ("prompt", "chosen", "rejected"), "vlfeedback": ("prompt", "completions")}
IMAGE_COLS = {"trl": ("images", "image"), "rlaif_v": ("image",), "mm_rlhf": ("images", "image"),
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

def vl_source_rows(source: Any, jsonl_names: tuple[str, ...], by_range: bool = False):
    """The raw rows of `source` (by_range: a `RowSource`, rows of any range without reading those before it)."""
    hub = (isinstance(source, str) and not Path(source).exists() and HUB_ID.fullmatch(source)
           and Path(source).suffix not in (".jsonl", ".parquet", ".json", ".arrow"))
    try:
        if by_range:
            from .row_source import RowSource
            return RowSource(source, image_columns=None, jsonl_names=jsonl_names)
        return source_rows(source, image_columns=None, jsonl_names=jsonl_names)
    except Exception as e:
        if not hub or isinstance(e, (DataError, ImportError)):
            raise
        raise DataError(f"could not load hub dataset {source!r} with datasets.load_dataset ({type(e).__name__}: "
                        f"{e}); offline? pass a local .jsonl / .parquet / save_to_disk copy instead") from e


def _parsed(row: Any) -> dict:
    if isinstance(row, BadRow):
        raise Reject(str(row))
    if not isinstance(row, dict):
        raise Reject("row is not a JSON object")
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


# ---- readers: one raw row at a time ----

class _Reader:
    """Shared settings of a row reader; `row(item, report, ctx)` turns one raw (where, row, base) of a source
    into its records, counting the row in `report.total` and any skip by reason. Picklable (DataLoader workers)."""
    jsonl_names: tuple[str, ...] = ()

    def __init__(self, bad_rows: str, image_root: str | Path | None, allow_text_only: bool, check_images: str):
        check_policy(bad_rows)
        if check_images not in CHECKS:
            raise ValueError(f"check_images must be one of {CHECKS}, got {check_images!r}")
        self.bad_rows, self.allow_text_only, self.check_images = bad_rows, allow_text_only, check_images
        self.image_root = Path(image_root) if image_root is not None else None

    def new_ctx(self) -> RowContext:
        """A fresh image-check memo (a path seen twice is decoded once); keep one per shard, not per source."""
        return RowContext(None, self.image_root, self.allow_text_only, self.check_images)

    def row(self, item: tuple[str, Any, Path | None], report: SkipReport, ctx: RowContext) -> list:
        where, row, base = item
        report.total += 1
        ctx.base = base
        try:
            return self._records(_parsed(row), where, ctx, report)
        except Reject as r:
            reject(report, self.bad_rows, r.reason, where + r.detail)
            return []

    def iter(self, items: Iterable, report: SkipReport) -> Iterator:
        """The records of `items`, lazily (`report.kept` is left to the caller)."""
        ctx = self.new_ctx()
        for item in items:
            yield from self.row(item, report, ctx)


class PairReader(_Reader):
    """Rows of one (detected) pair format → VLPair; see the module doc."""
    jsonl_names = ("pairs.jsonl", "metadata.jsonl")

    def __init__(self, format: str, ties: str = "drop", bad_rows: str = "skip",
                 image_root: str | Path | None = None, min_rating_gap: float = 0.0, pairing: str = "best",
                 allow_text_only: bool = False, check_images: str = "load"):
        super().__init__(bad_rows, image_root, allow_text_only, check_images)
        _check_pair_options(format, ties, pairing, FORMATS)
        if format != "vlfeedback" and (min_rating_gap or pairing != "best"):
            raise ValueError(f"min_rating_gap and pairing apply to rated (vlfeedback) data, not {format}")
        self.format, self.ties, self.min_gap, self.pairing = format, ties, min_rating_gap, pairing

    def _records(self, row: dict, where: str, ctx: RowContext, report: SkipReport) -> list[VLPair]:
        missing = [c for c in _TEXT_COLS[self.format] if row.get(c) is None]
        if missing:
            raise Reject(f"missing {', '.join(missing)}")
        if self.format == "vlfeedback":
            return _vlfeedback(row, where, ctx, report, self.bad_rows, self.ties, self.min_gap, self.pairing)
        return [_simple(row, where, self.format, ctx)]


class ConversationReader(_Reader):
    """SFT rows: `images` + `messages`, or conversational `prompt` + `completion`; the last turn is the
    assistant's."""
    jsonl_names = ("conversations.jsonl", "metadata.jsonl")

    def __init__(self, bad_rows: str = "skip", image_root: str | Path | None = None, allow_text_only: bool = False,
                 check_images: str = "load"):
        super().__init__(bad_rows, image_root, allow_text_only, check_images)

    def _records(self, row: dict, where: str, ctx: RowContext, report: SkipReport) -> list[VLConversation]:
        if row.get("messages") is not None:
            msgs, used = row_messages(row["messages"], "messages", "user"), {"messages"}
        elif row.get("prompt") is not None and row.get("completion") is not None:
            msgs = row_messages(row["prompt"], "prompt", "user") + row_messages(row["completion"], "completion",
                                                                            "assistant")
            used = {"prompt", "completion"}
        else:
            raise Reject("missing messages (or prompt and completion)")
        if not msgs or msgs[-1]["role"] != "assistant":
            raise Reject("last message is not from the assistant")
        if not has_text(msgs[-1:]):
            raise Reject("empty assistant reply")
        images = message_images(row, ("images", "image"), ctx)
        msgs = place_images(msgs, len(images), "messages")
        meta = {k: v for k, v in row.items() if k not in used | {"images", "image"}}
        return [VLConversation(images, msgs, meta, where)]


def _check_pair_options(format: str, ties: str, pairing: str, formats: tuple[str, ...]) -> None:
    for name, val, ok in (("format", format, formats), ("tie policy", ties, ("drop", "error")),
                          ("pairing", pairing, PAIRINGS)):
        if val not in ok:
            raise ValueError(f"{name} must be one of {ok}, got {val!r}")


def pair_reader(rows: Iterable, format: str = "auto", **options) -> tuple[Iterator, PairReader]:
    """(rows, reader) for a source's raw rows: with format="auto" the first JSON object's columns decide (the
    rows read to find it are put back in front). `options` as `PairReader`'s."""
    _check_pair_options(format, options.get("ties", "drop"), options.get("pairing", "best"), ("auto",) + FORMATS)
    check_policy(options.get("bad_rows", "skip"))
    if options.get("check_images", "load") not in CHECKS:
        raise ValueError(f"check_images must be one of {CHECKS}, got {options['check_images']!r}")
    rows, fmt = _detect(rows, format)
    return rows, PairReader(fmt, **options)


def iter_vl_pairs(source: Any, report: SkipReport, format: str = "auto", **options) -> Iterator[VLPair]:
    """The valid pairs of `source`, lazily; every row (or completion / candidate pair) left out is counted in
    `report` (its `kept` is the caller's)."""
    rows, reader = pair_reader(vl_source_rows(source, PairReader.jsonl_names), format, **options)
    return reader.iter(rows, report)


def read_vl_pairs(source: Any, format: str = "auto", ties: str = "drop", bad_rows: str = "skip",
                  image_root: str | Path | None = None, min_rating_gap: float = 0.0, pairing: str = "best",
                  allow_text_only: bool = False, check_images: str = "load") -> tuple[list[VLPair], SkipReport]:
    """The valid pairs of `source` as a list (small sources, tests) and a report of every row left out."""
    report = SkipReport()
    out = list(iter_vl_pairs(source, report, format, ties=ties, bad_rows=bad_rows, image_root=image_root,
                             min_rating_gap=min_rating_gap, pairing=pairing, allow_text_only=allow_text_only,
                             check_images=check_images))
    report.kept = len(out)
    return out, report


def iter_vl_conversations(source: Any, report: SkipReport, **options) -> Iterator[VLConversation]:
    """The valid conversations of `source`, lazily (see `iter_vl_pairs`); `options` as `ConversationReader`'s."""
    reader = ConversationReader(**options)
    return reader.iter(vl_source_rows(source, ConversationReader.jsonl_names), report)


def read_vl_conversations(source: Any, bad_rows: str = "skip", image_root: str | Path | None = None,
                          allow_text_only: bool = False,
                          check_images: str = "load") -> tuple[list[VLConversation], SkipReport]:
    """SFT rows as a list, and a report of every row left out; see `ConversationReader`."""
    report = SkipReport()
    out = list(iter_vl_conversations(source, report, bad_rows=bad_rows, image_root=image_root,
                                     allow_text_only=allow_text_only, check_images=check_images))
    report.kept = len(out)
    return out, report


def referenced_image_files(source: Any, columns: tuple[str, ...], image_root: str | Path | None = None,
                           jsonl_names: tuple[str, ...] = PairReader.jsonl_names) -> Iterator[Path]:
    """Every file the image `columns` of `source` name by path (a string, {"bytes", "path"} or a list of those),
    placed as the readers place them, whether or not it exists or its row is valid: for a cache key
    (`cache.files_fingerprint`); nothing is decoded. Parquet and Arrow columns are read without their bytes
    (`pairs.source_rows(paths_of=...)`), which sees string and struct columns only: there, paths inside list
    columns are not covered (their container file is)."""
    root = Path(image_root) if image_root is not None else None
    for _, row, base in source_rows(source, image_columns=None, jsonl_names=jsonl_names, paths_of=columns):
        if not isinstance(row, dict):
            continue
        for col in columns:
            value = row.get(col)
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, dict):
                    v = None if v.get("bytes") else v.get("path")
                if isinstance(v, str) and v:
                    p, at = Path(v), root if root is not None else base
                    yield p if p.is_absolute() or at is None else at / p


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


def _simple(row: dict, where: str, fmt: str, ctx: RowContext) -> VLPair:
    """A trl / rlaif_v / mm_rlhf row."""
    pcol = _TEXT_COLS[fmt][0]
    chosen, rejected = reply_of(row["chosen"], "chosen"), reply_of(row["rejected"], "rejected")
    if chosen == rejected:
        raise Reject("chosen == rejected")
    prompt = row_messages(row[pcol], pcol, "user")  # text checks before the (slower) image checks
    images = message_images(row, IMAGE_COLS[fmt], ctx)
    prompt = prompt_of(row[pcol], pcol, len(images))
    used = set(_TEXT_COLS[fmt]) | set(IMAGE_COLS[fmt])
    return VLPair(images, prompt, chosen, rejected, {k: v for k, v in row.items() if k not in used}, where)


def _vlfeedback(row, where, ctx, report, bad_rows, ties, min_gap, pairing) -> list[VLPair]:
    row_messages(row["prompt"], "prompt", "user")
    if not isinstance(row["completions"], list):
        raise Reject("completions is not a list")
    images = message_images(row, IMAGE_COLS["vlfeedback"], ctx)
    prompt = prompt_of(row["prompt"], "prompt", len(images))
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
            scored.append((score, i, c, reply_of(c["response"], "response")))
        except Reject as r:
            reject(report, bad_rows, f"completion: {r.reason}", cw)
    if len(scored) < 2:
        raise Reject("fewer than two rated completions")
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
            except Reject as e:
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
        row = {"prompt": prompt_of(prompt, "prompt", len(images)), "chosen": reply_of(chosen, "chosen"),
               "rejected": reply_of(rejected, "rejected")}
        return {"images": _save_images(out_dir, i, images), **row, **meta}
    return _write_jsonl(out_dir, "pairs.jsonl", rows, make)


def write_vl_conversations_jsonl(out_dir: str | Path, rows: Iterable[tuple[list, list[dict], dict]]) -> Path:
    """Write (images, messages, meta) as `images/*.png` + `conversations.jsonl` (TRL `images` + `messages`)."""
    def make(out_dir, i, images, messages, meta):
        meta = _check_meta(meta, ("images", "messages"), i)
        msgs = place_images(row_messages(messages, "messages", "user"), len(images), "messages")
        if not msgs or msgs[-1]["role"] != "assistant":
            raise Reject("last message is not from the assistant")
        return {"images": _save_images(out_dir, i, images), "messages": msgs, **meta}
    return _write_jsonl(out_dir, "conversations.jsonl", rows, make)
