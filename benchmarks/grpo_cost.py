"""Cost of one GRPO iteration on the shipped ShapeWorld base, split into rollout / reward / update, as the group
size and the number of trained denoising steps grow (side by side in one run, same machine).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/grpo_cost.py --out runs/grpo_cost

Each configuration trains `configs/shapeworld_diffusion_grpo.yaml` for 3 iterations (4 prompts, DDIM 10 steps)
through `mmalign train`; the table shows the mean of iterations 2-3 of time/rollout_s, time/reward_s and
time/update_s (iteration 1 includes warm-up).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CONFIGS = [(4, 4), (8, 4), (16, 4), (8, 2), (8, 10)]  # (group_size, train_steps_window; 10 = every step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--iterations", type=int, default=3)
    a = ap.parse_args()
    rows = []
    for group, window in CONFIGS:
        run = Path(a.out) / f"g{group}_w{window}"
        subprocess.run([sys.executable, "-m", "mmalign.cli", "train", "configs/shapeworld_diffusion_grpo.yaml",
                        f"output_dir={run}", f"train.max_steps={a.iterations}", "train.save_every=0",
                        f"objective.group_size={group}", f"objective.train_steps_window={window}"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][1:]
        mean = {k: sum(r[k] for r in logged) / len(logged) for k in ("time/rollout_s", "time/reward_s",
                                                                      "time/update_s")}
        rows.append((group, window, mean))
        print(json.dumps({"group": group, "window": window, **mean}), flush=True)
    print("| group size | trained steps | images | rollout s | reward s | update s | total s |")
    print("|---|---|---|---|---|---|---|")
    for group, window, m in rows:
        print(f"| {group} | {window} of 10 | {4 * group} | {m['time/rollout_s']:.1f} | {m['time/reward_s']:.1f} | "
              f"{m['time/update_s']:.1f} | {sum(m.values()):.1f} |")


if __name__ == "__main__":
    main()
