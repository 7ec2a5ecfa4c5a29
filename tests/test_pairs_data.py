"""Preference pairs (Pick-a-Pic v2 format): orientation, ties, bad rows, every source kind, round trip."""
import io
import json

import pytest
from PIL import Image

from mmalign.datasets.pairs import PairRecord, load_pair_images, read_pairs, write_pairs_jsonl
from mmalign.datasets.records import DataError, SkipReport


def color(i, winner):
    return (200, 20 * i, 0) if winner else (0, 20 * i, 200)


def png(rgb, fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, fmt)
    return buf.getvalue()


def pixel(im):
    return im.getpixel((4, 4))


def make_jsonl_folder(tmp_path):
    """12 rows: 6 good (labels 1,0,1,0,1,0), 2 ties, bad label, missing file, invalid JSON, missing caption."""
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(6):
        w, l = f"img/w{i}.png", f"img/l{i}.png"
        Image.new("RGB", (8, 8), color(i, True)).save(tmp_path / w)
        Image.new("RGB", (8, 8), color(i, False)).save(tmp_path / l)
        label = 1 if i % 2 == 0 else 0
        j0, j1 = (w, l) if label == 1 else (l, w)
        lines.append(json.dumps({"caption": f"c{i}", "jpg_0": j0, "jpg_1": j1, "label_0": label, "score": i}))
    ok = {"jpg_0": "img/w0.png", "jpg_1": "img/l0.png"}
    lines[2:2] = [json.dumps({"caption": "tie a", "label_0": 0.5, **ok}), ""]   # line 3 tie, line 4 blank
    lines += [
        json.dumps({"caption": "tie b", "label_0": 0.5, **ok}),                 # line 9
        json.dumps({"caption": "bad label", "label_0": 2, **ok}),               # line 10
        json.dumps({"caption": "gone", "jpg_0": "img/nope.png", "jpg_1": "img/l0.png", "label_0": 1}),  # 11
        "{not json",                                                            # line 12
        json.dumps({"label_0": 1, **ok}),                                       # line 13
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_jsonl_orientation_ties_and_bad_rows_counted(tmp_path):
    rows, report = read_pairs(make_jsonl_folder(tmp_path))
    assert [r.caption for r in rows] == [f"c{i}" for i in range(6)]
    assert report.total == 12 and report.kept == 6
    assert report.skipped == {"tie (label_0=0.5)": 2, "label_0 missing or not 0, 0.5 or 1": 1,
                              "image file not found": 1, "missing or non-string caption": 1,
                              "invalid JSON (Expecting property name enclosed in double quotes)": 1}
    assert report.examples["tie (label_0=0.5)"][0].endswith("metadata.jsonl:3")
    assert report.examples["image file not found"][0].endswith("metadata.jsonl:11")
    assert rows[1].extra == {"score": 1} and rows[1].where.endswith("metadata.jsonl:2")
    for i, rec in enumerate(rows):  # label 0 rows must be flipped: the winner is always the winner's pixels
        w, l = load_pair_images(rec, report, "skip")
        assert (pixel(w), pixel(l)) == (color(i, True), color(i, False))
    assert report.kept == 6 and "unreadable image" not in report.skipped


def test_error_policies_name_the_row(tmp_path):
    folder = make_jsonl_folder(tmp_path)
    with pytest.raises(DataError, match=r"metadata.jsonl:3: tie \(label_0=0.5\)"):
        read_pairs(folder, ties="error")
    # the first bad row (not a tie) raises under bad_rows="error"
    with pytest.raises(DataError, match=r"metadata.jsonl:10: label_0 missing"):
        read_pairs(folder, bad_rows="error")
    with pytest.raises(ValueError, match="tie policy"):
        read_pairs(folder, ties="first")
    with pytest.raises(ValueError, match="bad-row policy"):
        read_pairs(folder, bad_rows="ignore")


@pytest.mark.parametrize("label", ["1", True, None, -1, float("nan")])
def test_strict_labels(tmp_path, label):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    row = {"caption": "x", "jpg_0": "a.png", "jpg_1": "a.png"}
    if label is not None:
        row["label_0"] = label
    (tmp_path / "p.jsonl").write_text(json.dumps(row) + "\n")
    rows, report = read_pairs(tmp_path / "p.jsonl")
    assert rows == [] and report.skipped == {"label_0 missing or not 0, 0.5 or 1": 1}


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_parquet_bytes_hf_dicts_corrupt_image_and_shards(tmp_path):
    Image.new("RGB", (8, 8), color(3, False)).save(tmp_path / "side.png")
    d = lambda b, p=None: {"bytes": b, "path": p}  # noqa: E731  (HF Image feature layout)
    rows = [
        {"caption": "a", "jpg_0": d(png(color(0, True))), "jpg_1": d(png(color(0, False))), "label_0": 1.0, "s": 0.1},
        {"caption": "b", "jpg_0": d(png(color(1, False))), "jpg_1": d(png(color(1, True))), "label_0": 0.0, "s": 0.2},
        {"caption": "c", "jpg_0": d(b"\xff\xd8\xff not a jpeg"), "jpg_1": d(png(color(2, False))), "label_0": 1.0,
         "s": 0.3},
        {"caption": "d", "jpg_0": d(png(color(3, True), "JPEG")), "jpg_1": d(None, "side.png"), "label_0": 1.0,
         "s": 0.4},
        {"caption": "t", "jpg_0": d(png(color(0, True))), "jpg_1": d(png(color(0, False))), "label_0": 0.5, "s": 0.5},
    ]
    write_parquet(tmp_path / "b.parquet", rows[:2])
    write_parquet(tmp_path / "a.parquet", rows[2:])
    recs, report = read_pairs(tmp_path)  # shards folder: a.parquet then b.parquet
    assert [r.caption for r in recs] == ["c", "d", "a", "b"]
    assert report.total == 5 and report.kept == 4 and report.skipped == {"tie (label_0=0.5)": 1}
    assert recs[0].where.endswith("a.parquet[0]") and recs[3].where.endswith("b.parquet[1]")
    assert recs[1].image_l == tmp_path / "side.png" and isinstance(recs[1].image_w, bytes)
    assert recs[3].extra == {"s": 0.2}
    assert load_pair_images(recs[0], report, "skip") is None  # corrupt bytes: counted, not a crash
    assert report.skipped["unreadable image"] == 1 and report.kept == 3
    assert "a.parquet[0] winner" in report.examples["unreadable image"][0]
    w, l = load_pair_images(recs[1], report, "skip")
    assert w.mode == "RGB" and max(abs(a - b) for a, b in zip(pixel(w), color(3, True))) < 8  # JPEG is lossy
    assert pixel(l) == color(3, False)
    w, l = load_pair_images(recs[3], report, "skip")
    assert (pixel(w), pixel(l)) == (color(1, True), color(1, False))
    with pytest.raises(DataError, match="unreadable image"):
        load_pair_images(recs[0], SkipReport(), "error")
    one, _ = read_pairs(tmp_path / "b.parquet")  # a single file works too, raw bytes columns as well
    write_parquet(tmp_path / "raw.parquet", [{"caption": "r", "jpg_0": png(color(0, True)), "jpg_1": b"",
                                              "label_0": 1}])
    raw, rep = read_pairs(tmp_path / "raw.parquet")
    assert len(one) == 2 and raw == [] and rep.skipped == {"missing jpg_1": 1}


def test_datasets_object_and_save_to_disk(tmp_path):
    import datasets
    data = {"caption": ["a", "b", "t"],
            "jpg_0": [{"bytes": png(color(0, True)), "path": None}, {"bytes": png(color(1, False)), "path": None},
                      {"bytes": png(color(2, True)), "path": None}],
            "jpg_1": [png(color(0, False)), png(color(1, True)), png(color(2, False))],
            "label_0": [1.0, 0.0, 0.5]}
    features = datasets.Features({"caption": datasets.Value("string"), "jpg_0": datasets.Image(),
                                  "jpg_1": datasets.Value("binary"), "label_0": datasets.Value("float32")})
    ds = datasets.Dataset.from_dict(data, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    for source, name in [(ds, "dataset"), (tmp_path / "saved", str(tmp_path / "saved"))]:
        recs, report = read_pairs(source)
        assert [r.where for r in recs] == [f"{name}[0]", f"{name}[1]"]
        assert report.total == 3 and report.kept == 2 and report.skipped == {"tie (label_0=0.5)": 1}
        for i, rec in enumerate(recs):
            w, l = load_pair_images(rec, report, "skip")
            assert (pixel(w), pixel(l)) == (color(i, True), color(i, False))


def test_write_pairs_jsonl_round_trip(tmp_path):
    pairs = [(f"p{i}", Image.new("RGB", (8, 8), color(i, True)), Image.new("RGB", (8, 8), color(i, False)),
              {"reward_w": 1.0 + i, "reward_l": 0.5}) for i in range(3)]
    meta = write_pairs_jsonl(tmp_path / "gen", iter(pairs))
    assert meta == tmp_path / "gen/metadata.jsonl" and (tmp_path / "gen/images/000002_1.png").is_file()
    assert json.loads(meta.read_text().splitlines()[0])["jpg_0"] == "images/000000_0.png"
    recs, report = read_pairs(tmp_path / "gen")
    assert report.kept == report.total == 3
    assert recs[2].extra == {"reward_w": 3.0, "reward_l": 0.5}
    assert isinstance(recs[0], PairRecord) and recs[0].image_w == tmp_path / "gen/images/000000_0.png"
    for i, rec in enumerate(recs):
        w, l = load_pair_images(rec, report, "skip")
        assert (pixel(w), pixel(l)) == (color(i, True), color(i, False))
    with pytest.raises(ValueError, match="clash"):
        write_pairs_jsonl(tmp_path / "bad", [("c", pairs[0][1], pairs[0][2], {"label_0": 0})])


def test_sources_missing_unsupported_and_hub_id(tmp_path, monkeypatch):
    import datasets
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        read_pairs(tmp_path / "missing/pairs.jsonl")
    with pytest.raises(FileNotFoundError):
        read_pairs("data/pairs.jsonl")  # looks like owner/name but is a missing local file
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported"):
        read_pairs(tmp_path / "x.csv")
    with pytest.raises(DataError, match="no metadata.jsonl"):
        read_pairs(tmp_path)
    calls = []
    ds = datasets.Dataset.from_dict({"caption": ["h"], "jpg_0": [png(color(0, True))],
                                     "jpg_1": [png(color(0, False))], "label_0": [0.0]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or ds)
    recs, _ = read_pairs("someone/pickapic_v2")
    assert calls == [(("someone/pickapic_v2",), {"split": "train"})]
    assert recs[0].where == "someone/pickapic_v2[0]" and recs[0].image_w == ds[0]["jpg_1"]
