"""Hostile media (issue 15): decoding is bounded by the sampling and by per-clip caps, and images over Pillow's
decompression-bomb limit are counted skips ("image too large") or DataErrors naming the file, never crashes."""
import base64
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import GifImagePlugin, Image

from mmalign.datasets import video
from mmalign.datasets.pairs import PairRecord, load_pair_images, read_pairs
from mmalign.datasets.records import DataError, SkipReport, open_rgb
from mmalign.datasets.video import VideoError, read_video, read_video_pairs
from mmalign.datasets.vl_records import read_vl_pairs
from mmalign.evals.report import image_uri
from mmalign.evals.video_folder import read_video_samples

RED, BLUE = (255, 0, 0), (0, 0, 255)


def png_bomb(path, side=20000):
    """A tiny PNG whose header says side x side (far over Pillow's limit); the pixel data is never reached."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 7))
                     + chunk(b"IEND", b""))
    return path


def gif(path, colours, durations, size=(8, 8)):
    frames = [Image.new("RGB", size, c) for c in colours]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return path


def gif_bomb(path):
    """A small GIF whose logical screen is patched to 20000 x 20000."""
    data = bytearray(gif(path, [RED, BLUE], [100, 100]).read_bytes())
    data[6:10] = struct.pack("<HH", 20000, 20000)
    path.write_bytes(bytes(data))
    return path


def colours(frames) -> list:
    return [tuple(int(v) for v in np.asarray(f)[0, 0]) for f in frames]


def test_gif_timeline_is_sampled_before_frames_are_copied(tmp_path):
    p = gif(tmp_path / "long.gif", [RED, BLUE], [10, 655350])  # 65536 frames on the 10 ms timeline
    assert p.stat().st_size < 400
    out = read_video(p, n_frames=4, as_array=True)
    assert out.shape == (4, 8, 8, 3) and colours(out) == [RED, BLUE, BLUE, BLUE]
    assert colours(read_video(p, n_frames=3, stride=30000)) == [RED, BLUE, BLUE]
    assert colours(read_video(p, gif_timeline=False)) == [RED, BLUE]
    with pytest.raises(VideoError, match=r"long\.gif: video too long \(65536 frames asked for, at most MAX_FRAMES"):
        read_video(p)
    with pytest.raises(VideoError, match="video too long"):
        read_video(p, n_frames=video.MAX_FRAMES + 1)
    with pytest.raises(VideoError, match=r"video too short \(65536 frame\(s\)"):
        read_video(p, n_frames=2, stride=65536)


def test_gif_decodes_only_up_to_the_last_sampled_frame(tmp_path, monkeypatch):
    n = 1000
    p = gif(tmp_path / "many.gif", [(i % 256, i // 256, 0) for i in range(n)], [40] * n, size=(4, 4))
    loads = []
    original = GifImagePlugin.GifImageFile.load_prepare
    monkeypatch.setattr(GifImagePlugin.GifImageFile, "load_prepare", lambda im: (loads.append(1), original(im)))
    assert colours(read_video(p, n_frames=4)) == [(i, 0, 0) for i in range(4)]
    assert 0 < len(loads) <= 5, len(loads)
    loads.clear()
    assert colours(read_video(p, n_frames=2, start=300, stride=200)) == [(44, 1, 0), (244, 1, 0)]
    assert len(loads) <= 502


def test_caps_refuse_clips_before_stacking(tmp_path, monkeypatch):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(folder / f"f{i}.png")
    monkeypatch.setattr(video, "MAX_FRAMES", 3)
    with pytest.raises(VideoError, match=r"frames: video too long \(5 frames asked for"):
        read_video(folder)
    assert colours(read_video(folder, n_frames=3, stride=2)) == [(0, 0, 0), (2, 0, 0), (4, 0, 0)]
    monkeypatch.setattr(video, "MAX_PIXELS", 2 * 4 * 4)
    with pytest.raises(VideoError, match=r"frames: video too large \(3 frames of 4x4 = 48 pixels"):
        read_video(folder, n_frames=3)
    g = gif(tmp_path / "g.gif", [RED, BLUE, RED], [100, 100, 100], size=(4, 4))
    with pytest.raises(VideoError, match=r"g\.gif: video too large"):
        read_video(g)
    assert len(read_video(g, n_frames=2)) == 2


def test_mp4_keeps_only_sampled_frames_within_the_caps(tmp_path, monkeypatch):
    av = pytest.importorskip("av")
    path = tmp_path / "v.mp4"
    with av.open(str(path), "w") as c:
        stream = c.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for v in range(0, 240, 30):
            c.mux(stream.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), v, np.uint8), format="rgb24")))
        c.mux(stream.encode())
    out = read_video(path, n_frames=3, stride=3, start=1, as_array=True)
    assert out.shape == (3, 32, 32, 3) and np.abs(out.reshape(3, -1).mean(1) - [30, 120, 210]).max() < 4
    monkeypatch.setattr(video, "MAX_FRAMES", 5)
    with pytest.raises(VideoError, match=r"v\.mp4: video too long \(6 frames"):
        read_video(path)
    assert len(read_video(path, stride=2)) == 4
    monkeypatch.setattr(video, "MAX_PIXELS", 3 * 32 * 32)
    with pytest.raises(VideoError, match=r"v\.mp4: video too large \(4 frames of 32x32"):
        read_video(path, n_frames=4)
    with pytest.raises(VideoError, match="video too large"):
        read_video(path)


def test_over_cap_clips_are_counted_skips_in_pair_and_eval_readers(tmp_path):
    gif(tmp_path / "long.gif", [RED, BLUE], [10, 655350])
    gif(tmp_path / "ok.gif", [RED, BLUE], [100, 100])
    gif_bomb(tmp_path / "bomb.gif")
    rows = [{"caption": "a", "video_w": "ok.gif", "video_l": "long.gif"},
            {"caption": "b", "video_w": "ok.gif", "video_l": "bomb.gif"},
            {"caption": "c", "video_w": "ok.gif", "video_l": "ok.gif"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, report = read_video_pairs(tmp_path / "pairs.jsonl", n_frames=None)
    assert report.kept == 1 and dict(report.skipped) == {"video too long": 1, "image too large": 1}
    assert "pairs.jsonl:2 (" in report.examples["image too large"][0] and "bomb.gif" in \
        report.examples["image too large"][0]
    with pytest.raises(DataError, match=r"pairs\.jsonl:1 \(.*long\.gif: video too long"):
        read_video_pairs(tmp_path / "pairs.jsonl", n_frames=None, bad_rows="error")
    samples = [{"file_name": f, "prompt": "x"} for f in ("long.gif", "bomb.gif", "ok.gif")]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    clips, _, _, report = read_video_samples(tmp_path)
    assert len(clips) == 1 and dict(report.skipped) == {"video too long": 1, "image too large": 1}


def test_decompression_bomb_frames_name_the_file(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "f1.png")
    png_bomb(folder / "f2.png")
    with pytest.raises(VideoError, match=r"f2\.png: image too large \(DecompressionBombError"):
        read_video(folder)
    with pytest.raises(VideoError, match=r"bomb\.gif: image too large"):
        read_video(gif_bomb(tmp_path / "bomb.gif"), n_frames=1)


def test_png_bomb_is_a_counted_skip_or_a_data_error(tmp_path):
    limit = Image.MAX_IMAGE_PIXELS
    bomb = png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 400
    Image.new("RGB", (8, 8), RED).save(tmp_path / "ok.png")
    report = SkipReport()
    assert open_rgb(bomb, report, "skip", "metadata.jsonl:3") is None
    assert dict(report.skipped) == {"image too large": 1} and "bomb.png" in report.examples["image too large"][0]
    with pytest.raises(DataError, match=r"row 7 \(.*bomb\.png: DecompressionBombError.*\): image too large"):
        open_rgb(bomb, SkipReport(), "error", "row 7")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"caption": "c", "jpg_0": "bomb.png", "jpg_1": "ok.png",
                                                      "label_0": 1}) + "\n")
    (rec,), report = read_pairs(tmp_path / "pairs.jsonl")
    assert load_pair_images(rec, report, "skip") is None
    assert report.kept == 0 and dict(report.skipped) == {"image too large": 1}
    assert report.examples["image too large"][0].startswith(f"{tmp_path / 'pairs.jsonl'}:1 winner (")
    with pytest.raises(DataError, match=r"pairs\.jsonl:1 winner \(.*bomb\.png: .*\): image too large"):
        load_pair_images(rec, SkipReport(), "error")
    in_bytes = PairRecord("c", bomb.read_bytes(), (tmp_path / "ok.png").read_bytes(), "data[0]", {})
    report = SkipReport(total=1, kept=1)
    assert load_pair_images(in_bytes, report, "skip") is None and dict(report.skipped) == {"image too large": 1}
    row = {"image": "bomb.png", "prompt": "Q?", "chosen": "yes", "rejected": "no"}
    (tmp_path / "vl.jsonl").write_text(json.dumps(row) + "\n")
    assert dict(read_vl_pairs(tmp_path / "vl.jsonl")[1].skipped) == {"image too large": 1}
    assert Image.MAX_IMAGE_PIXELS == limit  # Pillow's limit stays on


def test_report_shows_a_placeholder_for_an_over_large_image(tmp_path):
    for bomb in (png_bomb(tmp_path / "bomb.png"), gif_bomb(tmp_path / "bomb.gif")):
        uri, side = image_uri(bomb)
        assert uri.startswith("data:image/svg+xml;base64,") and side > 0
        svg = base64.b64decode(uri.split(",", 1)[1]).decode()
        assert "image too large" in svg and bomb.name in svg
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"junk\.png: not a readable image"):
        image_uri(tmp_path / "junk.png")
