"""Step-time cost of training from the lazy sharded cache against the same rows held in memory, on the demo's
setting (shipped 32 px ShapeWorld base, Diffusion-DPO full fine-tune against a frozen copy, batch 32).

    .venv/bin/python benchmarks/lazy_step_cost.py --pairs 512 --steps 12

Both arms run the same loop (row-seeded batches as the trainer builds them -> collate -> loss -> backward ->
AdamW), interleaved step by step so machine noise hits both alike. The in-memory arm holds every row's tensors
in a list (what the trainer read before the cache was sharded); the lazy arm reads each row from the
memory-mapped shards. Printed: median step time of each, their ratio, and the data-fetch share of a lazy step.
Goal: lazy / in-memory <= 1.05.
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mmalign.core.registry import load_recipe, method_class
from mmalign.core.row_rng import SeededCollate, SeededRows
from mmalign.datasets.pairs import write_pairs_jsonl
from mmalign.datasets.shapeworld import render_scene, sample_scenes

ROOT = Path(__file__).resolve().parents[1]


def write_pairs(out: Path, n: int) -> None:
    """Pairs of distinct ShapeWorld renders (the content does not matter for timing)."""
    scenes = sample_scenes(0, 2 * n)
    rows = [(scenes[2 * i].caption, render_scene(scenes[2 * i]), render_scene(scenes[2 * i + 1]), {})
            for i in range(n)]
    write_pairs_jsonl(out, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="lazy_step_"))
    write_pairs(work / "pairs", a.pairs)
    exp = load_recipe(str(ROOT / "configs/shapeworld_diffusion_dpo.yaml"),
                      [f"data.path={work / 'pairs'}", f"output_dir={work / 'run'}", f"data.cache_dir={work / 'cache'}"])
    method = method_class(exp.method)(exp.args, exp.output_dir)
    policy = method.build(torch.device("cpu"))
    lazy, _ = method.dataset()
    memory = [lazy[i] for i in range(len(lazy))]
    arms = {"in_memory": SeededRows(memory, 0), "lazy": SeededRows(lazy, 0)}
    collate = SeededCollate(method.collate)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
    times = {k: [] for k in arms}
    fetch = []
    rng = random.Random(0)
    for step in range(a.steps + 2):  # two warm-up steps per arm
        keys = [(0, rng.randrange(len(lazy))) for _ in range(a.batch)]
        for name, rows in arms.items():
            t0 = time.perf_counter()
            batch = collate([rows[k] for k in keys])
            t1 = time.perf_counter()
            loss, _ = method.loss(policy, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= 2:
                times[name].append(time.perf_counter() - t0)
                if name == "lazy":
                    fetch.append(t1 - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"pairs {len(lazy)}, batch {a.batch}, {a.steps} timed steps per arm (interleaved), torch threads "
          f"{torch.get_num_threads()}")
    for k, v in med.items():
        print(f"  {k:<10} median step {v * 1000:8.1f} ms")
    print(f"  lazy / in-memory step time: {med['lazy'] / med['in_memory']:.3f} (goal <= 1.05); lazy row fetch + "
          f"collate: median {statistics.median(fetch) * 1000:.1f} ms per batch")


if __name__ == "__main__":
    main()
