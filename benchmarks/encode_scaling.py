"""Throughput of the sharded encode pass: one process against two ranks (each encodes its share of the shards, as
under `accelerate launch`), and one process with a decode worker pool, on Pick-a-Pic-format parquet pairs of
256 px JPEGs encoded by the shipped 32 px ShapeWorld pipeline.

    .venv/bin/python benchmarks/encode_scaling.py --pairs 2048

Each arm encodes into its own empty cache folder in a fresh process (torchrun for two ranks, gloo); a run's
time is from its first to its last rank's end of encoding, model loading excluded. Goal: 2 processes >= 1.6 x
one process on this 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def encode_once(data: str, cache: str, workers: int, out: str) -> None:
    """Run in a (possibly distributed) child: load the pipeline, time build_pair_tensors."""
    import torch

    from mmalign.diffusion.pair_tensors import build_pair_tensors
    from mmalign.diffusion.pipeline import load_sd_components

    if "WORLD_SIZE" in os.environ:
        torch.distributed.init_process_group("gloo")
    parts = load_sd_components(str(ROOT / "mmalign/assets/shapeworld_sd"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    t0 = time.time()
    rows, report = build_pair_tensors(parts, data, 32, True, "drop", "skip", torch.device("cpu"), cache,
                                      log=lambda _: None, shard_rows=128, encode_workers=workers)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    Path(out, f"rank{rank}.json").write_text(json.dumps({"start": t0, "end": time.time(), "rows": len(rows),
                                                         "kept": report.kept}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def arm(data: Path, work: Path, name: str, procs: int, workers: int, threads: int) -> dict:
    out, cache = work / name, work / f"cache_{name}"
    out.mkdir()
    args = [str(Path(__file__).resolve()), "--child", str(data), str(cache), str(workers), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    cmd = [sys.executable, *args] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1",
        "--master_port", str(_port()), *args]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True)
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    secs = max(r["end"] for r in ranks) - min(r["start"] for r in ranks)
    return {"arm": name, "processes": procs, "decode_workers": workers, "threads_per_process": threads,
            "pairs": ranks[0]["kept"], "seconds": round(secs, 2), "pairs_per_s": round(ranks[0]["kept"] / secs, 1)}


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        data, cache, workers, out = sys.argv[2:6]
        return encode_once(data, cache, int(workers), out)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from scale_memory import jpeg_pool, write_pick_a_pic

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=2048)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="encode_scaling_"))
    data = work / "pairs.parquet"
    write_pick_a_pic(data, a.pairs, jpeg_pool(256, 256))
    results = [arm(data, work, "1 process, 2 threads", 1, 0, 2),
               arm(data, work, "2 processes, 1 thread each", 2, 0, 1),
               arm(data, work, "1 process + 2 decode workers", 1, 2, 2)]
    base = results[0]["pairs_per_s"]
    for r in results:
        print(f"{r['arm']:<32} {r['pairs']:>6} pairs  {r['seconds']:>8.1f} s  {r['pairs_per_s']:>8.1f} pairs/s  "
              f"x{r['pairs_per_s'] / base:.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
