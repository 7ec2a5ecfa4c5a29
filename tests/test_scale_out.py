"""Scale-out on CPU (gloo): FSDP2 equals one process, FSDP2 kill-and-resume, the world-size check, and the
shipped accelerate configs (configs/accelerate/*.yaml). Tolerance for 2 processes vs 1: 1e-5 absolute (float32
reductions in another order)."""
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mmalign.core import checkpoint as ckpt
from mmalign.core import distributed
from mmalign.core.config import ConfigError, Experiment, TrainConfig, save_resolved
from mmalign.core.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from fsdp_worker import RefToyArgs, RefToyConfig, RefToyMethod  # noqa: E402
from test_core_trainer import assert_same_weights, free_port, logged, subprocess_env, weights  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "accelerate"
WORKER = str(Path(__file__).parent / "fsdp_worker.py")
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
ATOL = 1e-5


def make_exp(tmp_path, name, toy=None, **train_kw):
    kw = {**dict(max_steps=4, batch_size=4, lr=1e-2, log_every=1, seed=0), **train_kw}
    return Experiment("toy", str(tmp_path / name), TrainConfig(**kw), RefToyConfig(RefToyArgs(**(toy or {}))))


def fsdp_env(config: str) -> dict:
    """The FSDP variables `accelerate launch --config_file configs/accelerate/<config>` sets (its
    prepare_multi_gpu_env maps fsdp_config.fsdp_x to FSDP_X)."""
    cfg = yaml.safe_load((CONFIGS / config).read_text())
    env = {"ACCELERATE_USE_FSDP": "true"}
    for k, v in cfg["fsdp_config"].items():
        env[k.upper()] = str(v).lower() if isinstance(v, bool) else str(v)
    return env


def torchrun(tmp_path, exp, env, expect_rc=0):
    cfg = str(tmp_path / f"{os.path.basename(exp.output_dir)}.yaml")
    save_resolved(exp, cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), WORKER, cfg]
    proc = subprocess.run(cmd, env=subprocess_env(OMP_NUM_THREADS="1", **env), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == expect_rc if expect_rc == 0 else proc.returncode != 0, proc.stderr[-3000:]
    return proc


def max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_fsdp2_two_processes_equal_one_process_via_accelerate_launch(tmp_path):
    toy = dict(reference="frozen_copy")  # the reference copy is sharded too
    single = make_exp(tmp_path, "single", toy, batch_size=8)
    train(single, RefToyMethod(single.args.toy))
    fsdp = make_exp(tmp_path, "fsdp", toy)
    save_resolved(fsdp, str(tmp_path / "fsdp.yaml"))
    cmd = [ACCELERATE, "launch", "--config_file", str(CONFIGS / "fsdp2_full.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), WORKER, str(tmp_path / "fsdp.yaml")]
    proc = subprocess.run(cmd, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step = ckpt.step_dir(os.path.join(fsdp.output_dir, "checkpoints"), 4)
    assert sorted(n for n in os.listdir(os.path.join(step, "sharded")) if n.endswith(".distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]  # DCP: one shard file per rank
    assert np.allclose(logged(fsdp), logged(single), rtol=0, atol=ATOL)
    assert weights(fsdp)["0.weight"].shape == (8, 4)  # export gathered, not rank 0's shard
    assert_same_weights(weights(fsdp), weights(single), atol=ATOL)
    assert proc.stdout.count("data: ") == 1  # only rank 0 prints


def test_fsdp2_kill_and_resume_equals_uninterrupted(tmp_path):
    env = fsdp_env("fsdp2_full.yaml")  # SHARDED_STATE_DICT: DCP checkpoints
    toy = dict(reference="shared_frozen_copy", noise=0.1)
    straight = make_exp(tmp_path, "straight", toy, max_steps=6, save_every=2, lr_scheduler="linear")
    torchrun(tmp_path, straight, env)
    crashed = make_exp(tmp_path, "crashed", dict(toy, kill_at_call=5), max_steps=6, save_every=2,
                       lr_scheduler="linear")
    torchrun(tmp_path, crashed, env, expect_rc=-signal.SIGKILL)
    root = os.path.join(crashed.output_dir, "checkpoints")
    assert ckpt.latest_checkpoint(root) == ckpt.step_dir(root, 4)
    crashed.args.toy.kill_at_call = 0
    proc = torchrun(tmp_path, crashed, env)
    assert "resuming from step 4" in proc.stdout
    assert logged(crashed, "step") == list(range(1, 7))
    assert np.allclose(logged(crashed), logged(straight), rtol=0, atol=ATOL)
    assert_same_weights(weights(crashed), weights(straight), atol=ATOL)
    shard = os.path.join(ckpt.latest_checkpoint(root), "sharded", "__1_0.distcp")
    os.truncate(shard, os.path.getsize(shard) // 2)  # a damaged shard is found before any rank loads it
    with pytest.raises(ckpt.CheckpointError, match="__1_0.distcp is missing or truncated"):
        ckpt.load_checkpoint(ckpt.latest_checkpoint(root))


def test_fsdp2_lora_adapters_off_full_state_dict(tmp_path):
    toy = dict(lora=True, reference="adapters_off")  # frozen base and trainable LoRA in the same modules
    single = make_exp(tmp_path, "single", toy, batch_size=8)
    train(single, RefToyMethod(single.args.toy))
    fsdp = make_exp(tmp_path, "fsdp", toy, save_every=2)
    torchrun(tmp_path, fsdp, fsdp_env("fsdp2_lora.yaml"))
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(os.path.join(fsdp.output_dir, "checkpoints")))
    assert saved["sharded"] is None and saved["params"] and all("lora_" in k for k in saved["params"])
    assert saved["params"]["base_model.model.0.lora_A.default.weight"].shape == (2, 4)  # gathered, full
    assert np.allclose(logged(fsdp), logged(single), rtol=0, atol=ATOL)
    assert_same_weights(weights(fsdp), weights(single), atol=ATOL)


def test_accelerate_cpu_launch_with_two_processes_is_refused(tmp_path):
    exp = make_exp(tmp_path, "cpu")
    save_resolved(exp, str(tmp_path / "cpu.yaml"))
    cmd = [ACCELERATE, "launch", "--cpu", "--num_processes", "2", WORKER, str(tmp_path / "cpu.yaml")]
    proc = subprocess.run(cmd, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "starts one process, not N" in proc.stderr, proc.stderr[-2000:]
    assert not os.path.exists(os.path.join(exp.output_dir, "metrics.jsonl"))  # refused before training


def test_world_size_mismatch_is_a_config_error(monkeypatch):
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(var, raising=False)
    one = types.SimpleNamespace(num_processes=1)
    distributed.check_world_size(one)  # a plain single-process run passes
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="asked for 4 processes but accelerate set up 1.*torchrun"):
        distributed.check_world_size(one)
    distributed.check_world_size(types.SimpleNamespace(num_processes=4))


def test_frozen_copy_reference_is_refused_under_zero3():
    from accelerate.utils import DistributedType
    from mmalign.core.reference import make_reference

    def acc(stage):
        return types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                                     state=types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(zero_stage=stage)))
    method = types.SimpleNamespace(ref=make_reference("frozen_copy", torch.nn.Linear(2, 2)))
    distributed.check_reference(method, acc(2))  # ZeRO-2: weights are replicated, the copy is fine
    with pytest.raises(ConfigError, match="not supported under DeepSpeed ZeRO-3.*adapters_off"):
        distributed.check_reference(method, acc(3))


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp2_lora.yaml", "fsdp2_full.yaml", "deepspeed_zero2.yaml",
                                  "deepspeed_zero3.yaml"])
def test_accelerate_configs_parse_and_build_their_plugins(name, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    text = (CONFIGS / name).read_text()
    assert text.startswith("#") and f"accelerate launch --config_file configs/accelerate/{name}" in text
    cfg = load_config_from_file(str(CONFIGS / name))  # accelerate's own reader
    assert cfg.num_processes == 2 and not cfg.use_cpu
    if name.startswith("fsdp2"):
        assert cfg.distributed_type == "FSDP"
        for k, v in fsdp_env(name).items():
            monkeypatch.setenv(k, v)
        plugin = FullyShardedDataParallelPlugin()  # as the Accelerator builds it from the launcher's variables
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        want = "FULL_STATE_DICT" if "lora" in name else "SHARDED_STATE_DICT"
        assert str(plugin.state_dict_type).endswith(want)
    elif name.startswith("deepspeed"):
        assert cfg.distributed_type == "DEEPSPEED"
        plugin = DeepSpeedPlugin(**cfg.deepspeed_config)  # builds without the deepspeed package
        stage = plugin.deepspeed_config["zero_optimization"]["stage"]
        assert stage == int(name[-6])
        if stage == 3:
            assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    else:
        assert cfg.distributed_type == "MULTI_GPU"


def test_exit_without_teardown_flushes_and_keeps_the_exit_code():
    """A finished rank ends through os._exit (gloo's threads outlive destroy_process_group): what it printed or
    logged is flushed first, and the exit code is the one asked for."""
    code = ("import logging, sys; from mmalign.core.distributed import exit_without_teardown, release_process_group;"
            "logging.basicConfig(stream=sys.stderr); logging.getLogger('x').warning('logged');"
            "print('printed', end=''); assert release_process_group() is False; exit_without_teardown(3)")
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "printed" and "logged" in proc.stderr
