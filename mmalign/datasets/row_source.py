"""A data source's raw rows, addressable by range without reading the rows before it, for sharded encoding
(`shards.build_sharded`): `RowSource(source)` resolves the source once (the same rules as `pairs.source_rows`),
knows its length, and `rows(start, stop)` yields (where, row, base folder) for rows [start, stop).

- jsonl: one pass at construction records the byte offset of every `STRIDE`-th non-blank line (a few KB for a
  million rows); a range seeks there. Blank lines are not rows; `where` keeps the physical line number.
- parquet (a file or a folder of shards): row-group sizes come from the footer; a range reads only the row groups
  it overlaps, in batches of 256 rows.
- a `datasets` Dataset (a `save_to_disk` folder, an object, or a hub id through `load_dataset`): Arrow is memory
  mapped; a range is a `select`. Image columns stay encoded ({"bytes", "path"}), as in `pairs.source_rows`.
The object holds no open file and pickles into DataLoader workers.
"""
from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Any, Iterator

from .pairs import IMAGE_COLUMNS, BadRow, HUB_ID, datasets_lib, dataset_rows
from .records import DataError

STRIDE = 256


class _Jsonl:
    def __init__(self, path: Path):
        self.path, self.marks = path, []  # (row, byte offset, physical line number) of every STRIDE-th row
        n = 0
        with open(path, "rb") as f:
            offset = 0
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    if n % STRIDE == 0:
                        self.marks.append((n, offset, line_no))
                    n += 1
                offset += len(line)
        self.n = n

    def rows(self, start: int, stop: int) -> Iterator[tuple[str, Any, Path]]:
        if start >= stop:
            return
        row, offset, line_no = self.marks[start // STRIDE]
        with open(self.path, "rb") as f:
            f.seek(offset)
            for line in f:
                if line.strip():
                    if row >= stop:
                        return
                    if row >= start:
                        yield f"{self.path}:{line_no}", _parse(line), self.path.parent
                    row += 1
                line_no += 1


def _parse(line: bytes) -> Any:
    try:
        return json.loads(line)
    except UnicodeDecodeError:
        return BadRow("invalid JSON (not UTF-8)")
    except json.JSONDecodeError as e:
        return BadRow(f"invalid JSON ({e.msg})")


class _Parquet:
    def __init__(self, path: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            meta = pq.ParquetFile(path).metadata
        except (pa.ArrowException, OSError) as e:  # empty, truncated or not parquet at all
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
        self.path, self.groups = path, [0]
        for g in range(meta.num_row_groups):
            self.groups.append(self.groups[-1] + meta.row_group(g).num_rows)
        self.n = self.groups[-1]

    def rows(self, start: int, stop: int) -> Iterator[tuple[str, Any, Path]]:
        import pyarrow.parquet as pq
        if start >= stop:
            return
        first = bisect.bisect_right(self.groups, start) - 1
        last = bisect.bisect_left(self.groups, stop)
        i = self.groups[first]
        f = pq.ParquetFile(self.path, pre_buffer=False)  # pre-buffering holds every row group of the range
        for batch in f.iter_batches(batch_size=256, row_groups=range(first, last)):
            if i + batch.num_rows <= start:
                i += batch.num_rows
                continue
            lo, hi = max(start - i, 0), min(stop - i, batch.num_rows)
            for k, row in enumerate(batch.slice(lo, hi - lo).to_pylist()):
                yield f"{self.path}[{i + lo + k}]", row, self.path.parent
            i += batch.num_rows
            if i >= stop:
                return


class _Dataset:
    def __init__(self, ds: Any, name: str, image_columns: tuple[str, ...] | None):
        if hasattr(ds, "keys") and not hasattr(ds, "features"):  # a DatasetDict
            if "train" not in ds:
                raise DataError(f"{name}: a DatasetDict without a 'train' split (splits: {list(ds.keys())})")
            ds = ds["train"]
        self.ds, self.name, self.image_columns, self.n = ds, name, image_columns, len(ds)

    def rows(self, start: int, stop: int) -> Iterator[tuple[str, Any, None]]:
        part = self.ds.select(range(start, min(stop, self.n)))
        for k, (_, row, base) in enumerate(dataset_rows(part, self.name, self.image_columns)):
            yield f"{self.name}[{start + k}]", row, base


class RowSource:
    """The rows of a pair/record source by range; see the module doc. `jsonl_names` are looked for in a folder,
    in order; `image_columns` stay encoded in Dataset rows (None: every image column, at any nesting)."""

    def __init__(self, source: Any, image_columns: tuple[str, ...] | None = IMAGE_COLUMNS,
                 jsonl_names: tuple[str, ...] = ("metadata.jsonl",)):
        self.parts = _resolve(source, image_columns, jsonl_names)
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + part.n)

    def __len__(self) -> int:
        return self.starts[-1]

    def rows(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, Any, Path | None]]:
        stop = len(self) if stop is None else min(stop, len(self))
        for k, part in enumerate(self.parts):
            lo, hi = max(start, self.starts[k]), min(stop, self.starts[k + 1])
            if lo < hi:
                yield from part.rows(lo - self.starts[k], hi - self.starts[k])


def _resolve(source: Any, image_columns, jsonl_names) -> list:
    if not isinstance(source, (str, os.PathLike)):
        return [_Dataset(source, "dataset", image_columns)]
    p = Path(source)
    if p.is_file():
        if p.suffix == ".jsonl":
            return [_Jsonl(p)]
        if p.suffix == ".parquet":
            return [_Parquet(p)]
        raise DataError(f"{p}: unsupported pair file (expected .jsonl or .parquet)")
    if p.is_dir():
        for name in jsonl_names:
            if (p / name).is_file():
                return [_Jsonl(p / name)]
        if any((p / m).is_file() for m in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return [_Dataset(datasets_lib(p).load_from_disk(str(p)), str(p), image_columns)]
        shards = sorted(p.glob("*.parquet"))
        if shards:
            return [_Parquet(s) for s in shards]
        raise DataError(f"{p}: no {' / '.join(jsonl_names)}, *.parquet shards or save_to_disk dataset in this folder")
    s = str(source)
    if HUB_ID.fullmatch(s) and p.suffix not in (".jsonl", ".parquet", ".json", ".arrow"):
        return [_Dataset(datasets_lib(s).load_dataset(s, split="train"), s, image_columns)]
    raise FileNotFoundError(f"pair source {s!r}: no such file or folder (and not a hub id like 'owner/name')")
