#!/usr/bin/env python3
"""One device call for the ShapeWorld motion adapter (issue 6): train several candidates side by side on one GPU
(one process each, `scripts/train_shapeworld_motion.py` with a time budget), evaluate each on the same held-out
clips (direction accuracy and consistencies, exact motion scorer), and pack each candidate's adapter directory
into $OUT/<name>.tar.gz with a summary table.

    python benchmarks/device_motion.py --minutes 3.5 --out "$OUT"

The evaluation draws each clip's initial noise on the CPU from its seed, so the CPU re-evaluates the same clips.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--clips", "12000", "--steps", "100000", "--batch", "64", "--warmup", "200", "--heads", "4",
          "--seed", "0", "--eval-n", "128", "--eval-steps", "10", "--eval-guidance", "4.0", "--threads", "3"]
CANDIDATES = {  # name -> extra arguments
    "temporal_lr1e-3": ["--lr", "1e-3"],
    "lora8_lr1e-3": ["--lr", "1e-3", "--lora-rank", "8"],
    "temporal2_lr3e-4": ["--lr", "3e-4", "--layers", "2"],
    "lora8_2_lr3e-4": ["--lr", "3e-4", "--layers", "2", "--lora-rank", "8"],
}


def device_line() -> str:
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__}, no CUDA device"
    p = torch.cuda.get_device_properties(0)
    return f"torch {torch.__version__}, {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.5, help="training time budget per candidate")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/device_motion"))
    ap.add_argument("--only", nargs="*", default=list(CANDIDATES))
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="appended to every candidate's args")
    a = ap.parse_args()
    out, work = Path(a.out), Path("/tmp/device_motion")
    out.mkdir(parents=True, exist_ok=True)
    print(device_line(), flush=True)
    t0, procs = time.time(), {}
    for name in a.only:
        cmd = [sys.executable, str(ROOT / "scripts/train_shapeworld_motion.py"), "--out", str(work / name),
               "--work", str(work / f"{name}_run"), "--max-minutes", str(a.minutes), *COMMON, *CANDIDATES[name],
               *a.extra]
        (work / name).mkdir(parents=True, exist_ok=True)
        with open(work / name / "stdout.log", "w") as log:  # the child keeps its own handle
            procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                           env={**os.environ, "OMP_NUM_THREADS": "3", "PYTHONUNBUFFERED": "1"})
    rows = []
    for name, proc in procs.items():
        rc = proc.wait()
        with tarfile.open(out / f"{name}.tar.gz", "w:gz") as tar:
            tar.add(work / name, arcname=name)
        res_path = work / name / "eval.json"
        if rc or not res_path.exists():
            tail = (work / name / "stdout.log").read_text()[-1500:]
            print(f"--- {name} failed (rc {rc}):\n{tail}", flush=True)
            rows.append({"name": name, "rc": rc})
            continue
        res = json.loads(res_path.read_text())
        rows.append({"name": name, "rc": rc, **res})
    (out / "summary.json").write_text(json.dumps({"device": device_line(), "rows": rows,
                                                   "wall_s": round(time.time() - t0, 1)}, indent=1))
    print(f"\n{device_line()}; wall {time.time() - t0:.0f} s")
    print(f"{'candidate':<18} {'steps':>6} {'train s':>7} {'loss':>7} {'direction':>22} {'colour':>6} {'shape':>6}")
    for r in rows:
        if r["rc"]:
            print(f"{r['name']:<18} failed (rc {r['rc']})")
            continue
        tr, ev = r["train"], r["eval"]
        d = ev["direction_ok"]
        print(f"{r['name']:<18} {tr['steps']:>6} {tr['seconds']:>7.0f} {tr['final_metrics'].get('loss', 0):>7.4f} "
              f"{d['mean']:>6.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}] "
              f"{ev['colour_consistent']['mean']:>6.3f} {ev['shape_consistent']['mean']:>6.3f}")


if __name__ == "__main__":
    main()
