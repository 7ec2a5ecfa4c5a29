"""Held-out ShapeWorld accuracy of any pipeline or training export against the shipped base, paired on the same
prompts and seeds (what the demo reports, for runs trained outside it: GRPO, sweeps, checkpoints).

    .venv/bin/python benchmarks/eval_shapeworld.py --model runs/grpo/r1/final --split test --n 512 --out runs/eval

The base's samples for (split, n, steps, guidance) are scored once and kept in <out>/base_<key>.json. Prints the
"all correct" accuracy of both, the paired gain and the win rate with 95 % bootstrap CIs, and appends the result
to <out>/results.jsonl.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmalign.datasets.shapeworld import sample_scenes
from mmalign.demo.diffusion import (BASE_PIPELINE, HELDOUT_SEED, DemoSettings, evaluate, heldout_prompts,
                                    load_sd_pipeline)


def main() -> None:
    from mmalign.diffusion.onpolicy import reward_from_scores
    from mmalign.evals.compare import compare_scores

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="pipeline directory or export (full or LoRA)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--split", choices=("validation", "test", "train"), default="test",
                    help="train: captions of the training split (drawn with the held-out seed), the in-distribution "
                         "check of a method that gains there but not on held-out compositions")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--base", default=str(BASE_PIPELINE), help="the pipeline compared against (default: the shipped "
                    "SD base)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    s = DemoSettings(n=a.n, split=a.split, steps=a.steps, guidance=a.guidance)
    prompts = (heldout_prompts(a.n, a.split) if a.split != "train"
               else [sc.caption for sc in sample_scenes(HELDOUT_SEED, a.n, split="train")])
    seeds = list(range(a.n))
    key = f"{a.split}_{a.n}_{a.steps}_{a.guidance:g}"
    if a.base != str(BASE_PIPELINE):  # another base: its own cached samples
        key = f"{Path(a.base).name}_{key}"
    base_file = out / f"base_{key}.json"
    if not base_file.is_file():
        _, scored = evaluate(load_sd_pipeline(a.base), prompts, seeds, out / f"base_{key}", s)
        base_file.write_text(json.dumps({"summary": scored["summary"], "per_sample": scored["per_sample"]}))
    base = json.loads(base_file.read_text())
    name = str(a.model).replace("/", "_")
    _, scored = evaluate(load_sd_pipeline(a.model), prompts, seeds, out / name, s)
    cmp = compare_scores(scored["per_sample"], base["per_sample"], reward_from_scores, prompts)
    g, w = cmp["gain"]["correct"], cmp["win_rate"]
    row = {"model": str(a.model), "split": a.split, "n": a.n, "base_correct": base["summary"]["correct"]["mean"],
           "correct": scored["summary"]["correct"]["mean"], "gain": cmp["gain"], "win_rate": w}
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{a.model} on {a.n} {a.split} prompts: base {100 * row['base_correct']:.1f} % -> "
          f"{100 * row['correct']:.1f} % all correct, gain {100 * g['gain']:+.1f} [{100 * g['ci95'][0]:+.1f}, "
          f"{100 * g['ci95'][1]:+.1f}], win rate {100 * w['win_rate']:.1f} % [{100 * w['ci95'][0]:.1f}, "
          f"{100 * w['ci95'][1]:.1f}]")


if __name__ == "__main__":
    main()
