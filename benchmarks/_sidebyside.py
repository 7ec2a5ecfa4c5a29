"""Small helpers for side-by-side benchmarks: each implementation runs in its own process (so peak memory is
per process), prints one JSON line last on stdout, and the parent takes medians and ratios.

Peak memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the process's RSS high-water mark (VmHWM, as
`ru_maxrss`), which `PeakMemory.reset()` can lower to the current RSS (Linux /proc/self/clear_refs) so a
window (the timed steps) gets its own peak.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys


def strip_args(argv: list[str], with_value: tuple[str, ...] = (), flags: tuple[str, ...] = ()) -> list[str]:
    """argv without the options in `with_value` (and their values, "--x v" or "--x=v") and the bare `flags`."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
            continue
        if x in with_value:
            skip = True
            continue
        if x in flags or x.startswith(tuple(f"{o}=" for o in with_value)):
            continue
        out.append(x)
    return out


def run_json(cmd: list[str], env: dict | None = None, cwd=None) -> dict:
    """Run a child process; its last stdout line parsed as JSON (SystemExit with its stderr tail on failure)."""
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})})
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def medians(runs: list[dict], keys: tuple[str, ...]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in keys if all(k in r for r in runs)}


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of this process since start or the last reset(): CUDA allocated bytes or CPU RSS."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def peak(self) -> int:
        if self.cuda:
            import torch
            return torch.cuda.max_memory_allocated()
        hwm = _vm_hwm()
        return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def reset(self) -> bool:
        """Start a new window; False where the CPU high-water mark cannot be reset (then peak() spans the run)."""
        if self.cuda:
            import torch
            torch.cuda.reset_peak_memory_stats()
            return True
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            print("warning: cannot reset the RSS high-water mark; the step peak includes set-up", file=sys.stderr)
            return False
