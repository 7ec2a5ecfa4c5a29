"""Caption-folder reading: bad rows are counted skips with reasons, or errors naming file and line."""
import json

import pytest
from PIL import Image

from mmalign.datasets.records import DataError, SkipReport, open_rgb, read_caption_folder


def make_folder(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "images/ok.png")
    (tmp_path / "images/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    lines = [
        json.dumps({"file_name": "images/ok.png", "text": "a red square", "scene": {"k": 1}}),
        json.dumps({"file_name": "images/missing.png", "text": "gone"}),
        "{not json",
        json.dumps({"file_name": "images/ok.png"}),
        json.dumps({"text": "no file"}),
        "",
        json.dumps({"file_name": "images/corrupt.png", "text": "broken"}),
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_skip_policy_counts_each_reason(tmp_path):
    rows, report = read_caption_folder(make_folder(tmp_path), "skip")
    assert [r.caption for r in rows] == ["a red square", "broken"]
    assert rows[0].extra == {"scene": {"k": 1}}
    assert report.total == 6 and report.kept == 2
    assert report.skipped == {"image file not found": 1, "missing or non-string text": 1,
                              "missing file_name": 1, "invalid JSON (Expecting property name enclosed in double quotes)": 1}
    assert "metadata.jsonl:2" in report.examples["image file not found"][0]
    # decoding finds the corrupt file before training starts
    assert open_rgb(rows[0].image_path, report, "skip", "row 1").size == (8, 8)
    assert open_rgb(rows[1].image_path, report, "skip", "row 7") is None
    assert report.skipped["unreadable image"] == 1
    assert "unreadable image" in report.summary()


def test_error_policy_names_file_and_line(tmp_path):
    with pytest.raises(DataError, match=r"metadata.jsonl:2: image file not found"):
        read_caption_folder(make_folder(tmp_path), "error")
    with pytest.raises(DataError, match="unreadable image"):
        open_rgb(tmp_path / "images/corrupt.png", SkipReport(), "error", "row 7")


def test_missing_metadata_and_bad_policy(tmp_path):
    with pytest.raises(DataError, match="no metadata.jsonl"):
        read_caption_folder(tmp_path)
    with pytest.raises(ValueError, match="policy"):
        read_caption_folder(tmp_path, "ignore")
