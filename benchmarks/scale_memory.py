"""Peak memory per phase (read, encode, train) as the data grows: Pick-a-Pic-format parquet pairs (256 px JPEGs) on
the shipped ShapeWorld pipeline and RLAIF-V-format jsonl on the shipped ShapeWorld LLaVA, at 1 k, 8 k and 64 k rows.

    .venv/bin/python benchmarks/scale_memory.py --sizes 1000 8000 64000 --work /tmp/scale

Each size runs `mmalign train` for a few steps with a cold cache in a subprocess; a sampler thread reads the RSS of
the process and its children (DataLoader workers) every 50 ms. Phases are cut at the trainer's own lines: up to
"tensor cache miss" = read (imports, models, row counting, cache-key stats), then encode, then after "data:" train.
The goal: peak RSS at 64 k rows <= 1.15 x the peak at 1 k, for every phase.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("read", "encode", "train")


def jpeg_pool(n: int, size: int, seed: int = 0) -> list[bytes]:
    """`n` distinct noisy JPEGs (photo-like entropy, ~25 KB each at 256 px)."""
    import numpy as np
    from PIL import Image
    rng, out = np.random.default_rng(seed), []
    for _ in range(n):
        base = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        im = Image.fromarray(base).resize((size, size), Image.BILINEAR)
        noisy = np.clip(np.asarray(im, dtype=np.int16) + rng.integers(-20, 20, (size, size, 3)), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(noisy.astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_pick_a_pic(path: Path, n: int, pool: list[bytes]) -> None:
    """Pick-a-Pic v2 columns (caption, jpg_0, jpg_1 as bytes, label_0), streamed in row groups of 1000."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = random.Random(n)
    words = ["red", "blue", "green", "circle", "square", "triangle", "left of", "above", "a", "two"]
    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64())])
    with pq.ParquetWriter(path, schema, use_dictionary=False, compression="none") as w:
        for lo in range(0, n, 1000):
            k = min(1000, n - lo)
            w.write_table(pa.table({
                "caption": [" ".join(rng.choices(words, k=6)) + f" {lo + i}" for i in range(k)],
                "jpg_0": [pool[rng.randrange(len(pool))] for _ in range(k)],
                "jpg_1": [pool[rng.randrange(len(pool))] for _ in range(k)],
                "label_0": [float(rng.choice((0, 1))) for _ in range(k)]}, schema=schema))


def write_rlaif_v(folder: Path, n: int, pool: list[bytes]) -> None:
    """RLAIF-V columns (image path, question, chosen, rejected) with `len(pool)` distinct image files."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(pool):
        (folder / "images" / f"{i}.jpg").write_bytes(data)
    rng = random.Random(n)
    with open(folder / "pairs.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"image": f"images/{rng.randrange(len(pool))}.jpg",
                                "question": f"How many shapes are there? ({i})",
                                "chosen": "There are two shapes: a red circle and a blue square.",
                                "rejected": "There are three shapes."}) + "\n")


class TreeRSS(threading.Thread):
    """Peak RSS (bytes) of a process plus its live children, per phase, sampled every `every` seconds."""

    def __init__(self, pid: int, every: float = 0.05):
        super().__init__(daemon=True)
        self.proc, self.every, self.phase, self.peak, self.stop = psutil.Process(pid), every, "read", {}, False

    def run(self):
        while not self.stop:
            try:
                total = self.proc.memory_info().rss
                for c in self.proc.children(recursive=True):
                    try:
                        total += c.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            self.peak[self.phase] = max(self.peak.get(self.phase, 0), total)
            time.sleep(self.every)


def run_train(args: list[str], log: Path) -> tuple[dict, float]:
    cmd = [str(ROOT / ".venv/bin/mmalign"), "train", *args]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"})
    sampler = TreeRSS(proc.pid)
    sampler.start()
    with open(log, "w") as f:
        for line in proc.stdout:
            f.write(line)
            if "tensor cache miss" in line and sampler.phase == "read":
                sampler.phase = "encode"
            elif line.startswith("data:"):
                sampler.phase = "train"
    rc = proc.wait()
    sampler.stop = True
    sampler.join()
    if rc:
        raise SystemExit(f"mmalign train failed (rc {rc}); see {log}")
    return {p: round(sampler.peak.get(p, 0) / 2**20) for p in PHASES}, time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 8000, 64000])
    ap.add_argument("--work", default="/tmp/mmalign_scale")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--families", nargs="+", default=["diffusion", "mllm"])
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides for every run, e.g. data.encode_workers=2")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    pool = jpeg_pool(256, 256)
    results = []
    for n in a.sizes:
        for family in a.families:
            run_dir = work / f"{family}_{n}"
            if family == "diffusion":
                data = work / f"pick_a_pic_{n}.parquet"
                if not data.exists():
                    write_pick_a_pic(data, n, pool)
                args = ["configs/shapeworld_diffusion_dpo.yaml", f"data.path={data}", "data.resolution=32"]
            else:
                data = work / f"rlaif_v_{n}"
                if not (data / "pairs.jsonl").exists():
                    write_rlaif_v(data, n, pool)
                args = ["configs/shapeworld_mllm_dpo.yaml", f"data.path={data}", "model.reference=frozen_copy"]
            args += [*a.set, f"output_dir={run_dir}", f"train.max_steps={a.steps}", "train.batch_size=4",
                     "train.warmup_steps=0", "train.resume=never", f"data.cache_dir={work / 'cache' / family / str(n)}"]
            peak, secs = run_train(args, work / f"{family}_{n}.log")
            results.append({"family": family, "rows": n, "peak_rss_mib": peak, "seconds": round(secs, 1)})
            print(json.dumps(results[-1]), flush=True)
    print("\nfamily     rows    " + "  ".join(f"{p:>10}" for p in PHASES) + "   (peak RSS MiB, process + workers)")
    for r in results:
        print(f"{r['family']:<10} {r['rows']:>6}  " + "  ".join(f"{r['peak_rss_mib'][p]:>10}" for p in PHASES))
    for family in a.families:
        mine = [r for r in results if r["family"] == family]
        if len(mine) > 1:
            lo, hi = mine[0], mine[-1]
            ratios = {p: round(hi["peak_rss_mib"][p] / max(lo["peak_rss_mib"][p], 1), 3) for p in PHASES}
            print(f"{family}: peak at {hi['rows']} rows / at {lo['rows']} rows: {ratios} (goal <= 1.15 each)")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
