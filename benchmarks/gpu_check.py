#!/usr/bin/env python3
"""One-call GPU check: a training step of every diffusion pair method and the MLLM DPO family at real shapes
(random weights, bf16), side by side with the peer Diffusion-DPO step and TRL's DPOTrainer, the speed options at
the SDXL-LoRA shape (torch.compile, channels_last, gradient checkpointing + largest batch, Adafactor, 8-bit
AdamW) with MFU, and a 2-GPU FSDP2 step -- under a hard deadline, most important cases first.

    python benchmarks/gpu_check.py --out $OUT/gpu_check.json          # on the lent GPU (<= 7.5 min)
    python benchmarks/gpu_check.py --cpu-smoke                        # same code, tiny shapes, CPU, fp32
    python benchmarks/gpu_check.py --cpu-smoke --only sd15_lora_dpo   # one case

Shapes: sd15 = SD1.5's UNet at 512 px (latents 64x64), sdxl = SDXL-base's at 1024 px (128x128), llava = LLaVA-1.5-7B
(Llama-7B text, CLIP ViT-L/14-336 tower). Case names: {sd15,sdxl}_{lora,full}_{dpo,sftw,inpo,invdpo,cca,bco}
[+channels_last][+gc][+compile][+adafactor][+adamw8bit][+maxbatch], llava_lora_{dpo,ipo,hinge,robust,rpo,mmdpo,mdpo},
peer_{sd15,sdxl}, trl_llava, fsdp2_sd15_full_dpo. Prints a table, then one JSON line (also written to --out).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _gpu_cases as C  # noqa: E402

OPTIONS = ("channels_last", "gc", "compile", "adafactor", "adamw8bit", "maxbatch")
BASE = "sdxl_lora_dpo"
ORDER = ([BASE, "peer_sdxl", "sd15_lora_dpo", "peer_sd15", "llava_lora_dpo", "trl_llava"]
         + [f"{BASE}+{o}" for o in ("channels_last", "gc", "adafactor", "adamw8bit", "maxbatch", "gc+maxbatch",
                                     "compile")]
         + ["sd15_full_dpo"]
         + [f"{s}_{m}" for s in ("sdxl_lora", "sd15_lora", "sd15_full") for m in C.METHODS if m != "dpo"]
         + [f"llava_lora_{v}" for v in C.MLLM_VARIANTS if v != "dpo"]
         + ["fsdp2_sd15_full_dpo"])
# per mode: shapes (size, resolution, shrink), batch sizes, steps, method knobs, batch search bounds
GPU_RUN = {"sd15": ("sd15", 512, 1), "sdxl": ("sdxl", 1024, 1), "llava": "7b", "pairs": {"sd15": 8, "sdxl": 4},
           "llava_batch": 8, "warmup": 2, "steps": 5, "knobs": {"inversion_steps": 10, "inversion_grid_steps": 10},
           "maxbatch_s": 60, "maxbatch_cap": 256}
SMOKE_RUN = {"sd15": ("sd15", 64, 16), "sdxl": ("sdxl", 64, 16), "llava": "tiny", "pairs": {"sd15": 2, "sdxl": 2},
             "llava_batch": 2, "warmup": 1, "steps": 1, "knobs": {"inversion_steps": 2, "inversion_grid_steps": 2},
             "maxbatch_s": 10, "maxbatch_cap": 4}


def args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-s", type=float, default=450.0, help="global deadline (default 7.5 min)")
    ap.add_argument("--out", help="also write the JSON line here")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, CPU, fp32, 1 step each")
    ap.add_argument("--only", help="comma-separated case names (default: all, in order of importance)")
    ap.add_argument("--smoke-compile", action="store_true", help="run the compile case in --cpu-smoke too")
    ap.add_argument("--flops-hint", type=float, default=0.0, help=argparse.SUPPRESS)  # child: eager FLOPs per pair
    ap.add_argument("--fsdp-worker", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


class Check:
    def __init__(self, a):
        self.a, self.t0 = a, time.time()
        self.deadline = self.t0 + a.budget_s
        self.run = SMOKE_RUN if a.cpu_smoke else GPU_RUN
        self.dev = torch.device("cpu" if a.cpu_smoke else "cuda")
        self.card, self.peak = C.peak_flops(self.dev)
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.envs, self.results, self.flops_per_pair = {}, [], {}
        if a.flops_hint:
            self.flops_per_pair[BASE] = a.flops_hint

    def left(self) -> float:
        return self.deadline - time.time()

    def env(self, key: str):
        if key not in self.envs:
            if key == "llava":
                r = self.run
                self.envs[key] = C.LlavaEnv(r["llava"], self.dev, self.work,
                                            r["llava_batch"] * (r["warmup"] + r["steps"] + 2))
            else:
                self.envs[key] = C.DiffusionEnv(*self.run[key], self.dev, self.work)
        return self.envs[key]

    # ---- one case ----

    def case(self, name: str) -> dict:
        r, timer = self.run, C.Timer(self.dev, self.deadline - 5)
        if name.startswith("peer_"):
            size = name[5:]
            return C.peer_case(self.env(size), r["pairs"][size], r, max(self.left() - 5, 1))
        if name == "trl_llava":
            import trl  # noqa: F401  ImportError -> "missing"
            return C.trl_case(self.env("llava"), r["llava_batch"], r)
        if name.startswith("llava_lora_"):
            return C.mllm_case(self.env("llava"), name[len("llava_lora_"):], r["llava_batch"], r, timer)
        if name.startswith("fsdp2_"):
            return self.fsdp()
        head, *opts = name.split("+")
        size, mode, method = (head.split("_") + ["", "", ""])[:3]
        if (head.count("_") != 2 or size not in ("sd15", "sdxl") or method not in C.METHODS
                or mode not in ("lora", "full") or not set(opts) <= set(OPTIONS)):
            raise ValueError(f"unknown case {name!r}")
        if "compile" in opts and not self.a.flops_hint:
            if self.dev.type == "cpu" and not self.a.smoke_compile:
                return {"status": "skipped", "note": "compile skipped in --cpu-smoke (--smoke-compile runs it)"}
            return self.child(name)
        if "adamw8bit" in opts:
            import bitsandbytes  # noqa: F401
        pairs = r["pairs"][size]
        hint = self.flops_per_pair.get(head)
        out = C.diffusion_case(self.env(size), method, mode == "lora", pairs, set(opts), r, timer,
                               hint * pairs if hint else None)
        if not opts and out["flops_per_step"]:
            self.flops_per_pair[head] = out["flops_per_step"] / pairs
        return out

    def child(self, name: str) -> dict:
        """A case that cannot be interrupted in-process (compilation) runs in a child under a hard timeout."""
        left = self.left() - 10
        if left < 30:
            return {"status": "skipped", "note": "not enough budget left for compilation"}
        cmd = [sys.executable, __file__, "--only", name, "--budget-s", str(left - 5),
               "--flops-hint", str(self.flops_per_pair.get(BASE, 0.0) or 0.0),
               *(["--cpu-smoke"] if self.a.cpu_smoke else [])]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "note": f"compile + steps took over {left:.0f} s"}
        if p.returncode:
            raise RuntimeError(f"child failed ({p.returncode}): {p.stderr[-1500:]}")
        res = json.loads(p.stdout.strip().splitlines()[-1])["cases"][0]
        return {k: v for k, v in res.items() if k not in ("case", "wall_s", "mfu", "tflops")}

    def fsdp(self) -> dict:
        n = torch.cuda.device_count() if self.dev.type == "cuda" else 0
        if n < 2:
            return {"status": "skipped", "note": f"{n} GPU(s) visible; FSDP2 needs 2"}
        left = self.left() - 5
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "--fsdp-worker"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(left, 1),
                           env={**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0,1")})
        if p.returncode:
            raise RuntimeError(f"torch.distributed.run failed ({p.returncode}): {p.stderr[-1500:]}")
        return json.loads(p.stdout.strip().splitlines()[-1])

    def guarded(self, name: str) -> dict:
        t = time.time()
        if self.left() < (3 if self.a.cpu_smoke else 15):
            res = {"status": "skipped", "note": "global deadline"}
        else:
            try:
                res = {"status": "ok", **self.case(name)}
            except torch.OutOfMemoryError as e:
                res = {"status": "oom", "error": str(e).splitlines()[0][:200]}
            except ImportError as e:
                res = {"status": "missing", "error": str(e)[:200]}
            except subprocess.TimeoutExpired:
                res = {"status": "timeout", "error": "child process ran past the deadline"}
            except Exception as e:  # noqa: BLE001  every case is guarded; the check goes on
                traceback.print_exc(file=sys.stderr)
                res = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:300]}"}
            C.free()
        res = {"case": name, "wall_s": round(time.time() - t, 1), **res}
        f, s = res.get("flops_per_step"), res.get("step_s")
        if f and s:
            res["tflops"] = f / s / 1e12
            res["mfu"] = f / s / self.peak if self.peak else None
        print(f"[{time.time() - self.t0:6.1f}s] {name}: {res['status']} {res.get('error', '')}", file=sys.stderr,
              flush=True)
        return res

    # ---- summary ----

    def summary(self) -> dict:
        by = {r["case"]: r for r in self.results if r["status"] == "ok"}

        def ratio(ours, theirs, key):
            a, b = by.get(ours, {}).get(key), by.get(theirs, {}).get(key)
            return a / b if a and b else None

        ratios = {f"{o}/{p}": {"throughput": ratio(o, p, k), "peak_mem": ratio(o, p, "peak_mem_gib")}
                  for o, p, k in ((BASE, "peer_sdxl", "pairs_per_s"), ("sd15_lora_dpo", "peer_sd15", "pairs_per_s"),
                                  ("llava_lora_dpo", "trl_llava", "tokens_per_s"))}
        mfus = [r["mfu"] for n, r in by.items() if n.startswith(BASE) and r.get("mfu")]
        x = ratios[f"{BASE}/peer_sdxl"]
        goals = {"sdxl_throughput_ge_2x_peer": None if x["throughput"] is None else x["throughput"] >= 2,
                 "sdxl_mem_le_peer": None if x["peak_mem"] is None else x["peak_mem"] <= 1,
                 "sdxl_best_mfu": max(mfus) if mfus else None,
                 "sdxl_mfu_ge_45pct": (max(mfus) >= 0.45) if mfus else None}
        return {"mode": "cpu-smoke" if self.a.cpu_smoke else "gpu", "device": self.card,
                "peak_bf16_flops": self.peak or "unknown peak", "torch": torch.__version__,
                "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
                "budget_s": self.a.budget_s, "elapsed_s": round(time.time() - self.t0, 1),
                "ratios": ratios, "goals": goals, "cases": self.results}


def table(s: dict) -> str:
    def f(v, fmt):
        return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)

    rows = [f"device: {s['device']}  peak: {s['peak_bf16_flops']}  mode: {s['mode']}  elapsed {s['elapsed_s']} s",
            f"{'case':<34}{'status':<8}{'pairs/s':>9}{'tok/s':>9}{'step s':>8}{'peak GiB':>9}{'TFLOP/s':>9}"
            f"{'MFU':>6}  note"]
    for r in s["cases"]:
        note = r.get("error") or r.get("note") or ""
        if r.get("max_batch"):
            note = f"max batch {r['max_batch']['pairs']} pairs ({r['max_batch'].get('stopped')}) {note}"
        rows.append(f"{r['case']:<34}{r['status']:<8}{f(r.get('pairs_per_s'), '.3f'):>9}"
                    f"{f(r.get('tokens_per_s'), '.0f'):>9}{f(r.get('step_s'), '.3f'):>8}"
                    f"{f(r.get('peak_mem_gib'), '.2f'):>9}{f(r.get('tflops'), '.2f'):>9}"
                    f"{f(r.get('mfu'), '.1%'):>6}  {note[:70]}")
    for k, v in s["ratios"].items():
        rows.append(f"ours/theirs {k}: throughput {f(v['throughput'], '.2f')}x, peak memory {f(v['peak_mem'], '.2f')}x")
    rows.append(f"goals: {json.dumps(s['goals'])}")
    return "\n".join(rows)


def main(argv=None):
    a = args(argv)
    if a.fsdp_worker:
        r = GPU_RUN if torch.cuda.is_available() else SMOKE_RUN
        out = C.fsdp_worker(r, *r["sd15"], r["pairs"]["sd15"], r["steps"])
        if out is not None:
            print(json.dumps(out))
        return
    if not a.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --cpu-smoke")
    chk = Check(a)
    names = a.only.split(",") if a.only else ORDER
    if a.cpu_smoke:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    for n in names:
        chk.results.append(chk.guarded(n))
    s = chk.summary()
    print(table(s))
    line = json.dumps(s, default=str)
    if a.out:
        Path(a.out).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
