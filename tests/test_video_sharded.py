"""The video methods' data on the sharded cache (mmalign.video.data): the same rows as the in-memory path, every
row counted, workers change nothing, and the key follows the files the rows name."""
import json
import os
import random

import numpy as np
import pytest
import torch

from mmalign.datasets.shapeworld.video import sample_clip, write_clip
from mmalign.datasets.shards import ShardedRows
from mmalign.datasets.video import pair_source, read_video_pairs, write_video_pairs_jsonl
from mmalign.video.clips import ShapeWorldClips, TensorRows, read_clip_folder, shapeworld_clips
from mmalign.video.methods import VideoConfig, VideoDataConfig, VideoDiffusionDPO, VideoModelConfig, \
    VideoTemporalTraining

pytestmark = pytest.mark.usefixtures("one_thread")
F = 4


def config(tiny_sd_dir, **data):
    return VideoConfig(VideoModelConfig(pretrained=str(tiny_sd_dir), motion_heads=4),
                       VideoDataConfig(num_frames=F, shard_rows=2, **data))


@pytest.fixture(scope="module")
def temporal(tiny_sd_dir, tmp_path_factory):
    m = VideoTemporalTraining(config(tiny_sd_dir), str(tmp_path_factory.mktemp("temporal")))
    m.build(torch.device("cpu"))
    return m


@pytest.fixture(scope="module")
def dpo(tiny_sd_dir, tmp_path_factory):
    m = VideoDiffusionDPO(config(tiny_sd_dir), str(tmp_path_factory.mktemp("dpo")))
    m.build(torch.device("cpu"))
    return m


def dataset(method, data=None, **fields):
    """method.dataset() under data fields (or in-memory `data`), and its empty caption."""
    method.data = data
    for k, v in fields.items():
        setattr(method.cfg.data, k, v)
    rows, report = method.dataset()
    return rows, report, method.empty["ctx"]


def assert_same_rows(a, b, atol=1e-5):
    assert len(a) == len(b) > 0
    for i in range(len(a)):
        assert a[i].keys() == b[i].keys()
        for k in a[i]:
            assert a[i][k].shape == b[i][k].shape, k
            assert torch.allclose(a[i][k], b[i][k], atol=atol), (i, k)


def clip_folder(root, n, bad=True):
    root.mkdir()
    rows = []
    for i, c in enumerate(sample_clip(random.Random(i), F, 32) for i in range(n)):
        write_clip(c, root / f"{i}.gif")
        rows.append({"file_name": f"{i}.gif", "text": c.caption})
    if bad:
        rows[1:1] = [{"file_name": "gone.gif", "text": "a red circle moving up"}, {"file_name": "0.gif", "text": " "}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_shapeworld_ranges_are_the_clips_drawn_in_order():
    every = shapeworld_clips(7, 3, F, 32)
    src = ShapeWorldClips(7, 3, F, 32)
    for start, stop in ((2, 4), (4, 7), (0, 3), (5, 6)):  # onwards, then back to the start
        got = list(src.rows(start, stop))
        assert [c for c, _ in got] == [c for c, _ in every[start:stop]]
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (_, fa), (_, fb) in zip(got, every[start:stop])
                   for a, b in zip(fa, fb))


def test_sharded_shapeworld_rows_equal_the_in_memory_rows(temporal, tmp_path):
    sharded, report, empty = dataset(temporal, shapeworld_clips=5, seed=1, cache_dir=str(tmp_path / "c"))
    assert isinstance(sharded, ShardedRows) and len(list((tmp_path / "c").glob("*/shards/*"))) == 3
    assert report.total == report.kept == 5
    memory, _, empty_mem = dataset(temporal, shapeworld_clips(5, 1, F, 32))
    assert isinstance(memory, TensorRows) and set(sharded[0]) == {"mean", "std", "ctx"}
    assert_same_rows(sharded, memory)
    assert torch.allclose(empty, empty_mem, atol=1e-6)
    temporal.cfg.data.shapeworld_clips = 0


def test_clip_folder_rows_skips_and_cache_key(temporal, tmp_path):
    folder = clip_folder(tmp_path / "clips", 3)
    clips, old_report = read_clip_folder(str(folder), F, "skip")
    assert old_report.skipped == {"image file not found": 1, "empty caption": 1} and len(clips) == 3
    temporal.output_dir = str(tmp_path / "run")
    rows, report, _ = dataset(temporal, path=str(folder), cache_dir="")
    assert (tmp_path / "run/data_cache").is_dir()  # no cache_dir: under the run's output_dir
    assert report.to_dict() == old_report.to_dict()
    assert report.kept + sum(report.skipped.values()) == report.total == 5
    assert_same_rows(rows, dataset(temporal, clips)[0])
    entries = set((tmp_path / "run/data_cache").iterdir())
    dataset(temporal, path=str(folder))  # a hit: no new entry
    assert set((tmp_path / "run/data_cache").iterdir()) == entries
    st = os.stat(folder / "2.gif")
    os.utime(folder / "2.gif", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # a clip the rows name changed
    dataset(temporal, path=str(folder))
    assert len(set((tmp_path / "run/data_cache").iterdir()) - entries) == 1
    temporal.cfg.data.path = ""


def test_encode_workers_change_nothing(temporal, tmp_path):
    folder = clip_folder(tmp_path / "clips", 4)
    zero, r0, _ = dataset(temporal, path=str(folder), cache_dir=str(tmp_path / "w0"), encode_workers=0)
    two, r2, _ = dataset(temporal, path=str(folder), cache_dir=str(tmp_path / "w2"), encode_workers=2)
    assert r0.to_dict() == r2.to_dict() and r0.kept == 4
    assert_same_rows(zero, two, atol=0)
    temporal.cfg.data.path, temporal.cfg.data.encode_workers = "", 0


def pair_folder(root, n):
    rng = random.Random(0)
    clips = [sample_clip(rng, F, 32) for _ in range(n)]
    write_video_pairs_jsonl(root, [(c.caption, np.stack([np.asarray(f) for f in c.frames]),
                                    np.stack([np.asarray(f) for f in c.frames[::-1]]), {}) for c in clips])
    with open(root / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"caption": "", "video_w": "videos/0_w.gif", "video_l": "videos/0_l.gif"}) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"caption": "a red circle moving up", "video_w": "gone.gif", "video_l": "x.gif"}) + "\n")
    return root


def test_pair_folder_with_bad_rows_counts_every_row(dpo, tmp_path):
    data = pair_folder(tmp_path / "pairs", 3)
    rows, report, _ = dataset(dpo, path=str(data), cache_dir=str(tmp_path / "c"))  # the bad rows share shards
    assert report.kept == len(rows) == 3 and report.kept + sum(report.skipped.values()) == report.total == 6
    assert report.skipped["empty caption"] == 1 and report.skipped["video file not found"] == 1
    recs, old = read_video_pairs(str(data), F)
    assert old.to_dict() == report.to_dict()
    memory, _, _ = dataset(dpo, [(r.caption, r.frames_w, r.frames_l) for r in recs])
    assert set(rows[0]) == {"mean_w", "std_w", "mean_l", "std_l", "ctx"}
    assert_same_rows(rows, memory)


def test_csv_pair_ranges(tmp_path):
    (tmp_path / "p.csv").write_text('caption,video_w,video_l\n"a\nb",x,y\nc,x,y\nd,x,y,extra\ne,x,y\n')
    src = pair_source(tmp_path / "p.csv")
    every = list(src.rows())
    assert len(src) == len(every) == 4 and every[2][1] == "more cells than header columns"
    for start, stop in ((1, 3), (3, 4), (0, 2)):
        assert list(src.rows(start, stop)) == every[start:stop]
