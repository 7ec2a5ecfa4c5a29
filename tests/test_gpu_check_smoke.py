"""benchmarks/gpu_check.py --cpu-smoke on one case: the script runs end to end and its JSON line carries the
fields a GPU session will read, with finite numbers."""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke_one_case(tmp_path):
    out = tmp_path / "gpu_check.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--cpu-smoke", "--only",
                        "nonsense_case,sd15_lora_dpo", "--budget-s", "400", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    line = json.loads(p.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == line
    assert line["mode"] == "cpu-smoke" and line["peak_bf16_flops"] == "unknown peak"
    assert {"ratios", "goals", "elapsed_s", "budget_s", "device"} <= set(line)
    bad, ok = line["cases"]
    assert ok["case"] == "sd15_lora_dpo" and ok["status"] == "ok", ok
    for k in ("pairs_per_s", "step_s", "peak_mem_gib", "flops_per_step", "tflops", "loss"):
        assert isinstance(ok[k], (int, float)) and math.isfinite(ok[k]) and ok[k] > 0, (k, ok[k])
    assert 0 < ok["trainable_params"] < ok["params"]  # LoRA: only the adapters train
    assert bad["status"] == "error" and "unknown case" in bad["error"]  # guarded: the check went on
    assert "sd15_lora_dpo" in p.stdout and "MFU" in p.stdout  # the table
