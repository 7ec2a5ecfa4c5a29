"""Cache keys cover the files a data file's rows point to: an image changed in place, beside a jsonl or outside the
data folder, is a cache miss (diffusion pair tensors, MLLM reference log-probs), never a stale hit."""
import io
import json
import os
import shutil

import pytest
import torch
from PIL import Image

from mmalign.datasets.cache import files_fingerprint
from mmalign.datasets.pairs import read_pairs, referenced_files, write_pairs_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def png_bytes(rgb):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, "PNG")
    return buf.getvalue()


def rewrite_later(path, image):
    """Overwrite `path` in place with `image` and move its mtime a second on, however coarse the clock."""
    before = path.stat().st_mtime_ns
    image.save(path)
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


# ---- the digest ----

def test_files_fingerprint_records_missing_and_is_order_independent(tmp_path):
    a, b, gone = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "gone.bin"
    a.write_bytes(b"123")
    b.write_bytes(b"45")
    (tmp_path / "folder").mkdir()
    fp = files_fingerprint([a, b, gone, tmp_path / "folder"])
    assert {k: fp[k] for k in ("references", "missing", "bytes")} == {"references": 4, "missing": 2, "bytes": 5}
    assert len(fp["digest"]) == 64
    assert files_fingerprint([tmp_path / "folder", gone, b, a]) == fp  # order does not matter
    assert files_fingerprint([str(a), str(b), str(gone), str(tmp_path / "folder")]) == fp  # nor str vs Path
    assert files_fingerprint([a, b]) != files_fingerprint([a, b, gone])  # a missing reference still counts
    assert files_fingerprint([]) == {"references": 0, "missing": 0, "bytes": 0, "digest": "0" * 64}


def test_files_fingerprint_follows_size_mtime_and_appearance(tmp_path, monkeypatch):
    a, later = tmp_path / "a.bin", tmp_path / "later.bin"
    a.write_bytes(b"123")
    before = files_fingerprint([a, later])
    st = a.stat()
    a.write_bytes(b"456")  # same size: only the mtime tells
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    moved = files_fingerprint([a, later])
    assert moved["digest"] != before["digest"] and moved["bytes"] == before["bytes"]
    a.write_bytes(b"1234")
    assert files_fingerprint([a, later])["bytes"] == 4
    later.write_bytes(b"x")  # a missing file that appears changes the digest
    appeared = files_fingerprint([a, later])
    assert appeared["missing"] == 0 and appeared["digest"] != files_fingerprint([a, tmp_path / "nope"])["digest"]
    monkeypatch.chdir(tmp_path)  # a relative path names the same file as its absolute form
    assert files_fingerprint(["a.bin", "later.bin"]) == files_fingerprint([a, later])


# ---- which files a pair source points to ----

def test_referenced_files_of_a_jsonl_follow_read_pairs(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "img").mkdir(parents=True)
    outside.mkdir()
    for name in ("img/w.png", "img/l.png"):
        (data / name).write_bytes(png_bytes((200, 0, 0)))
    (outside / "far.png").write_bytes(png_bytes((0, 0, 200)))
    rows = [{"caption": "a", "jpg_0": "img/w.png", "jpg_1": "img/l.png", "label_0": 1},
            {"caption": "b", "jpg_0": str(outside / "far.png"), "jpg_1": "../outside/far.png", "label_0": 0},
            {"caption": "c", "jpg_0": "img/nope.png", "jpg_1": {"path": "img/w.png"}, "label_0": 1},
            {"caption": "d", "jpg_0": "img/w.png", "label_0": 1}]
    meta = data / "metadata.jsonl"
    meta.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    refs = list(referenced_files(meta))
    assert refs == [data / "img/w.png", data / "img/l.png", outside / "far.png", data / "../outside/far.png",
                    data / "img/nope.png", data / "img/w.png", data / "img/w.png"]
    assert list(referenced_files(data)) == refs  # the folder reads the same metadata.jsonl
    records, report = read_pairs(meta)
    used = {os.path.abspath(p) for r in records for p in (r.image_w, r.image_l)}
    assert used <= {os.path.abspath(p) for p in refs} and len(records) == 2
    fp = files_fingerprint(refs)
    assert fp["missing"] == 1 and fp["references"] == 7


def test_referenced_files_skip_embedded_bytes(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    far = tmp_path / "far.png"
    far.write_bytes(png_bytes((0, 200, 0)))
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"caption": ["a", "b"],
                      "jpg_0": pa.array([{"bytes": png_bytes((1, 2, 3)), "path": None},
                                         {"bytes": None, "path": str(far)}], type=image),
                      "jpg_1": pa.array([png_bytes((4, 5, 6))] * 2), "label_0": [1.0, 1.0]})
    pq.write_table(table, tmp_path / "p.parquet")
    assert list(referenced_files(tmp_path / "p.parquet")) == [far]  # raw bytes name nothing
    features = datasets.Features({"caption": datasets.Value("string"), "jpg_0": datasets.Image(decode=False),
                                  "jpg_1": datasets.Value("binary"), "label_0": datasets.Value("float32")})
    ds = datasets.Dataset.from_dict({"caption": ["a", "b"],
                                     "jpg_0": [{"bytes": png_bytes((1, 2, 3)), "path": "emb.png"},
                                               {"bytes": None, "path": str(far)}],
                                     "jpg_1": [png_bytes((4, 5, 6))] * 2, "label_0": [1.0, 1.0]}, features=features)
    assert list(referenced_files(ds)) == [far]  # Arrow: a cell holding bytes names no file, as read_pairs reads it


# ---- diffusion pair tensors ----

@pytest.fixture(scope="module")
def sd_parts(tiny_sd_dir):
    from mmalign.diffusion.pipeline import load_sd_components

    return load_sd_components(str(tiny_sd_dir))


def encode(parts, data_path, cache_dir):
    from mmalign.diffusion.pair_tensors import build_pair_tensors

    logs = []
    data, report = build_pair_tensors(parts, str(data_path), 32, False, "drop", "skip", torch.device("cpu"),
                                      str(cache_dir), log=logs.append)
    assert len(logs) == 1
    return data, report, "hit" in logs[0]


def column(data, key):
    return torch.stack([data[i][key] for i in range(len(data))])


def colour_rows(n):
    return [(f"pair {i}", Image.new("RGB", (32, 32), (40 * i, 200, 0)), Image.new("RGB", (32, 32), (0, 0, 40 * i)),
             {}) for i in range(n)]


def test_pair_tensor_cache_misses_an_image_changed_beside_a_jsonl(tmp_path, sd_parts):
    meta = write_pairs_jsonl(tmp_path / "data", colour_rows(3))
    cache = tmp_path / "cache"
    first, _, hit1 = encode(sd_parts, meta, cache)
    again, _, hit2 = encode(sd_parts, meta, cache)
    assert (hit1, hit2) == (False, True) and torch.equal(column(first, "mean_w"), column(again, "mean_w"))
    jsonl_stat = meta.stat()
    rewrite_later(tmp_path / "data/images/000001_0.png", Image.new("RGB", (32, 32), (255, 255, 255)))
    assert meta.stat().st_mtime_ns == jsonl_stat.st_mtime_ns  # the jsonl itself is untouched
    changed, _, hit3 = encode(sd_parts, meta, cache)
    assert not hit3
    assert not torch.equal(changed[1]["mean_w"], first[1]["mean_w"])  # the rewritten winner
    assert torch.allclose(column(changed, "mean_w")[[0, 2]], column(first, "mean_w")[[0, 2]], atol=1e-6)
    assert encode(sd_parts, meta, cache)[2]  # and the new entry is reused
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2


def test_pair_tensor_cache_misses_images_outside_the_data_folder(tmp_path, sd_parts):
    outside = tmp_path / "outside"
    write_pairs_jsonl(outside, colour_rows(3))  # the images live here; only absolute paths go in the data folder
    rows = [json.loads(line) for line in (outside / "metadata.jsonl").read_text().splitlines()]
    for r in rows:
        r["jpg_0"], r["jpg_1"] = str(outside / r["jpg_0"]), str(outside / r["jpg_1"])
    shutil.move(str(outside / "images/000002_1.png"), str(tmp_path / "later.png"))  # missing at first
    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "cache"
    first, report, hit = encode(sd_parts, data, cache)
    assert not hit and len(first) == 2 and report.skipped == {"image file not found": 1}
    assert encode(sd_parts, data, cache)[2]
    rewrite_later(outside / "images/000000_1.png", Image.new("RGB", (32, 32), (255, 255, 255)))
    changed, _, hit = encode(sd_parts, data, cache)
    assert not hit and not torch.equal(changed[0]["mean_l"], first[0]["mean_l"])
    assert torch.allclose(changed[1]["mean_l"], first[1]["mean_l"], atol=1e-6)
    shutil.move(str(tmp_path / "later.png"), str(outside / "images/000002_1.png"))  # the missing image appears
    grown, report, hit = encode(sd_parts, data, cache)
    assert not hit and len(grown) == 3 and report.kept == 3


# ---- MLLM reference log-probs ----

def test_reference_logp_cache_misses_a_changed_image_under_image_root(tmp_path, tiny_llava_dir, capsys):
    from conftest import colour_pairs

    from mmalign.datasets.vl_records import write_vl_pairs_jsonl
    from mmalign.mllm.dpo import MLLMDPO, VLDPOConfig, VLPairDataConfig
    from mmalign.mllm.models import VLModelConfig

    path = write_vl_pairs_jsonl(tmp_path / "data", colour_pairs(4))
    root = tmp_path / "root"
    root.mkdir()
    shutil.move(str(tmp_path / "data/images"), str(root / "images"))  # relative paths resolve under image_root
    cfg = VLDPOConfig(model=VLModelConfig(pretrained=tiny_llava_dir, lora_rank=0, reference="cache"),
                      data=VLPairDataConfig(path=str(path), image_root=str(root),
                                            ref_cache_dir=str(tmp_path / "refcache")))
    method = MLLMDPO(cfg, str(tmp_path / "run"))
    method.build(torch.device("cpu"))
    capsys.readouterr()

    def reference():
        method.dataset()
        return {i: t.clone() for i, t in method.ref_logps.items()}, capsys.readouterr().out

    first, out = reference()
    assert "0 rows from" in out and "4 computed" in out
    again, out = reference()
    assert "4 rows from" in out and "0 computed" in out
    rewrite_later(root / "images/000002_0.png", Image.new("RGB", (32, 32), (255, 255, 255)))
    changed, out = reference()
    assert "0 rows from" in out and "4 computed" in out
    assert not torch.equal(changed[2], first[2])  # the rewritten image's row
    assert all(torch.allclose(changed[i], first[i], atol=1e-5) for i in (0, 1, 3))
    assert len(list((tmp_path / "refcache").iterdir())) == 2
