"""Resume safety (issue 15): a reused output_dir resumes only the same run; damaged checkpoints, a torn metrics
line and a killed export neither crash opaquely nor lose work."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mmalign.core.trainer as trainer
from mmalign.core import checkpoint as ckpt
from mmalign.core.config import ConfigError, Experiment, TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import ToyArgs, ToyConfig, ToyMethod  # noqa: E402


def make_exp(out, method="toy", toy=None, **train_kw):
    kw = {**dict(max_steps=4, batch_size=4, lr=1e-2, log_every=1, seed=0, save_every=2), **train_kw}
    return Experiment(method, str(out), TrainConfig(**kw), ToyConfig(ToyArgs(**(toy or {}))))


def run(exp):
    return trainer.train(exp, ToyMethod(exp.args.toy))


def final_weights(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))


def logged(out, key="step"):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)[key] for line in f]


def snapshot(out):
    """Every file under `out` with its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in Path(out).rglob("*") if p.is_file()}


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_another_run_in_the_same_output_dir_is_refused_and_changes_nothing(tmp_path):
    out = tmp_path / "x"
    run(make_exp(out, "toy_dpo", max_steps=6))
    before = snapshot(out)
    other = make_exp(out, "toy_sft", dict(n_rows=48), max_steps=6, lr=5e-3)
    method = ToyMethod(other.args.toy)
    method.build = method.dataset = None  # refused from the recorded config, before any model or data loads
    with pytest.raises(ConfigError) as err:
        trainer.train(other, method)
    msg = str(err.value)
    for key in ("method", "toy.n_rows", "train.lr", "train.resume=never", "output_dir",
                "train.resume=force", "step-00000006"):
        assert key in msg, key
    assert "train.max_steps" not in msg and "train.save_every" not in msg
    assert snapshot(out) == before  # config.yaml, data report, checkpoints and final/ are the first run's


def test_same_config_over_other_data_is_refused_once_the_data_is_read(tmp_path):
    out = tmp_path / "x"
    run(make_exp(out, max_steps=2))
    before = snapshot(out)
    method = ToyMethod(ToyArgs())
    rows, report = method.dataset()
    method.dataset = lambda: (rows[:40], report)  # the data file changed under the same config
    with pytest.raises(ConfigError, match=r"dataset_length: 64 -> 40"):
        trainer.train(make_exp(out, max_steps=4), method)
    assert snapshot(out) == before


def test_settings_that_do_not_change_the_trajectory_are_not_identity():
    from mmalign.diffusion.preference import PairDataConfig
    from mmalign.mllm.dpo import VLPairDataConfig
    from mmalign.mllm.models import VLModelConfig
    exp = Experiment("diffusion_dpo", "o", TrainConfig(), None)
    base = ckpt.run_identity(exp, 10, 4)
    keys = set(ckpt.run_identity(Experiment("m", "o", TrainConfig(), ToyConfig(ToyArgs())), 10, 4))
    assert "toy.n_rows" in keys and "toy.nan_at_call" not in keys
    for cfg, free in ((PairDataConfig("p"), ("cache_dir", "encode_batch")),
                      (VLPairDataConfig("p"), ("ref_cache_dir", "ref_batch_size")),
                      (VLModelConfig("m"), ("gradient_checkpointing", "attn_implementation"))):
        ident = ckpt.run_identity(Experiment("m", "o", TrainConfig(), {"x": cfg}), 10, 4)
        assert "x.path" in ident or "x.pretrained" in ident
        assert not any(f"x.{k}" in ident for k in free), ident.keys()
    assert base["train.lr"] == TrainConfig().lr


def test_the_same_run_resumes_and_says_so(tmp_path, capsys):
    straight = make_exp(tmp_path / "straight", max_steps=6)
    run(straight)
    out = tmp_path / "split"
    run(make_exp(out))
    capsys.readouterr()
    # settings that may change: steps, logging, saving, per-device batch x accumulation (same global batch)
    resumed = make_exp(out, max_steps=6, log_every=2, save_every=3, keep_last=1, batch_size=2, grad_accum=2)
    assert run(resumed)["step"] == 6
    assert f"resuming from step 4 of {ckpt.step_dir(str(out / 'checkpoints'), 4)}" in capsys.readouterr().out
    assert logged(out) == [1, 2, 3, 4, 6]
    a, b = final_weights(out), final_weights(straight.output_dir)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_force_resumes_another_run_and_says_what_differs(tmp_path, capsys):
    out = tmp_path / "x"
    run(make_exp(out))
    capsys.readouterr()
    forced = make_exp(out, lr=5e-3, max_steps=6, resume="force")
    assert run(forced)["step"] == 6
    said = capsys.readouterr().out
    assert "warning: train.resume=force" in said and "train.lr: 0.01 -> 0.005" in said
    assert "resuming from step 4" in said
    with open(out / "config.yaml") as f:
        assert yaml.safe_load(f)["train"]["lr"] == 5e-3
    forced.train.resume, forced.train.max_steps = "auto", 8  # its checkpoints are now this run's own
    assert run(forced)["step"] == 8


def test_never_starts_over_and_moves_the_old_checkpoints_aside(tmp_path, capsys):
    out = tmp_path / "x"
    run(make_exp(out, max_steps=8))  # checkpoints 4, 6, 8
    fresh = make_exp(out, lr=5e-3, max_steps=2, resume="never")
    assert run(fresh)["step"] == 2
    root = str(out / "checkpoints")
    assert "moved 3 earlier checkpoint(s)" in capsys.readouterr().out
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(root)] == ["step-00000002"]
    assert sorted(os.listdir(os.path.join(root, "previous-run"))) == [
        "latest", "step-00000004", "step-00000006", "step-00000008"]
    fresh.train.resume, fresh.train.max_steps = "auto", 4  # resumes its own step 2, not the old step 8
    assert run(fresh)["step"] == 4 and logged(out) == [1, 2, 3, 4]


def test_checkpoint_without_identity_needs_force(tmp_path):
    out = tmp_path / "x"
    run(make_exp(out))
    state_file = Path(ckpt.step_dir(str(out / "checkpoints"), 4)) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["identity"]  # as written before identities were recorded
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="not recorded"):
        run(make_exp(out, max_steps=6))
    assert run(make_exp(out, max_steps=6, resume="force"))["step"] == 6


def truncate(path, keep):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2 if keep == "half" else 0)


DAMAGE = [("params.safetensors", "half"), ("params.safetensors", "empty"), ("optimizer.pt", "half"),
          ("scheduler.pt", "half"), ("trainer_state.json", "half"), ("rng_rank0.pt", "half"),
          ("optimizer.pt", "missing")]


@pytest.mark.parametrize("name,keep", DAMAGE)
def test_damaged_latest_checkpoint_is_named_and_auto_falls_back(tmp_path, capsys, name, keep):
    toy = dict(dropout=0.3, noise=0.1)
    straight = make_exp(tmp_path / "straight", toy=toy, max_steps=6)
    run(straight)
    out = tmp_path / "x"
    run(make_exp(out, toy=toy))  # checkpoints 2 and 4
    root = str(out / "checkpoints")
    bad = ckpt.step_dir(root, 4)
    if keep == "missing":
        os.remove(os.path.join(bad, name))
    else:
        truncate(os.path.join(bad, name), keep)

    with pytest.raises(ckpt.CheckpointError) as err:  # named explicitly: a clear error, no fallback
        run(make_exp(out, toy=toy, max_steps=6, resume=bad))
    assert bad in str(err.value) and name in str(err.value)

    capsys.readouterr()
    assert run(make_exp(out, toy=toy, max_steps=6))["step"] == 6
    said = capsys.readouterr().out
    assert name in said and "resuming from step 2" in said and f"moved it to {bad}.damaged" in said
    assert os.path.isdir(bad + ".damaged")
    assert logged(out) == [1, 2, 3, 4, 5, 6]
    assert logged(out, "loss") == logged(straight.output_dir, "loss")
    assert same_weights(final_weights(out), final_weights(straight.output_dir))


def test_all_checkpoints_damaged_is_a_clear_error(tmp_path):
    out = tmp_path / "x"
    run(make_exp(out))
    root = str(out / "checkpoints")
    for step in (2, 4):
        truncate(os.path.join(ckpt.step_dir(root, step), "params.safetensors"), "half")
    with pytest.raises(ckpt.CheckpointError, match="(?s)no intact checkpoint.*step-00000004.*params.safetensors"
                                                   ".*step-00000002.*train.resume=never"):
        run(make_exp(out, max_steps=6))


def test_torn_last_metrics_line_is_dropped(tmp_path, capsys):
    out = tmp_path / "x"
    run(make_exp(out))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.2')  # killed mid-write
    assert run(make_exp(out, max_steps=6))["step"] == 6
    assert "dropped a torn last line" in capsys.readouterr().out
    assert logged(out) == [1, 2, 3, 4, 5, 6]


def test_garbled_metrics_line_inside_the_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 2, "loss": 0.5}\n')
    with pytest.raises(RuntimeError, match=r"metrics.jsonl: line 2 is not a metrics record"):
        trainer._truncate_metrics(str(path), 2)
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    trainer._truncate_metrics(str(path), 1)
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n'


def test_killed_export_leaves_the_previous_final(tmp_path, monkeypatch):
    out = tmp_path / "x"
    run(make_exp(out))
    before = final_weights(out)

    def dies_midway(self, policy, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        Path(out_dir, "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt("killed during export")

    monkeypatch.setattr(ToyMethod, "save_pretrained", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        run(make_exp(out, max_steps=6))
    assert same_weights(final_weights(out), before) and os.listdir(out / "final") == ["model.safetensors"]
    monkeypatch.undo()
    assert run(make_exp(out, max_steps=6))["step"] == 6  # resumes at 6 (saved before the export) and exports
    assert not same_weights(final_weights(out), before)
    assert not [n for n in os.listdir(out) if n.startswith((".tmp-", ".old-"))]


def test_export_killed_between_renames_restores_the_previous_final(tmp_path):
    out = tmp_path / "x"
    run(make_exp(out))
    before = final_weights(out)
    os.rename(out / "final", out / ".old-final")  # the old one moved aside, the new one not yet in place
    Path(out, ".tmp-final").mkdir()

    class Failing:
        def save_pretrained(self, policy, out_dir):
            raise OSError("disk full (injected)")

    with pytest.raises(OSError, match="injected"):
        trainer._export(Failing(), None, str(out))
    assert same_weights(final_weights(out), before) and not (out / ".tmp-final").exists()
