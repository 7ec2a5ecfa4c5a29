"""Paired gains of saved ShapeWorld runs with the CI over samples and over prompts side by side (`core.stats`,
`groups=`), from the per-sample scores the runs wrote; nothing is sampled again.

    .venv/bin/python benchmarks/ci_over_prompts.py diffusion runs/demo/base runs/demo/diffusion_dpo/eval
    .venv/bin/python benchmarks/ci_over_prompts.py mllm runs/calib/mllm_test/base_recipe --split test
    .venv/bin/python benchmarks/ci_over_prompts.py mllm-counts runs/calib/mllm_test/base_recipe --split test

diffusion: two sample folders (samples.jsonl with scores, same prompts and seeds). mllm: a VL demo folder
(base_answers.jsonl, aligned_answers.jsonl); its questions are rebuilt from the demo's seed to find each one's
scene caption. mllm-counts: the counting questions by true answer, before and after, with the answers given.
"""
from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from mmalign.core.stats import paired_gain_ci


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ci(after, before, groups) -> str:
    g, lo, hi = paired_gain_ci(after, before)
    _, glo, ghi = paired_gain_ci(after, before, groups=groups)
    return f"{g:+.1f}  over samples [{lo:+.1f}, {hi:+.1f}]  over {len(set(groups))} prompts [{glo:+.1f}, {ghi:+.1f}]"


def diffusion(base_dir: str, new_dir: str) -> None:
    from mmalign.diffusion.onpolicy import reward_from_scores
    from mmalign.evals.compare import compare_scores

    base, new = _jsonl(Path(base_dir) / "samples.jsonl"), _jsonl(Path(new_dir) / "samples.jsonl")
    prompts = [r["prompt"] for r in base]
    if prompts != [r["prompt"] for r in new] or [r["seed"] for r in base] != [r["seed"] for r in new]:
        raise SystemExit("the two folders do not hold the same prompts and seeds")
    after, before = [r["scores"] for r in new], [r["scores"] for r in base]
    items = compare_scores(after, before, reward_from_scores)
    grouped = compare_scores(after, before, reward_from_scores, prompts)
    pct = lambda lo_hi, sign="+": f"[{100 * lo_hi[0]:{sign}.1f}, {100 * lo_hi[1]:{sign}.1f}]"  # noqa: E731
    print(grouped["ci_unit"])
    for key, g in items["gain"].items():
        print(f"{key:10s} gain {100 * g['gain']:+.1f}  over samples {pct(g['ci95'])}  over prompts "
              f"{pct(grouped['gain'][key]['ci95'])}")
    w, wg = items["win_rate"], grouped["win_rate"]
    print(f"win rate {100 * w['win_rate']:.1f} %  over samples {pct(w['ci95'], '')}  over prompts "
          f"{pct(wg['ci95'], '')}")


def _vqa_run(run_dir: str, split: str):
    from mmalign.demo.mllm import MLLM_HELDOUT_SEED, MLLMDemoSettings
    from mmalign.mllm.shapeworld import vqa_benchmark

    s = MLLMDemoSettings()
    bench = vqa_benchmark(MLLM_HELDOUT_SEED, s.eval_scenes, s.eval_per_scene, split=split)
    base, new = _jsonl(Path(run_dir) / "base_answers.jsonl"), _jsonl(Path(run_dir) / "aligned_answers.jsonl")
    if [r["question"] for r in base] != [ex.item.question for ex in bench] or len(new) != len(base):
        raise SystemExit(f"{run_dir}: the answers are not those of the {split} questions of the default demo")
    return bench, base, new


def mllm(run_dir: str, split: str) -> None:
    bench, base, new = _vqa_run(run_dir, split)
    captions = [ex.scene.caption for ex in bench]
    for cap in sorted({ex.item.capability for ex in bench}) + ["overall"]:
        keep = [i for i, ex in enumerate(bench) if cap in ("overall", ex.item.capability)]
        a, b = [100 * new[i]["grade"] for i in keep], [100 * base[i]["grade"] for i in keep]
        print(f"{cap:12s} {sum(b) / len(b):5.1f} -> {sum(a) / len(a):5.1f}  gain "
              f"{_ci(a, b, [captions[i] for i in keep])}")


def mllm_counts(run_dir: str, split: str) -> None:
    bench, base, new = _vqa_run(run_dir, split)
    rows = collections.defaultdict(list)
    for ex, b, a in zip(bench, base, new):
        if ex.item.capability == "count":
            rows[ex.item.answer].append((b, a))
    for truth, pairs in sorted(rows.items()):
        before = sum(b["grade"] for b, _ in pairs) / len(pairs)
        after = sum(a["grade"] for _, a in pairs) / len(pairs)
        answers = collections.Counter(a["answer"] for _, a in pairs).most_common(3)
        print(f"true {truth}: n {len(pairs):4d}  {before:.2f} -> {after:.2f}  answered after: {dict(answers)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=("diffusion", "mllm", "mllm-counts"))
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--split", default="test", choices=("validation", "test"))
    a = ap.parse_args()
    if a.kind == "diffusion":
        if len(a.dirs) != 2:
            raise SystemExit("diffusion needs two sample folders: the base's and the model's")
        diffusion(*a.dirs)
    else:
        for d in a.dirs:
            print(d)
            (mllm if a.kind == "mllm" else mllm_counts)(d, a.split)


if __name__ == "__main__":
    main()
