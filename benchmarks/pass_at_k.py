#!/usr/bin/env python3
"""How much of a ShapeWorld held-out split a model can draw at all: pass@k of "all of the caption correct".

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pass_at_k.py --split test --k 32 --out runs/pass_at_k

Draws k samples of every distinct caption of the split's first --n prompts (seeds 700000 + 1000·caption + j,
apart from the evaluation seeds), scores each with the exact scorer, and prints pass@m for m = 1, 2, 4, ... k with
the unbiased estimator (`core.stats.pass_at`: 1 − C(k − c, m) / C(k, m), c correct of k), averaged over captions
weighted by how often each occurs among the n prompts (the weighting of the reported "all correct", so pass@1
estimates it) and unweighted, plus the share of captions never drawn right in k samples. A method that only
sharpens the model's own distribution (preference training on its samples, online RL) approaches pass@k for large
k at best, so the curve bounds what such training can reach without learning something the base never draws.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from mmalign.core.stats import pass_at_curve
from mmalign.demo.diffusion import BASE_PIPELINE, heldout_prompts, load_sd_pipeline


def main() -> None:
    from mmalign.diffusion.sampling import sample_images, score_samples

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(BASE_PIPELINE))
    ap.add_argument("--split", default="test", choices=["validation", "test"])
    ap.add_argument("--n", type=int, default=512, help="held-out prompts whose distinct captions are drawn")
    ap.add_argument("--k", type=int, default=32, help="samples per distinct caption")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    counts = Counter(heldout_prompts(a.n, a.split))
    captions = sorted(counts)
    prompts = [p for p in captions for _ in range(a.k)]
    seeds = [700000 + 1000 * i + j for i in range(len(captions)) for j in range(a.k)]
    pipe = load_sd_pipeline(a.model)
    images = sample_images(pipe, prompts, seeds, steps=a.steps, guidance=a.guidance, desc=f"pass@{a.k} samples")
    per = score_samples(images, prompts)["per_sample"]
    correct = {p: 0 for p in captions}
    for p, s in zip(prompts, per):
        correct[p] += int(s["correct"] >= 1)
    rows = [{"m": r["k"], "weighted": round(r["weighted"], 4), "unweighted": round(r["unweighted"], 4)}
            for r in pass_at_curve(correct, a.k, counts)]
    never = [p for p, c in correct.items() if c == 0]
    result = {"model": a.model, "split": a.split, "n": a.n, "captions": len(captions), "k": a.k,
              "steps": a.steps, "guidance": a.guidance, "pass_at": rows,
              "never_correct": {"captions": len(never), "share_of_prompts": round(sum(counts[p] for p in never)
                                                                                  / a.n, 4), "examples": never[:10]},
              "correct_of_k": correct}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pass_at_k_{a.split}_{Path(a.model).name}.json").write_text(json.dumps(result, indent=1))
    print(f"{a.model}: {len(captions)} distinct {a.split} captions (of {a.n} prompts), {a.k} samples each")
    print("| m | pass@m, weighted as the n prompts | pass@m, per caption |\n|---|---|---|")
    for r in rows:
        print(f"| {r['m']} | {100 * r['weighted']:.1f} % | {100 * r['unweighted']:.1f} % |")
    print(f"never correct in {a.k}: {len(never)} captions, {100 * result['never_correct']['share_of_prompts']:.1f} % "
          f"of the prompts")


if __name__ == "__main__":
    main()
