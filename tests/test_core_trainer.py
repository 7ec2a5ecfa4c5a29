import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmalign.core import checkpoint as ckpt
from mmalign.core.config import ConfigError, Experiment, TrainConfig, save_resolved
from mmalign.core.reference import make_reference
from mmalign.core.trainer import NonFiniteLossError, StepBatchSampler, train

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import ToyArgs, ToyConfig, ToyMethod  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKER = str(Path(__file__).parent / "ddp_worker.py")


def make_exp(tmp_path, name, toy=None, **train_kw):
    kw = {**dict(max_steps=8, batch_size=4, lr=1e-2, log_every=1, seed=0), **train_kw}
    return Experiment("toy", str(tmp_path / name), TrainConfig(**kw), ToyConfig(ToyArgs(**(toy or {}))))


def run(exp):
    return train(exp, ToyMethod(exp.args.toy))


def logged(exp, key="loss"):
    with open(os.path.join(exp.output_dir, "metrics.jsonl")) as f:
        return [json.loads(line)[key] for line in f]


def weights(exp):
    return load_file(os.path.join(exp.output_dir, "final", "model.safetensors"))


def subprocess_env(**extra):
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads()), **extra}


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=atol) if atol else torch.equal(a[k], b[k]), k


def test_sampler_splits_global_batch_over_ranks_and_microbatches():
    cfg = TrainConfig(batch_size=2, grad_accum=3, max_steps=5, seed=1)
    per_rank = [list(StepBatchSampler(40, cfg, 2, r, 0)) for r in range(2)]  # G = 12, 3 steps per epoch
    single = list(StepBatchSampler(40, TrainConfig(batch_size=12, max_steps=5, seed=1), 1, 0, 0))
    for step in range(5):
        union = sum((per_rank[r][step * 3 + j] for r in range(2) for j in range(3)), [])
        assert sorted(union) == sorted(single[step])
    assert len(set(sum(single[:3], []))) == 36  # no repeats within an epoch
    assert list(StepBatchSampler(40, cfg, 2, 1, 2)) == per_rank[1][6:]  # resuming at step 2


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    toy = dict(dropout=0.3, noise=0.1)  # random streams: resume must restore RNG state
    straight = make_exp(tmp_path, "straight", toy, save_every=3, lr_scheduler="linear", warmup_steps=2)
    run(straight)

    crashed = make_exp(tmp_path, "crashed", dict(toy, kill_at_call=5), save_every=3, lr_scheduler="linear",
                       warmup_steps=2)
    save_resolved(crashed, str(tmp_path / "crashed.yaml"))
    proc = subprocess.run([sys.executable, WORKER, str(tmp_path / "crashed.yaml")], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    root = os.path.join(crashed.output_dir, "checkpoints")
    assert ckpt.latest_checkpoint(root) == ckpt.step_dir(root, 3) and len(logged(crashed)) == 4

    crashed.args.toy.kill_at_call = 0
    assert run(crashed)["step"] == 8
    assert logged(crashed, "step") == list(range(1, 9))
    assert logged(crashed) == logged(straight)
    assert logged(crashed, "id_sum") == logged(straight, "id_sum")
    assert_same_weights(weights(crashed), weights(straight))
    assert run(crashed)["step"] == 8  # already finished: nothing more to do


def test_time_budget_stops_with_checkpoint_and_resume_finishes_the_same(tmp_path, monkeypatch):
    import mmalign.core.trainer as trainer

    toy = dict(dropout=0.3, noise=0.1)
    straight = make_exp(tmp_path, "straight", toy, log_every=3)
    run(straight)
    clock = iter(range(0, 10**6, 7))  # every reading of the clock is 7 s later
    monkeypatch.setattr(trainer.time, "time", lambda: float(next(clock)))
    timed = make_exp(tmp_path, "timed", toy, log_every=3, max_minutes=0.5)
    out = run(timed)
    monkeypatch.undo()
    assert 1 <= out["step"] < 8 and out["stopped"].startswith("time budget of 0.5 min")
    root = os.path.join(timed.output_dir, "checkpoints")
    assert ckpt.latest_checkpoint(root) == ckpt.step_dir(root, out["step"])
    assert logged(timed, "step")[-1] == out["step"]  # the stop step is logged even off the log_every grid
    timed.train.max_minutes = 0
    assert run(timed)["step"] == 8 and "stopped" not in run(timed)
    assert logged(timed, "step")[-1] == 8 and logged(timed)[-1] == logged(straight)[-1]
    assert_same_weights(weights(timed), weights(straight))
    with pytest.raises(ConfigError, match="max_minutes"):
        run(make_exp(tmp_path, "bad", max_minutes=-1))


def test_resume_from_explicit_checkpoint_with_accumulation(tmp_path):
    toy = dict(dropout=0.3, noise=0.1)
    straight = make_exp(tmp_path, "straight", toy, batch_size=2, grad_accum=2, save_every=2)
    run(straight)
    crashed = make_exp(tmp_path, "crashed", dict(toy, raise_at_call=11), batch_size=2, grad_accum=2, save_every=2)
    with pytest.raises(KeyboardInterrupt):
        run(crashed)  # dies in step 6
    crashed.args.toy.raise_at_call = 0
    crashed.train.resume = ckpt.step_dir(os.path.join(crashed.output_dir, "checkpoints"), 2)
    run(crashed)
    assert logged(crashed) == logged(straight)
    assert_same_weights(weights(crashed), weights(straight))


def test_accumulation_equals_bigger_batch(tmp_path):
    small = make_exp(tmp_path, "small", batch_size=2, grad_accum=4, max_steps=4)
    big = make_exp(tmp_path, "big", batch_size=8, grad_accum=1, max_steps=4)
    run(small), run(big)
    assert np.allclose(logged(small), logged(big), rtol=0, atol=1e-6)
    assert np.allclose(logged(small, "grad_norm"), logged(big, "grad_norm"), rtol=1e-5, atol=0)
    assert_same_weights(weights(small), weights(big), atol=1e-6)


def test_grad_norm_is_logged_before_clipping(tmp_path):
    """The logged grad_norm is the norm of the full gradient (recomputed by hand on the step's batch from the
    initial weights), also when clipping shrinks it: at lr 1e-12 the exported weights are the initial ones."""
    exp = make_exp(tmp_path, "norm", max_steps=1, lr=1e-12, max_grad_norm=1e-3)
    method = ToyMethod(exp.args.toy)
    train(exp, method)
    model = method.build("cpu")
    model.load_state_dict(weights(exp), strict=False)
    batch = method.collate([method.dataset()[0][i] for i in method.seen_ids[0]])
    ((model(batch["x"]) - batch["y"]) ** 2).mean().backward()
    by_hand = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm()
    assert by_hand > 1e-3  # so clipping was active
    assert logged(exp, "grad_norm") == [pytest.approx(float(by_hand), rel=1e-5)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_equals_single_process(tmp_path):
    single = make_exp(tmp_path, "single", batch_size=8, max_steps=4)
    run(single)
    ddp = make_exp(tmp_path, "ddp", batch_size=4, max_steps=4)
    save_resolved(ddp, str(tmp_path / "ddp.yaml"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), WORKER, str(tmp_path / "ddp.yaml")]
    proc = subprocess.run(cmd, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt_dir = ckpt.step_dir(os.path.join(ddp.output_dir, "checkpoints"), 4)
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= set(os.listdir(ckpt_dir))
    assert np.allclose(logged(ddp), logged(single), rtol=0, atol=1e-5)
    assert_same_weights(weights(ddp), weights(single), atol=1e-5)


def test_checkpoint_save_is_atomic_and_keeps_last(tmp_path, monkeypatch):
    root = str(tmp_path / "checkpoints")

    def save(step):
        ckpt.save_checkpoint(root, step, {"w": torch.full((2,), float(step))}, {"opt": torch.tensor(step)},
                             {"sched": step}, {"note": "x"}, keep_last=2)

    save(1), save(2)
    real_write = ckpt._write_torch

    def failing_write(path, obj):
        if path.endswith("optimizer.pt"):
            raise OSError("disk full (injected)")
        real_write(path, obj)

    monkeypatch.setattr(ckpt, "_write_torch", failing_write)
    with pytest.raises(OSError, match="injected"):
        save(3)
    assert ckpt.latest_checkpoint(root) == ckpt.step_dir(root, 2)
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(root)] == ["step-00000001", "step-00000002"]
    assert os.path.exists(os.path.join(root, ".tmp-step-00000003", "params.safetensors"))  # torn, not a checkpoint
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(root))
    assert state["params"]["w"].tolist() == [2.0, 2.0] and state["trainer_state"]["step"] == 2

    monkeypatch.setattr(ckpt, "_write_torch", real_write)
    save(3)
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(root)] == ["step-00000002", "step-00000003"]
    assert not [n for n in os.listdir(root) if n.startswith(".tmp-")]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(root))["optimizer"]["opt"].item() == 3


def test_rng_state_round_trip():
    saved = ckpt.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(2).tolist())
    ckpt.set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(2).tolist()) == first


def test_trainer_keeps_last_checkpoints_and_stores_only_trainable(tmp_path):
    exp = make_exp(tmp_path, "keep", max_steps=5, save_every=1, keep_last=2)
    run(exp)
    root = os.path.join(exp.output_dir, "checkpoints")
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(root)] == ["step-00000004", "step-00000005"]
    assert "0.bias" not in ckpt.load_checkpoint(ckpt.latest_checkpoint(root))["params"]  # frozen in ToyMethod
    assert os.path.exists(os.path.join(exp.output_dir, "config.yaml"))


def test_nonfinite_loss_stops_with_batch_saved(tmp_path):
    exp = make_exp(tmp_path, "nan", dict(nan_at_call=3))
    with pytest.raises(NonFiniteLossError, match="step 3") as err:
        run(exp)
    path = os.path.join(exp.output_dir, "nonfinite_batch_step3.pt")
    assert path in str(err.value)
    batch = torch.load(path, weights_only=True)
    assert batch["x"].shape == (4, 4) and batch["id"].shape == (4,)


def test_bf16_runs_and_fp16_on_cpu_is_a_clear_error(tmp_path):
    exp = make_exp(tmp_path, "bf16", max_steps=2, mixed_precision="bf16")
    assert np.isfinite(run(exp)["metrics"]["loss"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
            run(make_exp(tmp_path, "fp16", max_steps=2, mixed_precision="fp16"))


def test_adafactor_cosine_warmup_and_tensorboard(tmp_path):
    exp = make_exp(tmp_path, "ada", max_steps=6, optimizer="adafactor", lr_scheduler="cosine", warmup_steps=2,
                   tensorboard=True)
    run(exp)
    lrs = logged(exp, "lr")
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1e-2) and lrs[2] > lrs[3] > lrs[4] > lrs[5]
    assert os.listdir(os.path.join(exp.output_dir, "tensorboard"))


class Wrapped(torch.nn.Module):  # stands in for DDP's `.module`
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_reference_frozen_copy_does_not_follow_training():
    policy = torch.nn.Linear(3, 2)
    ref = make_reference("frozen_copy", Wrapped(policy))
    before = policy.weight.detach().clone()
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    for _ in range(3):
        policy(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
    out = ref(lambda m: m(torch.ones(1, 3)))
    assert not out.requires_grad and torch.equal(ref(lambda m: m.weight), before)
    assert not torch.equal(policy.weight, before)


def check_adapters_off(model, call, base_out):
    lora_out = call(model)
    assert not torch.allclose(lora_out, base_out)
    ref = make_reference("adapters_off", Wrapped(model))
    assert torch.allclose(ref(call), base_out, atol=1e-6)
    assert torch.equal(call(model), lora_out)  # adapters are back on
    with pytest.raises(ValueError):
        ref(lambda m: (_ for _ in ()).throw(ValueError("inside")))
    assert torch.equal(call(model), lora_out)  # ... also after an error


def test_reference_adapters_off_peft_model():
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 4)
    base_out = base(x).detach()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    check_adapters_off(model, lambda m: m(x).detach(), base_out)


def test_reference_adapters_off_diffusers_model():
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2)
    x, text = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 8)
    call = lambda m: m(x, 1, text).sample.detach()  # noqa: E731
    base_out = call(unet)
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    check_adapters_off(unet, call, base_out)


def test_reference_errors():
    with pytest.raises(TypeError, match="adapters_off"):
        make_reference("adapters_off", torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="'none'"):
        make_reference("none", torch.nn.Linear(2, 2))(lambda m: m)
    with pytest.raises(ValueError, match="unknown reference kind"):
        make_reference("copy", torch.nn.Linear(2, 2))
