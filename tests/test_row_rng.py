"""Per-row randomness (core.row_rng): the keys and draws, the trainer's wiring, and the invariants it buys for
the real methods: batch 4 == batch 2 x accumulation 2 == 2-process DDP with batch 2, for Diffusion-DPO (every
draw per row) and MLLM DPO (no per-step randomness at all).

Tolerances: the runs differ only in float reduction order (batch shapes, gradient all-reduce), amplified by
DPO's beta and Adam's normalisation, so losses agree to LOSS_ATOL and the trainable weights to WEIGHT_RTOL x the
largest trained weight's magnitude. Measured on CPU (Diffusion-DPO, LoRA, beta 500): loss 7.7e-6, weights 6e-6 to
1.7e-5 x scale on an Intel Xeon; 2-process DDP on an AMD EPYC: loss 1.9e-5, weights 1.4e-4 x scale (its kernels
round differently); with the global RNG instead (the control) loss 3.4e-2, weights 5.5e-3 x scale on both."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmalign.core.config import Experiment, TrainConfig, save_resolved
from mmalign.core.row_rng import (RowRandom, SeededCollate, SeededRows, mix, name_key, row_seed, split_pairs,
                                  wants_row_seed)
from mmalign.core.trainer import StepBatchSampler

REPO = Path(__file__).resolve().parents[1]
LOSS_ATOL = 5e-5
WEIGHT_RTOL = 3e-4


def seeds(rows, seed=0, epoch=0):
    return torch.tensor([row_seed(seed, epoch, i) for i in rows])


# --- keys and draws --------------------------------------------------------------------------------------------

def test_keys_are_stable_int63_and_distinct():
    # pinned: a changed hash changes every run's noise (blake2b, not hash(): the same in every process)
    assert row_seed(0, 0, 0) == mix(0, 0, 0) == 1279368494785126216
    assert name_key("t") == 0xD6D472E0F5DC73CA
    keys = {row_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(keys) == 450 and all(0 <= k < 2**63 for k in keys)
    assert row_seed(-1, 0, 0) != row_seed(0, 0, 0) and 0 <= row_seed(-1, 0, 0) < 2**63
    assert len({name_key(n) for n in ("t", "noise", "view", "latent_w", "latent_l")}) == 5


def test_same_row_same_values_whatever_the_batch():
    a = RowRandom.of({"row_seed": seeds([3, 7, 1])})
    b = RowRandom.of({"row_seed": seeds([1, 9, 3, 4])})
    na, nb = a.randn("noise", (2, 3)), b.randn("noise", (2, 3))
    assert na.shape == (3, 2, 3) and torch.equal(na[0], nb[2]) and torch.equal(na[2], nb[0])
    assert not torch.equal(na[0], na[1])  # rows differ
    ta, tb = a.randint("t", 0, 1000), b.randint("t", 0, 1000)
    assert ta.dtype == torch.long and ta[0] == tb[2] and ta[2] == tb[0]
    assert torch.equal(a.rand("drop")[[0, 2]], b.rand("drop")[[2, 0]])
    assert not torch.equal(a.randn("other", (2, 3)), na)  # another name, other numbers
    other_epoch = RowRandom.of({"row_seed": seeds([3, 7, 1], epoch=1)}).randn("noise", (2, 3))
    assert not torch.equal(other_epoch, na)
    other_seed = RowRandom.of({"row_seed": seeds([3, 7, 1], seed=1)}).randn("noise", (2, 3))
    assert not torch.equal(other_seed, na)


def test_draws_have_the_asked_distribution_and_dtype():
    r = RowRandom.of({"row_seed": seeds(range(4000))})
    x, u, k = r.randn("x", (), dtype=torch.bfloat16), r.rand("u", shape=(2,)), r.randint("k", 5, 8)
    assert x.dtype == torch.bfloat16 and abs(x.float().mean()) < 0.06 and abs(x.float().std() - 1) < 0.06
    assert u.shape == (4000, 2) and 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.02
    assert set(k.tolist()) == {5, 6, 7}


def test_a_name_is_one_draw():
    r = RowRandom.of({"row_seed": seeds([0, 1])})
    r.randn("noise", (2,))
    with pytest.raises(ValueError, match="twice"):
        r.randn("noise", (2,))
    with pytest.raises(ValueError, match="2 row seeds for 3 rows"):
        RowRandom(3, [1, 2])


def test_fallback_is_the_global_rng():
    batch = {"x": torch.zeros(5, 2)}
    r = RowRandom.of(batch)
    assert not r.keyed and r.n == 5
    torch.manual_seed(0)
    got = (r.randn("noise", (3,)), r.rand("drop"), r.randint("t", 0, 10))
    torch.manual_seed(0)
    want = (torch.randn(5, 3), torch.rand(5), torch.randint(0, 10, (5,)))
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert RowRandom.of({"x": torch.zeros(5)}, n=2).n == 2


def test_split_pairs_orders_firsts_then_seconds():
    x = torch.arange(6).view(3, 2)
    assert split_pairs(x).tolist() == [0, 2, 4, 1, 3, 5]


# --- trainer wiring -------------------------------------------------------------------------------------------

def test_sampler_with_epoch_keeps_the_order_and_names_the_epoch():
    cfg = TrainConfig(batch_size=2, grad_accum=2, max_steps=7, seed=3)
    plain = list(StepBatchSampler(10, cfg, 2, 1, 0))  # G = 8: one step per epoch
    keyed = list(StepBatchSampler(10, cfg, 2, 1, 0, with_epoch=True))
    assert [[i for _, i in b] for b in keyed] == plain
    assert [b[0][0] for b in keyed] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    assert list(StepBatchSampler(10, cfg, 2, 1, 3, with_epoch=True)) == keyed[6:]  # resumed at step 3


def test_seeded_rows_and_collate_add_row_seed_without_touching_collate():
    rows = SeededRows([{"x": torch.tensor([float(i)])} for i in range(6)], seed=4)
    collate = SeededCollate(lambda rs: {"x": torch.stack([r["x"] for r in rs])})
    batch = collate([rows[(2, 5)], rows[(2, 1)]])
    assert batch["x"].flatten().tolist() == [5.0, 1.0]
    assert batch["row_seed"].tolist() == [row_seed(4, 2, 5), row_seed(4, 2, 1)] and len(rows) == 6
    with pytest.raises(TypeError, match="dict"):
        SeededCollate(lambda rs: [r["x"] for r in rs])([rows[(0, 0)]])


def test_which_methods_ask_for_row_seeds():
    from mmalign.diffusion.latent_method import LatentDiffusionMethod
    from mmalign.mllm.dpo import MLLMDPO
    from mmalign.video.methods import VideoDiffusionDPO

    assert wants_row_seed(LatentDiffusionMethod) and wants_row_seed(VideoDiffusionDPO)
    assert not wants_row_seed(MLLMDPO)  # no per-row draws; its batches stay as they were


# --- the real methods: batch b x k == batch bk == 2-process DDP ---------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(config: Path, **extra_env):
    """`mmalign train config` in 2 processes; the tests folder is importable there (rewards defined in tests)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "mmalign.cli", "train", str(config)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1", **extra_env}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]


def logged(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    files = sorted((out / "final").rglob("*.safetensors"))
    assert files, f"no exported weights in {out / 'final'}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def differences(a: Path, b: Path) -> tuple[float, float]:
    """(max |loss difference| over the steps, max |weight difference| / max |weight|)."""
    la, lb = logged(a), logged(b)
    assert len(la) == len(lb) > 1
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    scale = max(v.abs().max().item() for v in wa.values())
    assert scale > 0
    return (max(abs(x - y) for x, y in zip(la, lb)),
            max((wa[k] - wb[k]).abs().max().item() for k in wa) / scale)


@pytest.fixture(scope="module")
def eight_pairs(tmp_path_factory):
    from mmalign.datasets.pairs import write_pairs_jsonl
    from mmalign.datasets.shapeworld import render_scene, sample_scenes

    out = tmp_path_factory.mktemp("pairs8")
    scenes = sample_scenes(3, 9)
    write_pairs_jsonl(out, [(scenes[i].caption, render_scene(scenes[i], 32), render_scene(scenes[i + 1], 32), {})
                            for i in range(8)])
    return out


def dpo_config(tmp_path, tiny_sd_dir, data, name, batch, accum) -> Path:
    cfg = {"method": "diffusion_dpo", "output_dir": str(tmp_path / name),
           "train": {"lr": 1e-3, "max_steps": 3, "batch_size": batch, "grad_accum": accum, "log_every": 1,
                     "seed": 0},
           "model": {"pretrained": str(tiny_sd_dir), "lora_rank": 4, "reference": "adapters_off"},
           "data": {"path": str(data), "cache_dir": str(tmp_path / "cache"), "caption_dropout": 0.5,
                    "random_flip": True},
           "objective": {"beta": 500.0}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_recipe(path: Path):
    from mmalign.core.registry import load_recipe, method_class
    from mmalign.core.trainer import train

    exp = load_recipe(str(path))
    return train(exp, method_class(exp.method)(exp.args, exp.output_dir))


def test_diffusion_dpo_same_in_every_layout(tmp_path, tiny_sd_dir, eight_pairs, monkeypatch):
    """3 steps (into epoch 2) with flips and caption dropout on: batch 4, batch 2 x accumulation 2 and 2-process
    DDP with batch 2 train the same LoRA. Control: with the global RNG (no row seeds) they do not."""
    for name, batch, accum in (("big", 4, 1), ("accum", 2, 2), ("ddp", 2, 1)):
        path = dpo_config(tmp_path, tiny_sd_dir, eight_pairs, name, batch, accum)
        torchrun(path) if name == "ddp" else train_recipe(path)
    big, accum, ddp = (tmp_path / n for n in ("big", "accum", "ddp"))
    for other in (accum, ddp):
        loss_diff, weight_diff = differences(big, other)
        print(f"diffusion_dpo {other.name}: max loss diff {loss_diff:.2e}, max weight diff {weight_diff:.2e} x scale")
        assert loss_diff <= LOSS_ATOL and weight_diff <= WEIGHT_RTOL

    from mmalign.diffusion.latent_method import LatentDiffusionMethod
    monkeypatch.setattr(LatentDiffusionMethod, "wants_row_seed", False)  # the global RNG, as before
    train_recipe(dpo_config(tmp_path, tiny_sd_dir, eight_pairs, "global_rng", 2, 2))
    loss_diff, weight_diff = differences(big, tmp_path / "global_rng")
    print(f"global rng control: max loss diff {loss_diff:.2e}, max weight diff {weight_diff:.2e} x scale")
    assert loss_diff > 10 * LOSS_ATOL and weight_diff > 10 * WEIGHT_RTOL  # the test tells layouts apart


def test_pair_draws_follow_the_row_not_the_batch(tmp_path, tiny_sd_dir, eight_pairs):
    """Posterior samples, flip view and caption dropout of a pair are the same in any batch holding it."""
    from mmalign.core.config import from_dict
    from mmalign.diffusion.objectives import DiffusionDPO
    from mmalign.diffusion.preference import PreferenceConfig

    cfg = from_dict(PreferenceConfig, {"model": {"pretrained": str(tiny_sd_dir)},
                                       "data": {"path": str(eight_pairs), "cache_dir": "", "random_flip": True,
                                                "caption_dropout": 0.5}}, "test")
    m = DiffusionDPO(cfg, str(tmp_path / "m"))
    m.build(torch.device("cpu"))
    data, _ = m.dataset()
    rows, collate = SeededRows(data, seed=0), SeededCollate(m.collate)
    outs = []
    for keys in ([(1, i) for i in range(8)], [(1, 5), (1, 2)]):
        batch = collate([rows[k] for k in keys])
        r = RowRandom.of(batch)
        w, lat_l, view = m.pair_latents(batch, r)
        cond, _ = m.pair_cond(batch, view, r)
        outs.append((w, lat_l, view, cond["ctx"]))
    for full, part in zip(*outs):
        assert torch.equal(full[[5, 2]], part)
    assert set(outs[0][2].tolist()) == {0, 1}  # both views drawn somewhere


def mllm_experiment(tmp_path, tiny_llava_dir, data, name, batch, accum):
    from mmalign.mllm.dpo import DPOObjective, MLLMDPO, VLDPOConfig, VLPairDataConfig
    from mmalign.mllm.models import VLModelConfig

    cfg = VLDPOConfig(model=VLModelConfig(pretrained=tiny_llava_dir, lora_rank=4),
                      data=VLPairDataConfig(path=data, ref_cache_dir=str(tmp_path / "refcache")),
                      objective=DPOObjective(beta=0.5))
    exp = Experiment(method="mllm_dpo", output_dir=str(tmp_path / name), args=cfg,
                     train=TrainConfig(max_steps=3, batch_size=batch, grad_accum=accum, lr=1e-2, log_every=1))
    return exp, MLLMDPO(cfg, exp.output_dir)


def test_mllm_dpo_same_in_every_layout(tmp_path, tiny_llava_dir, vl_pairs_dir):
    """MLLM DPO draws nothing at random per step (no dropout anywhere; mDPO's crops are fixed at encode time), so
    batch 4, batch 2 x accumulation 2 and 2-process DDP with batch 2 agree without row seeds."""
    from mmalign.core.trainer import train

    for name, batch, accum in (("big", 4, 1), ("accum", 2, 2), ("ddp", 2, 1)):
        exp, method = mllm_experiment(tmp_path, tiny_llava_dir, vl_pairs_dir, name, batch, accum)
        if name == "ddp":
            save_resolved(exp, str(tmp_path / "ddp.yaml"))
            torchrun(tmp_path / "ddp.yaml")
            continue
        train(exp, method)
        if name == "big":  # the premise: every dropout probability in the trained model is 0
            for mod in method.policy.modules():
                for attr in ("p", "dropout", "attention_dropout"):
                    value = getattr(mod, attr, None)
                    assert not isinstance(value, float) or value == 0.0, (type(mod).__name__, attr, value)
    big = tmp_path / "big"
    assert len(set(logged(big))) == 3  # the policy moved
    for other in (tmp_path / "accum", tmp_path / "ddp"):
        loss_diff, weight_diff = differences(big, other)
        print(f"mllm_dpo {other.name}: max loss diff {loss_diff:.2e}, max weight diff {weight_diff:.2e} x scale")
        assert loss_diff <= LOSS_ATOL and weight_diff <= WEIGHT_RTOL
