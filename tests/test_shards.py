"""The sharded tensor cache: lazy rows, tables, skip reports merged over shards, resume after a kill, torn shards
and index recomputed, out-of-disk errors, worker pools and per-rank encoding."""
from __future__ import annotations

import errno
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from mmalign.datasets import shards
from mmalign.datasets.shards import build_sharded

SOURCE = list(range(-3, 20))  # negatives are bad rows


def read(start, stop):
    return SOURCE[start:stop]


def prepare(rows, report):
    kept = []
    for v in rows:
        report.total += 1
        if v < 0:
            report.skip("negative", str(v))
        else:
            kept.append(v)
    report.kept = len(kept)
    return kept


class Encoder:
    def __init__(self, fail_at_call=0):
        self.calls, self.fail_at_call = 0, fail_at_call

    def __call__(self, kept):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise KeyboardInterrupt("killed (injected)")
        words = sorted({v % 3 for v in kept})  # a per-shard table, like unique captions
        return {"rows": {"x": torch.tensor(kept, dtype=torch.float32).unsqueeze(1).repeat(1, 2),
                         "word_index": torch.tensor([words.index(v % 3) for v in kept])},
                "ragged": {"ids": [torch.arange(v % 4) for v in kept]},
                "tables": {"word": {"emb": torch.tensor(words, dtype=torch.float32) * 10}}}


def build(root, key=None, encoder=None, **kw):
    return build_sharded(root, key or {"k": 1}, n_rows=len(SOURCE), read=read, prepare=prepare,
                         encode=encoder or Encoder(), extras=lambda: {"empty": torch.zeros(3)},
                         shard_rows=kw.pop("shard_rows", 5), log=lambda _: None, **kw)


def rows_of(ds):
    return [(float(ds[i]["x"][0]), float(ds[i]["emb"])) for i in range(len(ds))]


EXPECTED = [(float(v), float(v % 3) * 10) for v in SOURCE if v >= 0]


def test_rows_tables_report_and_extras(tmp_path):
    ds = build(tmp_path)
    assert len(ds) == 20 and rows_of(ds) == EXPECTED
    assert set(ds[0]) == {"x", "emb", "ids"} and ds[0]["x"].shape == (2,)
    assert [ds[i]["ids"].tolist() for i in range(len(ds))] == [list(range(v % 4)) for v in SOURCE if v >= 0]
    assert ds.report.total == 23 and ds.report.kept == 20 and ds.report.skipped["negative"] == 3
    assert ds.extras()["empty"].shape == (3,)
    assert len(list((ds.entry / "shards").glob("*.safetensors"))) == 5
    with pytest.raises(IndexError):
        ds[20]


def test_hit_reads_no_source_and_changed_key_is_a_new_entry(tmp_path):
    first = build(tmp_path)
    enc = Encoder()
    again = build(tmp_path, encoder=enc)
    assert enc.calls == 0 and again.entry == first.entry
    other = build(tmp_path, key={"k": 2})
    assert other.entry != first.entry and rows_of(other) == EXPECTED


def test_killed_pass_resumes_from_complete_shards(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, encoder=Encoder(fail_at_call=3))
    entry = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert not (entry / "index.json").exists() and len(list((entry / "shards").glob("*.safetensors"))) == 2
    enc = Encoder()
    ds = build(tmp_path, encoder=enc)
    assert enc.calls == 3 and rows_of(ds) == EXPECTED


def test_torn_shard_and_torn_index_are_recomputed(tmp_path):
    ds = build(tmp_path)
    shard = ds.entry / "shards" / "000002.safetensors"
    shard.write_bytes(shard.read_bytes()[:40])  # truncated: header unreadable, size differs from the index
    enc = Encoder()
    assert rows_of(build(tmp_path, encoder=enc)) == EXPECTED and enc.calls == 1
    (ds.entry / "index.json").write_text('{"version": 1, "key": "')  # torn by a kill
    enc = Encoder()
    assert rows_of(build(tmp_path, encoder=enc)) == EXPECTED and enc.calls == 0


def test_out_of_disk_names_the_cache_and_keeps_complete_shards(tmp_path, monkeypatch):
    real, calls = shards.save_file, []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(shards, "save_file", full_disk)
    with pytest.raises(OSError, match="out of disk space writing the data cache in .*2 complete shard"):
        build(tmp_path)
    monkeypatch.setattr(shards, "save_file", real)
    enc = Encoder()
    assert rows_of(build(tmp_path, encoder=enc)) == EXPECTED and enc.calls == 3
    assert not [p for p in (tmp_path).rglob(".tmp-*")]


def test_all_skipped_shard_and_workers(tmp_path):
    ds = build(tmp_path, num_workers=2, shard_rows=3)  # shard 0 holds only bad rows
    assert ds.index["rows"][0] == 0 and rows_of(ds) == EXPECTED
    clone = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1,
                                        collate_fn=lambda r: {"x": torch.stack([x["x"] for x in r])})  # the dataset pickles into workers
    assert torch.cat([b["x"][:, 0] for b in clone]).tolist() == [v for v, _ in EXPECTED]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, root, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        enc = Encoder()
        ds = build(root, encoder=enc)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"calls": enc.calls, "rows": rows_of(ds)}, f)
    finally:
        torch.distributed.destroy_process_group()


def test_each_rank_encodes_its_share(tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path / "cache"), str(tmp_path)), nprocs=2)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [g["calls"] for g in got] == [3, 2]  # shards 0, 2, 4 and 1, 3
    assert got[0]["rows"] == got[1]["rows"] == [list(r) for r in EXPECTED]
