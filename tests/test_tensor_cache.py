"""Persistent tensor cache: miss then hit, key changes miss, partial entries are recomputed, fingerprints move."""
import json
import os

import pytest
import torch

from mmalign.datasets.cache import (file_fingerprint, fingerprint, load_or_compute, model_fingerprint)


def counting(value=1.0):
    calls = []

    def compute():
        calls.append(1)
        base = torch.arange(12, dtype=torch.float32).reshape(3, 4) * value
        return {"latents": base.t(), "row0": base[0], "row1": base[1]}  # non-contiguous, shared memory
    return compute, calls


def test_miss_then_hit(tmp_path):
    compute, calls = counting()
    logs = []
    key = {"model": {"hub_id": "m"}, "resolution": 8, "data": [1, 2]}
    first, hit1 = load_or_compute(tmp_path, key, compute, logs.append)
    second, hit2 = load_or_compute(tmp_path, dict(reversed(list(key.items()))), compute, logs.append)
    assert (hit1, hit2) == (False, True) and len(calls) == 1
    assert set(second) == {"latents", "row0", "row1"}
    for name in first:
        assert torch.equal(first[name], second[name])
    entry = tmp_path / fingerprint(key)[:20]
    assert torch.equal(second["latents"], torch.arange(12.).reshape(3, 4).t())
    assert json.loads((entry / "key.json").read_text()) == key
    assert sorted(p.name for p in tmp_path.iterdir()) == [entry.name]  # no temp dirs left behind
    assert "miss" in logs[0] and "hit" in logs[1] and str(entry) in logs[1] and len(logs) == 2


def test_key_change_is_a_miss(tmp_path):
    compute, calls = counting()
    key = {"model": {"hub_id": "m"}, "resolution": 8, "flip": False}
    load_or_compute(tmp_path, key, compute, lambda s: None)
    compute2, calls2 = counting(2.0)
    out, hit = load_or_compute(tmp_path, {**key, "flip": True}, compute2, lambda s: None)
    assert not hit and len(calls2) == 1 and out["row0"][1].item() == 2.0
    assert len([p for p in tmp_path.iterdir()]) == 2
    assert load_or_compute(tmp_path, key, compute, lambda s: None)[1] and len(calls) == 1


@pytest.mark.parametrize("damage", ["no_key_json", "truncated_tensors", "other_key"])
def test_partial_entry_is_recomputed(tmp_path, damage):
    key = {"resolution": 8}
    entry = tmp_path / fingerprint(key)[:20]
    entry.mkdir()
    (entry / "tensors.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"")  # a crash mid-write
    if damage != "no_key_json":
        (entry / "key.json").write_text(json.dumps(key if damage == "truncated_tensors" else {"resolution": 16}))
    compute, calls = counting()
    logs = []
    out, hit = load_or_compute(tmp_path, key, compute, logs.append)
    assert not hit and len(calls) == 1
    assert {"no_key_json": "partial", "truncated_tensors": "unreadable", "other_key": "does not match"}[damage] in logs[0]
    again, hit = load_or_compute(tmp_path, key, compute, logs.append)
    assert hit and len(calls) == 1 and torch.equal(again["latents"], out["latents"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [entry.name]


def test_model_fingerprint_local_and_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants
    pipe = tmp_path / "pipe"
    for sub in ("unet", "vae", "scheduler"):
        (pipe / sub).mkdir(parents=True)
        (pipe / sub / "config.json").write_text("{}")
    weights = pipe / "unet/diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"1234")
    before = model_fingerprint(str(pipe), ["unet", "vae"])
    assert set(before["files"]) == {"unet", "vae"}
    assert set(before["files"]["unet"]) == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert model_fingerprint(str(pipe), ["unet", "vae"]) == before
    st = weights.stat()
    weights.write_bytes(b"5678")  # same size, retrained: only the mtime tells
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    after = model_fingerprint(str(pipe), ["unet", "vae"])
    assert after != before and fingerprint({"m": after}) != fingerprint({"m": before})
    weights.write_bytes(b"123456")
    assert model_fingerprint(str(pipe), ["unet", "vae"])["files"]["unet"]["diffusion_pytorch_model.safetensors"][0] == 6

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_fingerprint("owner/model", ["unet"]) == {"hub_id": "owner/model", "snapshot": None}
    repo = tmp_path / "hub/models--owner--model"
    (repo / "snapshots/abc123/unet").mkdir(parents=True)
    (repo / "snapshots/abc123/unet/config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text("abc123")
    assert model_fingerprint("owner/model", ["unet"])["snapshot"] == str(repo / "snapshots/abc123")


def test_file_fingerprint(tmp_path):
    f = tmp_path / "d/metadata.jsonl"
    f.parent.mkdir()
    f.write_text("{}\n")
    assert file_fingerprint(f) == [3, f.stat().st_mtime_ns]
    folder = file_fingerprint(tmp_path / "d")
    assert folder[:3] == ["dir", 1, 3]
    (tmp_path / "d/img.png").write_bytes(b"xx")
    assert file_fingerprint(tmp_path / "d") != folder
    with pytest.raises(FileNotFoundError):
        file_fingerprint(tmp_path / "nope")
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1}) != fingerprint({"a": 2})
