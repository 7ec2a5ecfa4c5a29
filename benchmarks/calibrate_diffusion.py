"""Calibration sweeps of the ShapeWorld pair methods on the VALIDATION half of the held-out captions (the test
half is kept for the reported numbers, `mmalign demo --split test`).

    .venv/bin/python benchmarks/calibrate_diffusion.py --out runs/calib --n 256 \
        --variant 'dpo_base={"method": "diffusion_dpo"}' \
        --variant 'dpo_r2={"method": "diffusion_dpo", "rounds": 2}' \
        --variant 'dpo_sft={"method": "diffusion_dpo", "overrides": ["objective.sft_weight=1.0"]}'

Each variant is a JSON object of demo.diffusion.DemoSettings fields (plus "method", and "init" + "pair_round" to
continue from an earlier variant's model on pairs drawn from it: a second on-policy round); unspecified fields take
the demo's values. The base is sampled once per guidance and the on-policy pairs once per pair setting
(prompts, samples per prompt, pairing, winner threshold), then reused by every variant, so a sweep costs one
training and one evaluation per variant. Every variant's paired gain and win rate against the base (at the
method's own sampling guidance) go to <out>/calibration.json and a markdown table on stdout; a variant already
in calibration.json is not rerun.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from mmalign.demo.diffusion import (BASE_PIPELINE, EVAL_GUIDANCE, DemoSettings, evaluate, heldout_prompts, load_sd_pipeline,
                                    onpolicy_pairs, run_method)


def pairs_key(s: DemoSettings) -> str:
    fields = (s.pair_prompts, s.per_prompt, s.pairing, s.min_winner_score, s.pair_steps, s.guidance)
    return hashlib.sha1(json.dumps(fields).encode()).hexdigest()[:10]


def filter_pairs(src: Path, dst: Path, min_winner_score: float) -> None:
    """The pairs of `src` whose winner scores at least `min_winner_score` (images linked, not copied)."""
    rows = [json.loads(line) for line in (src / "metadata.jsonl").read_text().splitlines()]
    kept = [r for r in rows if r["score_0"] >= min_winner_score]
    dst.mkdir(parents=True)
    (dst / "images").symlink_to((src / "images").resolve())
    (dst / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    report = json.loads((src / "pairs_report.json").read_text())
    (dst / "pairs_report.json").write_text(json.dumps({**report, "pairs": len(kept),
                                                       "min_winner_score": min_winner_score}, indent=1))


def base_samples(base, prompts, seeds, where: Path, s: DemoSettings, guidance: float) -> dict:
    """The base's scored samples at `guidance`, computed once and kept in <where>/scores.json."""
    cached = where / "scores.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    _, scored = evaluate(base, prompts, seeds, where, s, guidance)
    cached.write_text(json.dumps({"summary": scored["summary"], "per_sample": scored["per_sample"]}))
    return scored


def main() -> None:
    from mmalign.diffusion.onpolicy import reward_from_scores
    from mmalign.evals.compare import compare_scores

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=256, help="validation prompts")
    ap.add_argument("--split", default="validation", choices=("validation",),
                    help="calibration never looks at the test half")
    ap.add_argument("--variant", action="append", required=True, metavar="NAME=JSON")
    ap.add_argument("--base", default=str(BASE_PIPELINE),
                    help="the base pipeline (default: the shipped SD base; e.g. mmalign/assets/shapeworld_sd3)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    book = out / "calibration.json"
    done = json.loads(book.read_text()) if book.exists() else {}
    base = load_sd_pipeline(a.base)
    prompts, seeds = heldout_prompts(a.n, a.split), list(range(a.n))
    base_scores: dict[float, dict] = {}
    for spec in a.variant:
        name, _, body = spec.partition("=")
        if name in done:
            continue
        fields = json.loads(body)
        method = fields.pop("method", "diffusion_dpo")
        init = fields.pop("init", None)  # start from this model (e.g. an earlier variant's final) instead of the base
        pair_round = fields.pop("pair_round", 1)  # > 1: pairs drawn from `init` on that round's new prompts
        s = replace(DemoSettings(n=a.n, split=a.split, methods=(method,)),
                    **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        guidance = EVAL_GUIDANCE.get(method, s.guidance)
        if guidance not in base_scores:
            base_scores[guidance] = base_samples(base, prompts, seeds, out / f"base_g{guidance:g}", s, guidance)
        pairs_dir = out / (f"pairs_{pairs_key(s)}" if init is None else f"pairs_{pairs_key(s)}_{name}")
        if not (pairs_dir / "pairs_report.json").is_file():
            unfiltered = out / f"pairs_{pairs_key(replace(s, min_winner_score=None))}"
            if init is not None:
                onpolicy_pairs(load_sd_pipeline(init), pairs_dir, s, pair_round)
            elif s.min_winner_score is not None and (unfiltered / "pairs_report.json").is_file():
                filter_pairs(unfiltered, pairs_dir, s.min_winner_score)  # the same samples, winners filtered
            else:
                onpolicy_pairs(base, pairs_dir, s)
        n_pairs = json.loads((pairs_dir / "pairs_report.json").read_text())["pairs"]
        t0 = time.time()
        final, extra = run_method(method, init or a.base, out / name, s, pairs_dir)
        train_s = round(time.time() - t0, 1)
        _, scored = evaluate(load_sd_pipeline(final), prompts, seeds, out / name / "eval", s, guidance)
        cmp = compare_scores(scored["per_sample"], base_scores[guidance]["per_sample"], reward_from_scores,
                             prompts)
        done[name] = {"method": method, "settings": asdict(s), "init": init, "pair_round": pair_round, "pairs": n_pairs, "guidance": guidance,
                      "base_correct": base_scores[guidance]["summary"]["correct"]["mean"],
                      "correct": scored["summary"]["correct"]["mean"], "gain": cmp["gain"],
                      "win_rate": cmp["win_rate"], "train_seconds": train_s, **extra}
        book.write_text(json.dumps(done, indent=1))
        print(table({name: done[name]}), flush=True)
    print(table(done))


def table(done: dict) -> str:
    rows = ["| variant | method | pairs | base | correct | gain (95% CI) | win rate | train s |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in done.items():
        g, w = r["gain"]["correct"], r["win_rate"]
        rows.append(f"| {name} | {r['method']} | {r['pairs']} | {100 * r['base_correct']:.1f} | "
                    f"{100 * r['correct']:.1f} | {100 * g['gain']:+.1f} [{100 * g['ci95'][0]:+.1f}, "
                    f"{100 * g['ci95'][1]:+.1f}] | {100 * w['win_rate']:.1f} | {r['train_seconds']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
