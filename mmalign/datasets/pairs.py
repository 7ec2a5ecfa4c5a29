"""Preference pairs in the Pick-a-Pic v2 format, validated row by row.

Row schema: `caption` (str), `jpg_0`, `jpg_1` (an image: raw encoded bytes, a dict {"bytes": b, "path": p} as the
Hugging Face Image feature stores it in parquet, or a path relative to the source file's folder, or absolute) and
`label_0`: 1 means jpg_0 is preferred, 0 means jpg_1 is preferred, 0.5 is a tie. Other columns are kept in `extra`.

Sources: a `.jsonl` or `.parquet` file; a folder with `metadata.jsonl` or `*.parquet` shards; a folder written by
`datasets` `save_to_disk`; a `datasets.Dataset`; or a hub id `owner/name` (loaded with `datasets.load_dataset`).

Policies. A tie is not a bad row and is never read as "jpg_0 wins": under ties="drop" it is counted in the report as
"tie (label_0=0.5)", under ties="error" it raises `DataError` naming the row. A bad row (invalid JSON, missing,
non-string or empty caption, missing image, image file not found, label_0 other than 0, 0.5 or 1) is a counted
skip with its reason (bad_rows="skip") or a `DataError` naming the file and line/row (bad_rows="error"), as in
`records.py`.
`load_pair_images` decodes both images fully, so a corrupt one is found while building a cache, not mid-epoch; one
over Pillow's decompression-bomb limit (kept on) is refused from its header, before decoding, as "image too large".
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from PIL import Image

from ..core.paths import HUB_ID  # noqa: F401  (vl_records imports it from here)
from .records import DataError, SkipReport, check_policy, open_rgb, reject

TIE_POLICIES = ("drop", "error")
TIE_REASON = "tie (label_0=0.5)"
_CORE = ("caption", "jpg_0", "jpg_1", "label_0")
IMAGE_COLUMNS = ("jpg_0", "jpg_1")


@dataclass(frozen=True)
class PairRecord:
    caption: str
    image_w: bytes | Path  # the preferred image: raw encoded bytes or a file path
    image_l: bytes | Path  # the rejected image
    where: str             # "file:line" or "dataset[row]" for messages
    extra: dict            # other columns kept (e.g. scores)


class BadRow(str):
    """A row that could not even be parsed; the string is the reason."""


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any, Path]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line), path.parent
            except json.JSONDecodeError as e:
                yield f"{path}:{n}", BadRow(f"invalid JSON ({e.msg})"), path.parent


def _parquet_rows(path: Path, paths_of: tuple[str, ...] | None = None) -> Iterator[tuple[str, Any, Path]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow: pip install 'mmalign[data]'") from e
    import pyarrow as pa
    try:
        f = pq.ParquetFile(path, pre_buffer=False)  # pre-buffering reads every row group ahead: RSS ~ file size
    except (pa.ArrowException, OSError) as e:  # empty, truncated or not parquet at all
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    i = 0
    leaves = None if paths_of is None else _path_leaves(f.schema_arrow, paths_of)
    if leaves == []:  # no column can name a file
        return
    columns = None if leaves is None else [c if k is None else f"{c}.{k}" for c, k in leaves]  # no bytes read
    for batch in f.iter_batches(batch_size=256, columns=columns):
        for row in (batch.to_pylist() if leaves is None else _path_cells(batch, leaves)):
            yield f"{path}[{i}]", row, path.parent
            i += 1


def dataset_rows(ds: Any, name: str = "dataset", image_columns: tuple[str, ...] | None = IMAGE_COLUMNS,
                  paths_of: tuple[str, ...] | None = None) -> Iterator[tuple[str, Any, Path | None]]:
    """Rows of a Dataset/DatasetDict with `image_columns` kept encoded; None keeps every image (any nesting)."""
    if hasattr(ds, "keys") and not hasattr(ds, "features"):  # a DatasetDict
        if "train" not in ds:
            raise DataError(f"{name}: a DatasetDict without a 'train' split (splits: {list(ds.keys())})")
        ds = ds["train"]
    if paths_of is not None and hasattr(ds, "with_format"):
        ds = ds.select_columns([c for c in paths_of if c in ds.column_names]).with_format("arrow")
        i = 0
        for batch in ds.iter(batch_size=1024):
            for row in _path_cells(batch, _path_leaves(batch.schema, paths_of)):
                yield f"{name}[{i}]", row, None
                i += 1
        return
    if image_columns is None and hasattr(ds, "with_format"):
        # raw Arrow rows: Image features (also inside lists) stay {"bytes", "path"} dicts, nothing is decoded
        i = 0
        for batch in ds.with_format("arrow").iter(batch_size=256):
            for row in batch.to_pylist():
                yield f"{name}[{i}]", row, None
                i += 1
        return
    features = getattr(ds, "features", None) or {}
    for col in image_columns or ():  # keep encoded bytes: decoding happens in load_pair_images
        if type(features.get(col)).__name__ == "Image":
            import datasets
            ds = ds.cast_column(col, datasets.Image(decode=False))
    for i, row in enumerate(ds):
        yield f"{name}[{i}]", row, None


def datasets_lib(source):
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"reading {source} needs Hugging Face datasets: pip install 'mmalign[data]'") from e
    return datasets


def source_rows(source: Any, image_columns: tuple[str, ...] | None = IMAGE_COLUMNS,
          jsonl_names: tuple[str, ...] = ("metadata.jsonl",),
          paths_of: tuple[str, ...] | None = None) -> Iterator[tuple[str, Any, Path | None]]:
    """(where, row, base folder) for every row of a source; `jsonl_names` are looked for in a folder, in order.
    With `paths_of`, parquet and Arrow rows hold only those columns' file paths (their bytes are not read)."""
    if not isinstance(source, (str, os.PathLike)):
        return dataset_rows(source, image_columns=image_columns, paths_of=paths_of)
    p = Path(source)
    if p.is_file():
        if p.suffix == ".jsonl":
            return _jsonl_rows(p)
        if p.suffix == ".parquet":
            return _parquet_rows(p, paths_of)
        raise DataError(f"{p}: unsupported pair file (expected .jsonl or .parquet)")
    if p.is_dir():
        for name in jsonl_names:
            if (p / name).is_file():
                return _jsonl_rows(p / name)
        if any((p / m).is_file() for m in ("dataset_info.json", "state.json", "dataset_dict.json")):
            datasets = datasets_lib(p)
            return dataset_rows(datasets.load_from_disk(str(p)), str(p), image_columns, paths_of)
        shards = sorted(p.glob("*.parquet"))
        if shards:
            return (r for s in shards for r in _parquet_rows(s, paths_of))
        raise DataError(f"{p}: no {' / '.join(jsonl_names)}, *.parquet shards or save_to_disk dataset in this folder")
    s = str(source)
    if HUB_ID.fullmatch(s) and p.suffix not in (".jsonl", ".parquet", ".json", ".arrow"):
        datasets = datasets_lib(s)
        return dataset_rows(datasets.load_dataset(s, split="train"), s, image_columns, paths_of)
    raise FileNotFoundError(f"pair source {s!r}: no such file or folder (and not a hub id like 'owner/name')")


def _image_ref(value: Any, base: Path | None) -> bytes | Path | None:
    """What an image cell holds: encoded bytes, the path it names (relative to `base` unless absolute; not checked
    for existence), or None."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value):
        return bytes(value)
    if isinstance(value, str) and value:
        return Path(value) if base is None or Path(value).is_absolute() else base / value
    return None


def _image(value: Any, base: Path | None, col: str) -> bytes | Path | str:
    """The image as bytes or an existing path; a plain str return value is the reason it is bad."""
    ref = _image_ref(value, base)
    if ref is None:
        return f"missing {col}"
    return "image file not found" if isinstance(ref, Path) and not ref.is_file() else ref


def _path_leaves(schema: Any, columns: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """Where the `columns` of an Arrow schema can name a file: (column, None) for a string column, (column,
    "path") for an {"bytes", "path"} struct; binary columns name none."""
    import pyarrow as pa

    out = []
    for col in columns:
        t = schema.field(col).type if col in schema.names else None
        if t is not None and (pa.types.is_string(t) or pa.types.is_large_string(t)):
            out.append((col, None))
        elif t is not None and pa.types.is_struct(t) and t.get_field_index("path") >= 0:
            out.append((col, "path"))
    return out


def _path_cells(table: Any, leaves: list[tuple[str, str | None]]) -> list[dict]:
    """One {column: path or None} row per row of an Arrow table or batch, from the `leaves` only; a struct cell
    with non-empty bytes (when they are there) names no path, as in `_image_ref`. Only offsets are read."""
    import pyarrow.compute as pc

    cols = {}
    for c, k in leaves:
        col = table.column(c)
        if k is None:
            cols[c] = col.to_pylist()
            continue
        paths = pc.struct_field(col, k)
        if col.type.get_field_index("bytes") >= 0:
            embedded = pc.fill_null(pc.greater(pc.binary_length(pc.struct_field(col, "bytes")), 0), False)
            paths = pc.if_else(embedded, None, paths)
        cols[c] = paths.to_pylist()
    return [dict(zip(cols, vals)) for vals in zip(*cols.values())] if cols else [{}] * table.num_rows


def referenced_files(source: Any) -> Iterator[Path]:
    """Every file the jpg_0 / jpg_1 cells of `source` name by path, placed by the rule `read_pairs` uses and
    yielded whether or not it exists, for a cache key (`cache.files_fingerprint`); nothing is decoded. Embedded
    bytes name none (their container file is fingerprinted itself). Parquet and Arrow image columns are read
    without their bytes, so there a cell with both bytes and a path yields the path too (at worst a needless
    cache miss, never a stale hit)."""
    for _, row, base in source_rows(source, paths_of=IMAGE_COLUMNS):
        if isinstance(row, dict):
            for col in IMAGE_COLUMNS:
                ref = _image_ref(row.get(col), base)
                if isinstance(ref, Path):
                    yield ref


def pair_label(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value) if value in (0, 0.5, 1) else None


def check_ties(ties: str) -> None:
    if ties not in TIE_POLICIES:
        raise ValueError(f"tie policy must be one of {TIE_POLICIES}, got {ties!r}")


def caption_ok(where: str, row: Any, report: SkipReport, bad_rows: str) -> bool:
    """Whether one raw row is a JSON object with a non-blank string caption; the row counts in `report.total`,
    and one that is not is rejected under `bad_rows`."""
    report.total += 1
    if isinstance(row, BadRow) or not isinstance(row, dict):
        reject(report, bad_rows, row if isinstance(row, BadRow) else "row is not a JSON object", where)
        return False
    if not isinstance(row.get("caption"), str):
        reject(report, bad_rows, "missing or non-string caption", where)
        return False
    if not row["caption"].strip():
        reject(report, bad_rows, "empty caption", where)
        return False
    return True


def captioned_rows(rows, report: SkipReport, bad_rows: str):
    """(where, row, base) of every row that passes `caption_ok`."""
    for where, row, base in rows:
        if caption_ok(where, row, report, bad_rows):
            yield where, row, base


def tie_left_out(label: float, ties: str, report: SkipReport, where: str, what: str) -> bool:
    """True when the row is a tie (label 0.5): counted as a skip, or a DataError under ties='error'."""
    if label != 0.5:
        return False
    if ties == "error":
        raise DataError(f"{where}: {TIE_REASON}: a tie has no preferred {what} (use ties='drop')")
    report.skip(TIE_REASON, where)
    return True


def pair_record(where: str, row: Any, base: Path | None, report: SkipReport, ties: str = "drop",
                bad_rows: str = "skip") -> PairRecord | None:
    """One raw row (as `source_rows` or `row_source.RowSource.rows` yield it) as a pair oriented winner/loser, or
    None when it is left out. The row counts in `report.total`; a bad row or a tie is a counted skip or a DataError
    under the policies (module doc). `report.kept` is the caller's to count."""
    if not caption_ok(where, row, report, bad_rows):
        return None
    label = pair_label(row.get("label_0"))
    if label is None:
        reject(report, bad_rows, "label_0 missing or not 0, 0.5 or 1", where)
        return None
    img0, img1 = _image(row.get("jpg_0"), base, "jpg_0"), _image(row.get("jpg_1"), base, "jpg_1")
    bad = next((i for i in (img0, img1) if isinstance(i, str)), None)
    if bad is not None:
        reject(report, bad_rows, bad, where)
        return None
    if tie_left_out(label, ties, report, where, "image"):
        return None
    w, l = (img0, img1) if label == 1 else (img1, img0)
    return PairRecord(row["caption"], w, l, where, {k: v for k, v in row.items() if k not in _CORE})


def iter_pairs(source: Any, report: SkipReport, ties: str = "drop", bad_rows: str = "skip") -> Iterator[PairRecord]:
    """The valid, non-tied pairs of `source`, lazily: memory holds one batch of source rows (256, or one
    parquet row group being read), never the data set. Every row is counted in `report` as it is read (kept
    included), so the report is complete once the iterator is exhausted."""
    check_policy(bad_rows)  # now, not at the first next()
    check_ties(ties)
    return _pairs(source_rows(source), report, ties, bad_rows)


def _pairs(rows, report: SkipReport, ties: str, bad_rows: str) -> Iterator[PairRecord]:
    for where, row, base in rows:
        rec = pair_record(where, row, base, report, ties, bad_rows)
        if rec is not None:
            report.kept += 1
            yield rec


def read_pairs(source: Any, ties: str = "drop", bad_rows: str = "skip") -> tuple[list[PairRecord], SkipReport]:
    """The valid, non-tied pairs of `source` (oriented winner/loser) as a list, and a report of every row left
    out (small sources; large ones go through `iter_pairs`)."""
    report = SkipReport()
    return list(iter_pairs(source, report, ties, bad_rows)), report


def load_pair_images(rec: PairRecord, report: SkipReport,
                     bad_rows: str) -> tuple[Image.Image, Image.Image] | None:
    """Both images fully decoded as RGB (winner, loser); None when one is unreadable and the pair skipped.

    A skipped pair is counted ("unreadable image", or "image too large" for a decompression bomb; the row and the
    image file named) and taken off `report.kept`, so kept + skipped == total.
    """
    images = []
    for side, src in (("winner", rec.image_w), ("loser", rec.image_l)):
        im = open_rgb(io.BytesIO(src) if isinstance(src, bytes) else src, report, bad_rows, f"{rec.where} {side}")
        if im is None:
            report.kept = max(0, report.kept - 1)
            return None
        images.append(im)
    return images[0], images[1]


def write_pair_folder(out_dir: str | Path, rows: Iterable[tuple[str, Any, Any, dict]], media: str,
                      columns: tuple[str, str], reserved: tuple[str, ...], save: Callable[[Any, Path], None],
                      suffixes: tuple[str, str], fixed: dict | None = None) -> Path:
    """Write (caption, preferred, rejected, extra) rows as `out_dir/<media>/<i><suffix>` files (`save(item,
    path)`) plus `metadata.jsonl` rows {caption, columns[0]: file, columns[1]: file, **fixed, **extra}, the
    metadata replaced atomically; extra keys may not shadow the `reserved` columns. Returns the metadata path."""
    out_dir = Path(out_dir)
    (out_dir / media).mkdir(parents=True, exist_ok=True)
    meta, tmp = out_dir / "metadata.jsonl", out_dir / "metadata.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i, (caption, item_w, item_l, extra) in enumerate(rows):
            clash = set(extra or {}) & set(reserved)
            if clash:
                raise ValueError(f"pair {i}: extra keys {sorted(clash)} clash with the pair columns")
            names = [f"{media}/{i:06d}{suffix}" for suffix in suffixes]
            save(item_w, out_dir / names[0])
            save(item_l, out_dir / names[1])
            f.write(json.dumps({"caption": caption, columns[0]: names[0], columns[1]: names[1], **(fixed or {}),
                                **(extra or {})}) + "\n")
    os.replace(tmp, meta)
    return meta


def write_pairs_jsonl(out_dir: str | Path, rows: Iterable[tuple[str, Image.Image, Image.Image, dict]]) -> Path:
    """Write (caption, winner, loser, extra) pairs as `out_dir/images/*.png` + `metadata.jsonl`; returns the latter.

    Rows follow the Pick-a-Pic format: jpg_0 is the winner, jpg_1 the loser, label_0 = 1, extra keys merged in.
    """
    return write_pair_folder(out_dir, rows, "images", ("jpg_0", "jpg_1"), _CORE,
                             lambda image, path: image.convert("RGB").save(path), ("_0.png", "_1.png"), {"label_0": 1})
