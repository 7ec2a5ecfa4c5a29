"""RowSource: any range of a source's rows equals the same slice of `pairs.source_rows`, for jsonl (blank and bad
lines), parquet files and folders (several row groups) and datasets folders."""
from __future__ import annotations

import json

import pytest

from mmalign.datasets import row_source
from mmalign.datasets.pairs import source_rows
from mmalign.datasets.records import DataError
from mmalign.datasets.row_source import RowSource


def rows(n):
    return [{"caption": f"c{i}", "jpg_0": {"bytes": bytes([i % 250 + 1]), "path": None}, "jpg_1": f"{i}.png",
             "label_0": i % 2} for i in range(n)]


def check_ranges(src, monkeypatch=None):
    full = list(source_rows(src))
    rs = RowSource(src)
    assert len(rs) == len(full)
    for start, stop in [(0, len(full)), (0, 1), (3, 9), (7, 8), (len(full) - 2, len(full) + 5), (5, 5)]:
        assert [(w, r) for w, r, _ in rs.rows(start, stop)] == [(w, r) for w, r, _ in full[start:stop]]


@pytest.fixture
def small_stride(monkeypatch):
    monkeypatch.setattr(row_source, "STRIDE", 4)


def test_jsonl_with_blank_and_bad_lines(tmp_path, small_stride):
    lines = [json.dumps({**r, "jpg_0": "a.png"}) for r in rows(20)]
    lines[5] = "{not json"
    lines.insert(9, "")
    lines.insert(2, "   ")
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    check_ranges(tmp_path / "metadata.jsonl")
    check_ranges(tmp_path)


def test_parquet_row_groups_and_folder_of_shards(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    (tmp_path / "shards").mkdir()
    for k in range(2):
        pq.write_table(pa.Table.from_pylist(rows(13)), tmp_path / "shards" / f"part{k}.parquet", row_group_size=4)
    check_ranges(tmp_path / "shards" / "part0.parquet")
    check_ranges(tmp_path / "shards")
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="not a readable parquet"):
        RowSource(tmp_path / "empty.parquet")


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{**r, "jpg_0": bytes([1]), "jpg_1": bytes([2])} for r in rows(11)])
    ds.save_to_disk(str(tmp_path / "ds"))
    check_ranges(tmp_path / "ds")
    check_ranges(ds)
