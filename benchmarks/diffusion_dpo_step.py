#!/usr/bin/env python3
"""Our Diffusion-DPO training step on the peer's workload (../shared/bench/peer_diffusion_dpo_step.py): LoRA rank 8
alpha 8 (gaussian) on to_q/to_k/to_v/to_out.0 in fp32 over a frozen base in the weight dtype, the adapters-off
reference, one t and noise per pair, beta 5000, AdamW lr 1e-5, random pixels captioned "a photo number i" --
but through `mmalign.diffusion.objectives.DiffusionDPO`: the pairs are written as a Pick-a-Pic folder (PNG),
`dataset()` encodes them once into the persistent cache (reported as encode_s, not timed), and the timed step
is loss -> backward -> AdamW step -> zero_grad under torch.autocast, as the peer's.

    python benchmarks/diffusion_dpo_step.py --pipeline DIR --pairs 8 --resolution 32 --dtype fp32
    python benchmarks/diffusion_dpo_step.py --side-by-side --rounds 2 --pipeline DIR ...   # ours vs the peer

One JSON line with the peer's keys (impl "mmalign") plus encode_s and cache_load_s. --side-by-side runs ours
and the peer in separate processes (ru_maxrss is per process), alternating, and prints the medians and ratios.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT.parent / "shared/bench/peer_diffusion_dpo_step.py"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pipeline", required=True)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--beta", type=float, default=5000.0)
    ap.add_argument("--sdxl", action="store_true", help="accepted for parity; our method detects SDXL itself")
    ap.add_argument("--side-by-side", action="store_true", help="run ours and the peer, each in its own process")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--peer", default=str(PEER))
    return ap.parse_args(argv)


def write_pairs(out: Path, pairs: int, res: int) -> Path:
    """The peer's images (torch.rand in [-1, 1], seed 0; winners first) as PNGs + metadata.jsonl."""
    from PIL import Image

    from mmalign.datasets.pairs import write_pairs_jsonl

    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2 * pairs, 3, res, res, generator=g) * 2 - 1
    arr = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    img = [Image.fromarray(x) for x in arr]
    write_pairs_jsonl(out, [(f"a photo number {i}", img[i], img[pairs + i], {}) for i in range(pairs)])
    return out


def run_ours(a) -> dict:
    from mmalign.core.config import from_dict
    from mmalign.diffusion.objectives import DiffusionDPO
    from mmalign.diffusion.preference import PreferenceConfig

    dev, wdt = torch.device(a.device), DTYPES[a.dtype]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = from_dict(PreferenceConfig, {
            "model": {"pretrained": a.pipeline, "lora_rank": 8, "lora_alpha": 8, "reference": "adapters_off",
                      "dtype": a.dtype},
            "data": {"path": str(write_pairs(tmp / "pairs", a.pairs, a.resolution)), "resolution": a.resolution,
                     "cache_dir": str(tmp / "cache")},
            "objective": {"beta": a.beta}}, "bench")
        method = DiffusionDPO(cfg, str(tmp / "out"))
        policy = method.build(dev).to(dev)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        method.dataset()  # PNG decode + VAE encoder + text encoder, once, into the cache
        sync()
        encode_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        data, _ = method.dataset()  # a second run on the same data: a cache hit
        cache_load_s = time.perf_counter() - t0
        batch = method.collate([data[i] for i in range(len(data))])
        rss_before_steps = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        params = [q for q in policy.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)
        autocast = torch.autocast(dev.type, dtype=wdt, enabled=wdt != torch.float32)

        def step():
            b = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}  # as the trainer's send_to_device
            with autocast:
                loss, _ = method.loss(policy, b)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        for _ in range(a.warmup):
            loss = step()
        sync()
        encode_peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else rss_before_steps
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            loss = step()
        sync()
        dt = (time.perf_counter() - t0) / a.steps
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"impl": "mmalign", "pairs": a.pairs, "resolution": a.resolution, "device": str(dev), "dtype": a.dtype,
            "step_s": dt, "pairs_per_s": a.pairs / dt, "peak_mem_bytes": peak, "encode_s": encode_s,
            "cache_load_s": cache_load_s, "peak_mem_before_steps": encode_peak, "trainable_params": sum(q.numel() for q in params),
            "adapter_dtype": str(params[0].dtype), "loss": float(loss.detach()), "threads": torch.get_num_threads()}


def side_by_side(a, argv: list[str]) -> dict:
    """Alternate ours / peer, each a fresh process with the same arguments; medians and ratios ours/peer."""
    if not Path(a.peer).is_file():
        raise SystemExit(f"peer script not found: {a.peer} (pass --peer PATH)")
    base, skip = [], False
    for x in argv:  # strip --side-by-side, --rounds N, --peer P
        if skip:
            skip = False
            continue
        if x in ("--rounds", "--peer"):
            skip = True
            continue
        if x == "--side-by-side" or x.startswith(("--rounds=", "--peer=")):
            continue
        base.append(x)
    runs = {"ours": [], "peer": []}
    for _ in range(a.rounds):
        for name, script in (("ours", __file__), ("peer", a.peer)):
            r = subprocess.run([sys.executable, script, *base], capture_output=True, text=True, cwd=ROOT)
            if r.returncode:
                raise SystemExit(f"{name} failed ({r.returncode}):\n{r.stderr[-3000:]}")
            runs[name].append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[name][-1]), file=sys.stderr)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("pairs_per_s", "step_s", "peak_mem_bytes")}
           for n, rs in runs.items()}
    return {"pipeline": a.pipeline, "pairs": a.pairs, "resolution": a.resolution, "device": a.device,
            "dtype": a.dtype, "steps": a.steps, "rounds": a.rounds,
            "ours_pairs_per_s": med["ours"]["pairs_per_s"], "peer_pairs_per_s": med["peer"]["pairs_per_s"],
            "throughput_ratio": med["ours"]["pairs_per_s"] / med["peer"]["pairs_per_s"],
            "ours_peak_mem_bytes": med["ours"]["peak_mem_bytes"], "peer_peak_mem_bytes": med["peer"]["peak_mem_bytes"],
            "peak_mem_ratio": med["ours"]["peak_mem_bytes"] / med["peer"]["peak_mem_bytes"],
            "ours_encode_s": statistics.median(r["encode_s"] for r in runs["ours"]),
            "ours_all_pairs_per_s": [r["pairs_per_s"] for r in runs["ours"]],
            "peer_all_pairs_per_s": [r["pairs_per_s"] for r in runs["peer"]]}


def main():
    a = args()
    print(json.dumps(side_by_side(a, sys.argv[1:]) if a.side_by_side else run_ours(a)))


if __name__ == "__main__":
    main()
