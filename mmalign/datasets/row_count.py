"""An upper bound of a data source's rows, read without decoding anything, so that a dataset too small for the
batch is refused before models load and images encode."""
from __future__ import annotations

import os
from pathlib import Path

# The jsonl names the readers look for in a folder (pairs, captions, conversations, video pairs).
FOLDER_JSONL = ("metadata.jsonl", "pairs.jsonl", "conversations.jsonl")


def _jsonl_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _parquet_rows(path: Path) -> int | None:
    try:
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # unreadable: the reader reports it properly later
        return None


def count_rows(source: str | os.PathLike) -> int | None:
    """At most how many rows `source` holds: a .jsonl file's non-blank lines, a .parquet file's row count, a
    folder's jsonl (the largest of FOLDER_JSONL) or parquet shards. None when unknown (a hub id, a save_to_disk
    folder, a missing or unreadable source): the reader decides then."""
    p = Path(source)
    if p.is_file():
        return _jsonl_lines(p) if p.suffix == ".jsonl" else _parquet_rows(p) if p.suffix == ".parquet" else None
    if not p.is_dir():
        return None
    found = [_jsonl_lines(p / name) for name in FOLDER_JSONL if (p / name).is_file()]
    if found:
        return max(found)
    shards = sorted(p.glob("*.parquet"))
    counts = [_parquet_rows(s) for s in shards]
    return sum(counts) if shards and None not in counts else None
