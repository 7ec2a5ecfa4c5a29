"""Video reading (GIF, frame folders, arrays, mp4 when PyAV is installed) and video preference pairs."""
import csv
import json
import random

import numpy as np
import pytest
from PIL import Image

from mmalign.datasets.records import DataError
from mmalign.datasets.shapeworld.video import frames_array, sample_clip
from mmalign.datasets.video import (VideoError, natural_key, read_video, read_video_pairs, write_gif,
                                write_video_pairs_jsonl)


def clip_frames(seed: int, n: int = 6) -> np.ndarray:
    return frames_array(sample_clip(random.Random(seed), n_frames=n).frames)


def ramp(n: int = 10, size: int = 8) -> np.ndarray:
    """Frame i is filled with the value i (so sampled indices can be read off the pixels)."""
    return np.stack([np.full((size, size, 3), i, np.uint8) for i in range(n)])


def values(frames) -> list[int]:
    return [int(np.asarray(f)[0, 0, 0]) for f in frames]


def test_array_sampling_by_start_stride_count():
    arr = ramp(10)
    assert values(read_video(arr, n_frames=3, stride=2, start=1)) == [1, 3, 5]
    assert values(read_video(arr, stride=3)) == [0, 3, 6, 9]
    assert values(read_video(arr, start=7)) == [7, 8, 9]
    assert values(read_video(arr, n_frames=2, stride=9)) == [0, 9]  # exactly long enough
    out = read_video(list(arr), n_frames=4, as_array=True)
    assert out.dtype == np.uint8 and out.shape == (4, 8, 8, 3)
    pil = read_video([Image.fromarray(f) for f in arr], n_frames=2)
    assert all(isinstance(f, Image.Image) and f.mode == "RGB" for f in pil) and values(pil) == [0, 1]


def test_gif_reads_back_exactly_including_merged_identical_frames(tmp_path):
    frames = clip_frames(0)
    frames = np.concatenate([frames[:3], frames[2:3], frames[2:3], frames[3:]])  # a still segment: 3 equal frames
    write_gif(frames, tmp_path / "a.gif")
    back = read_video(tmp_path / "a.gif", as_array=True)
    assert back.shape == frames.shape and np.array_equal(back, frames)
    stored = read_video(tmp_path / "a.gif", as_array=True, gif_timeline=False)  # Pillow merged the still frames
    assert len(stored) == len(frames) - 2
    assert values(read_video(tmp_path / "a.gif", n_frames=2, stride=4)) == values([frames[0], frames[4]])


def test_frame_folder_natural_order(tmp_path):
    for i in (1, 2, 10, 11):
        Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(tmp_path / f"frame{i}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    assert values(read_video(tmp_path)) == [1, 2, 10, 11]  # plain sorted() would give 1, 10, 11, 2
    assert values(read_video(tmp_path, n_frames=2, stride=2, start=1)) == [2, 11]
    assert sorted(["f10", "f9", "F1"], key=natural_key) == ["F1", "f9", "f10"]


def _write_mp4(path, frames, codec="mpeg4"):
    import av
    with av.open(str(path), "w") as c:
        stream = c.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)


def test_mp4_reading_and_sampling(tmp_path):
    pytest.importorskip("av")
    levels = np.arange(8) * 30
    frames = np.stack([np.full((32, 32, 3), v, np.uint8) for v in levels])
    _write_mp4(tmp_path / "v.mp4", frames)
    out = read_video(tmp_path / "v.mp4", as_array=True)
    assert out.shape == (8, 32, 32, 3)
    assert np.abs(out.reshape(8, -1).mean(1) - levels).max() < 4  # lossy codec: close, in order
    picked = read_video(tmp_path / "v.mp4", n_frames=3, stride=3, start=1, as_array=True)
    assert np.abs(picked.reshape(3, -1).mean(1) - levels[[1, 4, 7]]).max() < 4
    with pytest.raises(VideoError, match=r"v\.mp4: video too short \(8 frame\(s\).*needs 9"):
        read_video(tmp_path / "v.mp4", n_frames=5, stride=2)


def test_unreadable_container(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video" * 10)
    try:
        import av  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install av"):
            read_video(bad)
        return
    with pytest.raises(VideoError, match=r"broken\.mp4: unreadable video"):
        read_video(bad)


def test_bad_inputs_raise_with_the_file_named(tmp_path):
    with pytest.raises(VideoError, match=r"nope\.gif: video file not found"):
        read_video(tmp_path / "nope.gif")
    (tmp_path / "junk.gif").write_bytes(b"GIF89a but then garbage")
    with pytest.raises(VideoError, match=r"junk\.gif: unreadable video"):
        read_video(tmp_path / "junk.gif")
    (tmp_path / "clip.txt").write_text("x")
    with pytest.raises(VideoError, match=r"clip\.txt: unsupported video file"):
        read_video(tmp_path / "clip.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VideoError, match=r"empty: no frames"):
        read_video(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (8, 8)).save(mixed / "f1.png")
    Image.new("RGB", (8, 6)).save(mixed / "f2.png")
    with pytest.raises(VideoError, match=r"f2\.png: mixed frame sizes \(8x6 but .*f1\.png is 8x8\)"):
        read_video(mixed)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    Image.new("RGB", (8, 8)).save(corrupt / "f1.png")
    (corrupt / "f2.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(VideoError, match=r"f2\.png: unreadable frame"):
        read_video(corrupt)
    write_gif(clip_frames(1, n=4), tmp_path / "short.gif")
    with pytest.raises(VideoError, match=r"short\.gif: video too short \(4 frame\(s\); start=0, stride=2, "
                                         r"n_frames=3 needs 5\)"):
        read_video(tmp_path / "short.gif", n_frames=3, stride=2)
    with pytest.raises(VideoError, match="video too short"):
        read_video(ramp(3), start=3)
    with pytest.raises(VideoError, match=r"bad frame array \(expected \(F, H, W, 3\)"):
        read_video(np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(VideoError, match=r"frame 0: expected uint8"):
        read_video(np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(VideoError, match="mixed frame sizes"):
        read_video([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8)])
    with pytest.raises(VideoError, match="no frames"):
        read_video([])
    assert issubclass(VideoError, DataError)
    for bad in ({"n_frames": 0}, {"stride": 0}, {"start": -1}):
        with pytest.raises(ValueError, match="sampling needs"):
            read_video(ramp(3), **bad)


def test_pairs_round_trip(tmp_path):
    rows = [(f"caption {i}", clip_frames(2 * i), clip_frames(2 * i + 1), {"score_w": float(i)}) for i in range(3)]
    meta = write_video_pairs_jsonl(tmp_path / "pairs", rows)
    recs, report = read_video_pairs(meta, n_frames=None)
    assert report.to_dict()["kept"] == 3 and not report.skipped
    for rec, (caption, w, l, extra) in zip(recs, rows):
        assert rec.caption == caption and rec.extra == extra
        assert np.array_equal(rec.frames_w, w) and np.array_equal(rec.frames_l, l)
    recs2, _ = read_video_pairs(tmp_path / "pairs", n_frames=2, stride=3)  # the folder works as a source
    assert np.array_equal(recs2[1].frames_w, rows[1][1][[0, 3]])
    with pytest.raises(ValueError, match="clash"):
        write_video_pairs_jsonl(tmp_path / "x", [("c", rows[0][1], rows[0][2], {"video_w": 1})])


def test_labelled_layout_jsonl_and_csv(tmp_path):
    a, b = ramp(4), ramp(4)[::-1].copy()
    write_gif(a, tmp_path / "a.gif")
    write_gif(b, tmp_path / "b.gif")
    lines = [{"caption": "first wins", "video_0": "a.gif", "video_1": "b.gif", "label_0": 1},
             {"caption": "second wins", "video_0": "a.gif", "video_1": "b.gif", "label_0": 0},
             {"caption": "tie", "video_0": "a.gif", "video_1": "b.gif", "label_0": 0.5}]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    recs, report = read_video_pairs(src, n_frames=4)
    assert [r.caption for r in recs] == ["first wins", "second wins"]
    assert values(recs[0].frames_w) == [0, 1, 2, 3] and values(recs[1].frames_w) == [3, 2, 1, 0]
    assert report.skipped == {"tie (label_0=0.5)": 1} and report.examples["tie (label_0=0.5)"] == [f"{src}:3"]
    with pytest.raises(DataError, match=r"pairs\.jsonl:3: tie"):
        read_video_pairs(src, n_frames=4, ties="error")

    sub = tmp_path / "meta"
    sub.mkdir()
    with open(sub / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["caption", "video_0", "video_1", "label_0", "note"])
        w.writerow(["csv row", "a.gif", "b.gif", "0", "kept"])
        w.writerow(["bad label", "a.gif", "b.gif", "yes", ""])
    recs, report = read_video_pairs(sub / "pairs.csv", n_frames=2, video_root=tmp_path)
    assert len(recs) == 1 and values(recs[0].frames_w) == [3, 2] and recs[0].extra == {"note": "kept"}
    assert report.examples == {"label_0 missing or not 0, 0.5 or 1": [f"{sub / 'pairs.csv'}:3"]}


def test_bad_rows_skip_counts_and_error_names_the_line(tmp_path):
    write_gif(ramp(6), tmp_path / "ok.gif")
    write_gif(ramp(2), tmp_path / "short.gif")
    (tmp_path / "junk.gif").write_bytes(b"garbage")
    good = {"caption": "c", "video_w": "ok.gif", "video_l": "ok.gif"}
    lines = [json.dumps(good), "{not json", json.dumps({"video_w": "ok.gif", "video_l": "ok.gif"}),
             json.dumps({**good, "video_l": "missing.gif"}), json.dumps({**good, "video_l": "short.gif"}),
             json.dumps({**good, "video_w": "junk.gif"}), json.dumps({"caption": "c"}), json.dumps([1, 2]),
             json.dumps({**good, "video_l": None})]
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(lines) + "\n")
    recs, report = read_video_pairs(src, n_frames=4)
    assert len(recs) == 1 and report.total == 9 and report.kept == 1
    assert dict(report.skipped) == {
        "invalid JSON (Expecting property name enclosed in double quotes)": 1,
        "missing or non-string caption": 1, "video file not found": 1, "video too short": 1,
        "unreadable video": 1, "no video columns (video_w/video_l or video_0/video_1)": 1,
        "row is not a JSON object": 1, "missing video_l": 1}
    assert report.examples["video too short"][0].startswith(f"{src}:5 (") and "short.gif" in \
        report.examples["video too short"][0]
    assert report.examples["unreadable video"][0].startswith(f"{src}:6 (")
    with pytest.raises(DataError, match=r"rows\.jsonl:2: invalid JSON"):
        read_video_pairs(src, n_frames=4, bad_rows="error")
    src.write_text("\n".join([lines[0], lines[4]]) + "\n")
    with pytest.raises(DataError, match=r"rows\.jsonl:2 \(.*short\.gif: video too short"):
        read_video_pairs(src, n_frames=4, bad_rows="error")
    with pytest.raises(ValueError, match="bad-row policy"):
        read_video_pairs(src, n_frames=4, bad_rows="ignore")
