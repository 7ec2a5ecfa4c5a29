"""Rows left out are counted where they are left out: an empty caption in pair files, MLLM rows the encoder
skips (taken off `kept` in data_report.json), and rows longer than the model's positions when no max_length is
set."""
import json

import pytest
from conftest import colour_pairs
from PIL import Image

from mmalign.core.config import ConfigError, Experiment, TrainConfig
from mmalign.core.trainer import train
from mmalign.datasets.pairs import read_pairs
from mmalign.datasets.records import DataError
from mmalign.datasets.video import read_video_pairs
from mmalign.datasets.vl_records import write_vl_pairs_jsonl
from mmalign.mllm.dpo import MLLMDPO, VLDPOConfig, VLPairDataConfig
from mmalign.mllm.models import VLModelConfig

LONG = " ".join(["red"] * 150)  # more tokens than the tiny LLaVA's 128 positions
BEYOND = "longer than the model's 128 positions"


def _pairs_file(tmp_path, captions):
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "w.png")
    Image.new("RGB", (8, 8), (0, 0, 200)).save(tmp_path / "l.png")
    lines = [json.dumps({"caption": c, "jpg_0": "w.png", "jpg_1": "l.png", "label_0": 1}) for c in captions]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "metadata.jsonl"


def test_empty_caption_is_a_counted_skip(tmp_path):
    path = _pairs_file(tmp_path, ["a red square", "", "   ", "a blue circle"])
    rows, report = read_pairs(path)
    assert [r.caption for r in rows] == ["a red square", "a blue circle"]
    assert report.total == 4 and report.kept == 2 and dict(report.skipped) == {"empty caption": 2}
    assert [w.rsplit(":", 1)[1] for w in report.examples["empty caption"]] == ["2", "3"]
    with pytest.raises(DataError, match=r"metadata\.jsonl:2: empty caption"):
        read_pairs(path, bad_rows="error")


def test_empty_caption_in_a_caption_folder_is_a_counted_skip(tmp_path):
    from mmalign.datasets.records import read_caption_folder
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": "a.png", "text": t}) + "\n" for t in ("a red square", "", " \t")))
    rows, report = read_caption_folder(tmp_path)
    assert [r.caption for r in rows] == ["a red square"] and dict(report.skipped) == {"empty caption": 2}
    with pytest.raises(DataError, match=r"metadata\.jsonl:2: empty caption"):
        read_caption_folder(tmp_path, "error")


def test_empty_caption_in_video_pairs_is_a_counted_skip(tmp_path):
    """The video pair reader shares the caption check: the row is refused before its videos are looked for."""
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"caption": " ", "video_w": "w.gif", "video_l": "l.gif"}) + "\n")
    rows, report = read_video_pairs(path, n_frames=None)
    assert rows == [] and dict(report.skipped) == {"empty caption": 1}
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: empty caption"):
        read_video_pairs(path, n_frames=None, bad_rows="error")


@pytest.fixture(scope="module")
def pairs_with_long_rows(tmp_path_factory):
    """8 colour pairs; those at 2 and 5 have a chosen answer longer than the tiny model's positions."""
    rows = colour_pairs(8)
    for i in (2, 5):
        images, prompt, _, rejected, meta = rows[i]
        rows[i] = (images, prompt, LONG, rejected, meta)
    out = tmp_path_factory.mktemp("long_pairs")
    write_vl_pairs_jsonl(out, rows)
    return str(out)


def _method(tiny_llava_dir, data_dir, out, max_length=0, bad_rows="skip"):
    cfg = VLDPOConfig(model=VLModelConfig(pretrained=tiny_llava_dir, lora_rank=4),
                      data=VLPairDataConfig(path=data_dir, max_length=max_length, bad_rows=bad_rows))
    return MLLMDPO(cfg, str(out))


def test_rows_beyond_the_model_are_skipped_and_not_kept(tiny_llava_dir, pairs_with_long_rows, tmp_path):
    """max_length 0: the two rows over 128 tokens are counted skips; data_report's kept equals the rows encoded,
    and the other six train."""
    method = _method(tiny_llava_dir, pairs_with_long_rows, tmp_path)
    train(Experiment(method="mllm_dpo", output_dir=str(tmp_path), args=method.cfg,
                     train=TrainConfig(max_steps=1, batch_size=4, lr=1e-3, log_every=1)), method)
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["total"] == 8 and report["kept"] == report["encoded"] == 6
    assert report["skipped"] == {BEYOND: 2}
    assert [w.split(" (")[0].rsplit(":", 1)[1] for w in report["examples"][BEYOND]] == ["3", "6"]
    assert all("tokens; set data.max_length" in w for w in report["examples"][BEYOND])
    assert len(open(tmp_path / "metrics.jsonl").readlines()) == 1


def test_rows_beyond_the_model_under_bad_rows_error(tiny_llava_dir, pairs_with_long_rows, tmp_path):
    import torch

    method = _method(tiny_llava_dir, pairs_with_long_rows, tmp_path, bad_rows="error")
    method.build(torch.device("cpu"))
    with pytest.raises(DataError, match=rf"pairs\.jsonl:3 \(\d+ tokens.*: {BEYOND}"):
        method.dataset()


def test_explicit_max_length_cuts_and_skips_are_taken_off_kept(tiny_llava_dir, pairs_with_long_rows, tmp_path):
    """An explicit max_length cuts the long answers instead; rows whose prompt does not fit are counted skips and
    no longer kept; a max_length over the model's positions is refused."""
    import torch

    method = _method(tiny_llava_dir, pairs_with_long_rows, tmp_path, max_length=40)
    method.build(torch.device("cpu"))
    dataset, report = method.dataset()
    assert len(dataset) == report.kept == 8 and not report.skipped
    assert max(len(dataset[i].chosen.ids) for i in range(8)) == 40

    prompt_len = dataset[0].chosen.prompt_len
    method.cfg.data.max_length = prompt_len  # no room for any answer token: every row is skipped
    with pytest.raises(ConfigError, match=r"no usable pairs .*0/8 rows kept; skipped: 8 too long for max_length"):
        method.dataset()

    method.cfg.data.max_length = 129
    with pytest.raises(ConfigError, match=r"data\.max_length: 129 is more than the model's 128 positions"):
        method.dataset()
