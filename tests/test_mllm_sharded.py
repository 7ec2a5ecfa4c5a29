"""MLLM rows through the sharded cache (mllm/sharded.py): the same rows as the in-memory encoder for DPO pairs,
mDPO crops and SFT conversations; skip reports merged over shards; the reference cache on the lazy dataset;
encode workers; memory that does not grow with the rows."""
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmalign.datasets.vl_records import load_images, read_vl_conversations, read_vl_pairs
from mmalign.mllm.data import Encoder, collate_pairs
from mmalign.mllm.dpo import MLLMDPO, MLLMmDPO, VLDPOConfig, VLPairDataConfig
from mmalign.mllm.encoding import pad_batch
from mmalign.mllm.models import VLModelConfig, load_vlm
from mmalign.mllm.sft import VLConversationDataConfig
from mmalign.mllm.sharded import EncodedRows, encode_rows

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    model, processor = load_vlm(tiny_llava_dir)
    return processor, model.config


def same_encoded(a, b):
    assert a.ids == b.ids and a.train_mask == b.train_mask and a.token_inputs == b.token_inputs
    assert a.image_inputs.keys() == b.image_inputs.keys() and a.image_inputs
    for k in a.image_inputs:
        assert a.image_inputs[k].dtype == b.image_inputs[k].dtype and torch.equal(a.image_inputs[k],
                                                                                  b.image_inputs[k])


def same_batches(x, y):
    assert x.keys() == y.keys()
    for k in x:
        if isinstance(x[k], dict):
            same_batches(x[k], y[k])
        else:
            assert torch.equal(x[k], y[k]), k


def in_memory_pairs(path, processor, config, crop=None):
    """What MLLMDPO.dataset() built before the cache: records read into a list, encoded into a list."""
    records, report = read_vl_pairs(path)
    enc = Encoder(processor, config, None, "skip", report)
    rows = [r for i, rec in enumerate(records) if (r := enc.pair(i, rec, load_images(rec), crop)) is not None]
    return rows, report


@pytest.mark.parametrize("crop", [None, (0, 0.1, 0.5)])
def test_sharded_pairs_equal_in_memory_rows(llava, tiny_llava_dir, vl_pairs_dir, tmp_path, crop):
    processor, config = llava
    old, _ = in_memory_pairs(vl_pairs_dir, processor, config, crop)
    d = VLPairDataConfig(path=vl_pairs_dir, cache_dir=str(tmp_path / "cache"), shard_rows=3)
    new, key = encode_rows("pairs", d, tiny_llava_dir, processor, config, str(tmp_path), crop)
    assert isinstance(new, EncodedRows) and len(new) == len(old) == 8
    assert len(list((tmp_path / "cache").glob("*/shards/*.safetensors"))) == 3
    assert key["reader"]["format"] == "trl" and key["shard_rows"] == 3
    for i, (a, b) in enumerate(zip(old, new)):
        assert b.index == a.index == i and b.margin == a.margin
        same_encoded(a.chosen, b.chosen)
        same_encoded(a.rejected, b.rejected)
        assert b.chosen.image_inputs is b.rejected.image_inputs  # shared, as the encoder shares them
        assert (a.cropped is None) == (b.cropped is None) == (crop is None)
        if crop:
            same_encoded(a.cropped, b.cropped)
    pad = processor.tokenizer.pad_token_id
    for pack in (False, True):
        same_batches(collate_pairs(old[:4], pad, pack=pack), collate_pairs([new[i] for i in range(4)], pad,
                                                                           pack=pack))


def write_conversations(out, n):
    from mmalign.datasets.vl_records import write_vl_conversations_jsonl

    rows = []
    for i in range(n):
        rgb = [(220, 40, 40), (40, 70, 220)][i % 2]
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is it"}]},
                {"role": "assistant", "content": [{"type": "text", "text": ["red", "blue"][i % 2]}]}]
        if i % 3 == 0:  # multi-turn
            msgs += [{"role": "user", "content": [{"type": "text", "text": "is it a shape"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}]
        rows.append(([Image.new("RGB", (32, 32), rgb)], msgs, {}))
    return write_vl_conversations_jsonl(out, rows)


def test_sharded_conversations_equal_in_memory_rows(llava, tiny_llava_dir, tmp_path):
    processor, config = llava
    path = write_conversations(tmp_path / "data", 7)
    records, report = read_vl_conversations(str(path))
    enc = Encoder(processor, config, None, "skip", report)
    old = [enc.conversation(i, r.messages, load_images(r), r.where) for i, r in enumerate(records)]
    d = VLConversationDataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), shard_rows=2)
    new, _ = encode_rows("conversations", d, tiny_llava_dir, processor, config, str(tmp_path))
    assert len(new) == len(old) == 7
    for a, i in zip(old, range(7)):
        same_encoded(a, new[i])
    same_batches(pad_batch(old, 0), pad_batch([new[i] for i in range(7)], 0))


def test_skip_reports_merge_over_shards(llava, tiny_llava_dir, vl_pairs_dir, tmp_path):
    """Reading skips (bad JSON, missing image, chosen == rejected) and encoding skips (longer than max_length
    allows) in different shards: merged, they are the in-memory path's report, kept + skipped == total."""
    processor, config = llava
    src = Path(vl_pairs_dir) / "pairs.jsonl"
    lines = src.read_text().splitlines()
    bad = json.loads(lines[0])
    long = dict(bad, prompt="what colour is the shape " * 6)  # the prompt alone is longer than max_length
    lines[1] = "{not json"
    lines[3] = json.dumps(dict(bad, images=["images/nowhere.png"]))
    lines[5] = json.dumps(dict(bad, rejected=bad["chosen"]))
    lines[6] = json.dumps(long)
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    (tmp_path / "images").symlink_to(Path(vl_pairs_dir) / "images")
    max_length = 30
    d = VLPairDataConfig(path=str(data), cache_dir=str(tmp_path / "cache"), shard_rows=2, max_length=max_length)
    new, _ = encode_rows("pairs", d, tiny_llava_dir, processor, config, str(tmp_path))
    report = new.report
    records, want = read_vl_pairs(str(data))
    enc = Encoder(processor, config, max_length, "skip", want)
    kept = [p for i, rec in enumerate(records) if (p := enc.pair(i, rec, load_images(rec), None)) is not None]
    assert report.total == 8 and report.kept == len(new) == len(kept) == 4
    assert report.kept + sum(report.skipped.values()) == report.total
    assert dict(report.skipped) == dict(want.skipped) and len(report.skipped) == 4
    assert any("too long" in k for k in report.skipped)


def test_reference_cache_reads_the_lazy_rows_once(tiny_llava_dir, vl_pairs_dir, tmp_path, monkeypatch):
    """Reference log-probs keyed by dataset row: computed batch by batch (each row read once), equal to the
    policy's own log-probs of those rows; on a hit no row is read at all (packing looks at a flag column)."""
    from mmalign.mllm.logps import sequence_logps

    cfg = VLDPOConfig(model=VLModelConfig(pretrained=tiny_llava_dir, reference="cache"),
                      data=VLPairDataConfig(path=vl_pairs_dir, ref_cache_dir=str(tmp_path / "ref"), shard_rows=3,
                                            ref_batch_size=3))
    method = MLLMmDPO(cfg, str(tmp_path / "run"))
    method.build(torch.device("cpu"))
    reads = []
    get = EncodedRows.__getitem__
    monkeypatch.setattr(EncodedRows, "__getitem__", lambda self, i: reads.append(i) or get(self, i))
    dataset, report = method.dataset()
    assert (tmp_path / "run" / "data_cache").is_dir()  # no data.cache_dir: under the run's output_dir
    assert sorted(reads) == list(range(8)) and sorted(method.ref_logps) == list(range(8))
    assert report.kept == len(dataset) == 8 and method.pack
    rows = [get(dataset, i) for i in (2, 7)]
    with torch.no_grad():
        method.policy.eval()
        b = collate_pairs(rows, method.pad_id)
        crop = sequence_logps(method.policy, b["cropped"])[0]
    assert torch.allclose(method.ref_logps[7][2], crop[1], atol=1e-5)
    assert torch.allclose(method.ref_logps[2][2], crop[0], atol=1e-5)
    reads.clear()
    method.dataset()
    assert reads == []


def test_encode_workers_equal_main_process(llava, tiny_llava_dir, vl_pairs_dir, tmp_path):
    processor, config = llava
    out = {}
    for workers in (0, 2):
        d = VLPairDataConfig(path=vl_pairs_dir, cache_dir=str(tmp_path / f"c{workers}"), shard_rows=2,
                             encode_workers=workers)
        out[workers] = encode_rows("pairs", d, tiny_llava_dir, processor, config, str(tmp_path))[0]
    assert len(out[0]) == len(out[2]) == 8
    for i in range(8):
        a, b = out[0].rows[i], out[2].rows[i]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_method_refuses_no_usable_rows(tiny_llava_dir, tmp_path):
    from mmalign.core.config import ConfigError

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"images": ["nowhere.png"], "prompt": "what", "chosen": "red", "rejected": "blue"})
                    + "\n")
    cfg = VLDPOConfig(model=VLModelConfig(pretrained=tiny_llava_dir, lora_rank=2),
                      data=VLPairDataConfig(path=str(data), cache_dir=str(tmp_path / "cache")))
    method = MLLMDPO(cfg, str(tmp_path / "run"))
    method.build(torch.device("cpu"))
    with pytest.raises(ConfigError, match="no usable pairs.*image file not found"):
        method.dataset()


def test_cache_fields_are_not_run_identity():
    from mmalign.core.checkpoint import run_identity
    from mmalign.core.registry import load_recipe

    recipe = "configs/llava15_mllm_dpo.yaml"
    base = run_identity(load_recipe(recipe), 10, 4)
    moved = load_recipe(recipe, ["data.shard_rows=7", "data.encode_workers=0", "data.cache_dir=elsewhere"])
    assert moved.args.data.shard_rows == 7 and run_identity(moved, 10, 4) == base
    assert run_identity(load_recipe(recipe, ["data.max_length=512"]), 10, 4) != base


# ---- memory ----

GROWTH_BOUND_MB = 15


def test_memory_does_not_grow_with_rows(tiny_llava_dir, tmp_path):
    """In one fresh process (one start-up), encode 250 then 2000 synthetic RLAIF-V jsonl rows (one 32 px image
    per row, each its own file): the peak RSS grows by less than GROWTH_BOUND_MB from the first to the second.
    Rows held in memory would add ~20 KB each (~35 MB for the 1750 more rows)."""
    out = subprocess.run([sys.executable, __file__, tiny_llava_dir, str(tmp_path), "250", "2000"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    small, large = json.loads(out.stdout.strip().splitlines()[-1])
    assert small["kept"] == 250 and large["kept"] == 2000
    assert large["peak_mb"] - small["peak_mb"] < GROWTH_BOUND_MB, (small, large)


def _encode_synthetic(model_dir: str, tmp: Path, sizes: list[int]) -> list[dict]:
    """Per size n: write n RLAIF-V rows, encode them through the cache; the process's peak RSS after it."""
    torch.set_num_threads(1)
    model, processor = load_vlm(model_dir)
    config = model.config
    del model
    colours = [(220, 40, 40), (40, 70, 220), (40, 170, 60), (225, 200, 20)]
    out = []
    for n in sizes:
        d = tmp / str(n)
        (d / "images").mkdir(parents=True)
        with open(d / "rlaif.jsonl", "w") as f:
            for i in range(n):
                Image.new("RGB", (32, 32), colours[i % 4]).save(d / f"images/{i}.png")
                f.write(json.dumps({"image": f"images/{i}.png", "question": "what colour is the shape",
                                    "chosen": "red" if i % 2 else "the shape is red", "rejected": "blue"}) + "\n")
        cfg = VLPairDataConfig(path=str(d / "rlaif.jsonl"), cache_dir=str(d / "cache"), format="rlaif_v")
        ds, _ = encode_rows("pairs", cfg, model_dir, processor, config, str(d), log=lambda s: None)
        out.append({"kept": len(ds), "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        del ds
    return out


if __name__ == "__main__":
    print(json.dumps(_encode_synthetic(sys.argv[1], Path(sys.argv[2]), [int(n) for n in sys.argv[3:]])))
