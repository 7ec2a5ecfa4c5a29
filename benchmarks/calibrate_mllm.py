"""Calibration of the ShapeWorld vision-language DPO family on the VALIDATION half of the held-out questions
(the test half is kept for the reported numbers, `mmalign demo --parts mllm --split test`).

    .venv/bin/python benchmarks/calibrate_mllm.py --out runs/calib/mllm \
        --variant 'dpo={}' --variant 'dpo_lr1e-4={"overrides": ["train.lr=1e-4"]}' \
        --variant 'mmdpo={"recipe": "shapeworld_mllm_mmdpo"}' --variant 'mdpo={"recipe": "shapeworld_mllm_mdpo"}'

Each variant is a JSON object of demo.mllm.MLLMDemoSettings fields (recipe, overrides, train_steps, ...); every
variant answers the same validation questions before and after and trains on the same on-policy pairs (same
seeds). Results go to <out>/calibration.json (a variant already there is not rerun) and a table on stdout;
`--split test` runs the chosen variants for the reported table.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from mmalign.demo.mllm import MLLMDemoSettings, run_mllm_demo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--split", default="validation", choices=("validation", "test"))
    ap.add_argument("--variant", action="append", required=True, metavar="NAME=JSON")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    book = out / "calibration.json"
    done = json.loads(book.read_text()) if book.exists() else {}
    for spec in a.variant:
        name, _, body = spec.partition("=")
        if name in done:
            continue
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(body).items()}
        s = replace(MLLMDemoSettings(split=a.split), **fields)
        r = run_mllm_demo(out / name, settings=s)
        c = r["comparison"]
        done[name] = {"recipe": s.recipe, "overrides": list(s.overrides), "split": a.split,
                      "pairs": r["pairs"]["n_pairs"], "train_seconds": r["train_seconds"],
                      "overall": c["overall"], "table": {k: v["gain"] for k, v in c["table"].items()},
                      "ci_unit": c.get("ci_unit", ""), "balance": s.balance}
        book.write_text(json.dumps(done, indent=1))
        print(table({name: done[name]}), flush=True)
    print(table(done))


def table(done: dict) -> str:
    rows = ["| variant | recipe | overrides | pairs | before | after | overall gain (95% CI) | train s |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in done.items():
        o = r["overall"]
        rows.append(f"| {name} | {r['recipe']} | {' '.join(r['overrides'])} | {r['pairs']} | {o['before']:.1f} | "
                    f"{o['after']:.1f} | {o['gain']:+.1f} [{o['ci95'][0]:+.1f}, {o['ci95'][1]:+.1f}] | "
                    f"{r['train_seconds']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
