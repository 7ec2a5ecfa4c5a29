"""Pair tensors through the sharded cache: rows equal the old in-memory encoding, parquet (several row groups) and
jsonl sources, skip reports merged over shards, workers change nothing, a killed encode resumes, and reading pairs
lazily keeps memory flat as the data grows."""
import io
import json
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from mmalign.datasets.pairs import iter_pairs, load_pair_images, read_pairs, write_pairs_jsonl
from mmalign.datasets.records import SkipReport
from mmalign.diffusion import pair_tensors
from mmalign.diffusion.pair_tensors import build_pair_tensors
from mmalign.diffusion.pipeline import encode_prompts, load_sd_components, preprocess

pytestmark = pytest.mark.usefixtures("one_thread")
R = 32


def image(i, side):
    """Sizes vary (wide, tall, square) so SDXL sizes and crops differ per row."""
    w, h = [(32, 32), (48, 32), (32, 44), (40, 36)][(i + side) % 4]
    return Image.new("RGB", (w, h), ((37 * i) % 256, 90 + 60 * side, (11 * i) % 256))


def png(im):
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def rows_with_bad_ones(n):
    """Pick-a-Pic rows; every 5th is a tie, every 7th has a corrupt image, row 3 has no caption."""
    out = []
    for i in range(n):
        row = {"caption": f"scene {i % 4}", "jpg_0": png(image(i, 0)), "jpg_1": png(image(i, 1)),
               "label_0": 0.5 if i % 5 == 4 else float(i % 2)}
        if i % 7 == 6:
            row["jpg_1"] = b"not an image"
        if i == 3:
            row["caption"] = None
        out.append(row)
    return out


@pytest.fixture(scope="module")
def sdxl_parts(tiny_sdxl_dir):
    return load_sd_components(str(tiny_sdxl_dir))


@pytest.fixture(scope="module")
def sd_parts(tiny_sd_dir):
    return load_sd_components(str(tiny_sd_dir))


@pytest.fixture(scope="module")
def parquet_pairs(tmp_path_factory):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    path = tmp_path_factory.mktemp("pq") / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows_with_bad_ones(23)), path, row_group_size=4)  # 6 row groups
    assert pq.ParquetFile(path).metadata.num_row_groups == 6
    return path


@pytest.fixture(scope="module")
def jsonl_pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("jsonl")
    return write_pairs_jsonl(out, [(f"caption {i % 3}", image(i, 0), image(i, 1), {"i": i}) for i in range(9)])


@torch.no_grad()
def old_rows(parts, source, flips):
    """The pre-sharding encoding, pair by pair: read_pairs, decode, preprocess both views, VAE, captions."""
    records, report = read_pairs(source)
    views = (False, True) if flips else (False,)
    rows = []
    for rec in records:
        images = load_pair_images(rec, report, "skip")
        if images is None:
            continue
        row = {}
        for side, im in zip("wl", images):
            per_view = [preprocess(im, R, flip=f) for f in views]
            post = parts.vae.encode(torch.stack([x for x, _ in per_view])).latent_dist
            row[f"mean_{side}"], row[f"std_{side}"] = post.mean, post.std
            row[f"size_{side}"] = torch.tensor(per_view[0][1]["original_size"])
            row[f"crop_{side}"] = torch.tensor([list(info["crop_top_left"]) for _, info in per_view])
        row.update({k: v[0] for k, v in encode_prompts(parts, [rec.caption], "cpu").items()})
        rows.append(row)
    return rows, report


def build(parts, source, cache, flips=False, **kw):
    return build_pair_tensors(parts, str(source), R, flips, "drop", "skip", torch.device("cpu"), str(cache),
                              encode_batch=3, log=lambda _: None, **kw)


def report_dict(report):
    """The report with object addresses (`<_io.BytesIO object at 0x...>`) taken out of its examples."""
    d = report.to_dict()
    d["examples"] = {k: [re.sub(r" at 0x[0-9a-f]+", "", e) for e in v] for k, v in d["examples"].items()}
    return d


def assert_rows_equal(got, want, exact=False):
    assert len(got) == len(want)
    for i, w in enumerate(want):
        g = got[i]
        assert set(g) == set(w), (set(g), set(w))
        for k in w:
            assert g[k].shape == w[k].shape and g[k].dtype == w[k].dtype, (i, k)
            ok = torch.equal(g[k], w[k]) if exact or not w[k].is_floating_point() else \
                torch.allclose(g[k], w[k], atol=1e-5)
            assert ok, (i, k)


def test_sdxl_rows_with_flips_equal_the_in_memory_encoding(tmp_path, sdxl_parts, parquet_pairs):
    data, report = build(sdxl_parts, parquet_pairs, tmp_path / "c", flips=True, shard_rows=5)
    want, want_report = old_rows(sdxl_parts, parquet_pairs, flips=True)
    assert_rows_equal(data, want)
    assert report_dict(report) == report_dict(want_report)
    assert report.kept + sum(report.skipped.values()) == report.total == 23
    assert report.skipped == {"tie (label_0=0.5)": 4, "unreadable image": 3, "missing or non-string caption": 1}
    assert len(list((tmp_path / "c").rglob("shards/*.safetensors"))) == 5  # 23 rows in shards of 5
    empty = encode_prompts(sdxl_parts, [""], "cpu")
    assert set(data.empty_cond()) == {"ctx", "pooled"}
    assert all(torch.allclose(data.empty_cond()[k], empty[k][0], atol=1e-6) for k in empty)


def test_jsonl_rows_equal_and_hit_the_cache(tmp_path, sd_parts, jsonl_pairs):
    first, report = build(sd_parts, jsonl_pairs, tmp_path / "c", shard_rows=4)
    assert_rows_equal(first, old_rows(sd_parts, jsonl_pairs, flips=False)[0])
    assert report.total == report.kept == 9
    logs = []
    again, _ = build_pair_tensors(sd_parts, str(jsonl_pairs), R, False, "drop", "skip", torch.device("cpu"),
                                  str(tmp_path / "c"), encode_batch=5, shard_rows=4, log=logs.append)
    assert "hit" in logs[0]
    assert_rows_equal(again, [first[i] for i in range(len(first))], exact=True)
    # the shard size is in the key: another size is another entry
    build(sd_parts, jsonl_pairs, tmp_path / "c", shard_rows=9)
    assert len([p for p in (tmp_path / "c").iterdir() if p.is_dir()]) == 2


def test_encode_workers_change_nothing(tmp_path, sd_parts, parquet_pairs):
    inline, rep0 = build(sd_parts, parquet_pairs, tmp_path / "w0", flips=True, shard_rows=4, encode_workers=0)
    pooled, rep2 = build(sd_parts, parquet_pairs, tmp_path / "w2", flips=True, shard_rows=4, encode_workers=2)
    assert report_dict(rep0) == report_dict(rep2)
    assert_rows_equal(pooled, [inline[i] for i in range(len(inline))], exact=True)


def test_a_killed_encode_resumes_from_complete_shards(tmp_path, sd_parts, jsonl_pairs, monkeypatch):
    real, calls, killed = pair_tensors.encode_pairs, [], []

    def killed_at_third(*args):
        calls.append(1)
        if len(calls) == 3 and not killed:
            killed.append(1)
            raise KeyboardInterrupt("killed (injected)")
        return real(*args)

    monkeypatch.setattr(pair_tensors, "encode_pairs", killed_at_third)
    with pytest.raises(KeyboardInterrupt):
        build(sd_parts, jsonl_pairs, tmp_path / "c", shard_rows=2)  # 5 shards
    calls.clear()
    resumed, report = build(sd_parts, jsonl_pairs, tmp_path / "c", shard_rows=2)
    assert len(calls) == 3 and report.kept == 9  # shards 0 and 1 were kept
    fresh, _ = build(sd_parts, jsonl_pairs, tmp_path / "fresh", shard_rows=2)
    assert_rows_equal(resumed, [fresh[i] for i in range(len(fresh))])


def test_bad_rows_error_names_the_row_and_no_usable_pair_is_an_error(tmp_path, sd_parts, parquet_pairs):
    from mmalign.datasets.records import DataError
    with pytest.raises(DataError, match=r"pairs\.parquet\[3\]: missing or non-string caption"):
        build_pair_tensors(sd_parts, str(parquet_pairs), R, False, "drop", "error", torch.device("cpu"),
                           str(tmp_path / "c"), log=lambda _: None)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"caption": "x", "jpg_0": "no.png", "jpg_1": "no.png", "label_0": 1}) + "\n")
    with pytest.raises(ValueError, match="no usable pairs.*image file not found"):
        build(sd_parts, empty, tmp_path / "c")


def test_iter_pairs_is_lazy_and_read_pairs_agrees(parquet_pairs):
    report = SkipReport()
    it = iter_pairs(parquet_pairs, report)
    first = next(it)
    assert report.total == report.kept == 1 and first.where.endswith("[0]")  # counted as read, not ahead
    rest = list(it)
    recs, full = read_pairs(parquet_pairs)
    assert [r.where for r in [first, *rest]] == [r.where for r in recs]
    assert report_dict(report) == report_dict(full) and full.kept == 23 - 4 - 1
    with pytest.raises(ValueError, match="tie policy"):
        iter_pairs(parquet_pairs, SkipReport(), ties="first")  # checked at the call, not at the first row


PEAK_SCRIPT = r"""
import resource, sys
from mmalign.datasets.pairs import iter_pairs
from mmalign.datasets.records import SkipReport
report = SkipReport()
n = sum(1 for _ in iter_pairs(sys.argv[1], report))
assert n == report.kept == int(sys.argv[2]), (n, report.summary())
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def synthetic_parquet(path, n, image_bytes=50_000):
    """n pairs with ~50 KB incompressible image cells, written a row group at a time."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    import numpy as np
    rng = np.random.default_rng(0)
    blob = rng.integers(0, 256, image_bytes, dtype=np.uint8).tobytes()
    writer = None
    for start in range(0, n, 256):
        k = min(256, n - start)
        rows = {"caption": [f"c{i}" for i in range(start, start + k)],
                "jpg_0": [i.to_bytes(4, "little") + blob for i in range(start, start + k)],
                "jpg_1": [blob + i.to_bytes(4, "little") for i in range(start, start + k)], "label_0": [1.0] * k}
        table = pa.table(rows)
        writer = writer or pq.ParquetWriter(path, table.schema, compression="none", use_dictionary=False)
        writer.write_table(table)
    writer.close()


def peak_rss_mb(path, n) -> int:
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), str(n)], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


def test_reading_pairs_keeps_memory_flat(tmp_path):
    """8x the rows (100 MB -> 800 MB of image bytes) may not grow the reader's peak RSS by more than 64 MB (measured:
    ~2 MB): one 256-row batch (~26 MB) is held at a time. `read_pairs`, a list, grows ~700 MB here; so does a
    pre-buffered parquet reader (pyarrow's default), which reads every row group ahead."""
    synthetic_parquet(tmp_path / "1k.parquet", 1000)
    synthetic_parquet(tmp_path / "8k.parquet", 8000)
    small, large = peak_rss_mb(tmp_path / "1k.parquet", 1000), peak_rss_mb(tmp_path / "8k.parquet", 8000)
    assert large - small < 64, (small, large)
