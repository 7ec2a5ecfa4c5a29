"""The demo's outputs through the project's evaluators, ending in one HTML page.

- Diffusion: every method's held-out samples against the base's (same prompts and seeds) with CLIPScore on
  the shipped ShapeWorld CLIP — what `mmalign eval compare` runs, so W/T/L, win rate and the mean difference
  come with bootstrap CIs in an lmms-eval-like results file.
- Vision-language: the base's and the aligned model's held-out answers graded by the MM-Vet-style harness
  with the exact ShapeWorld rule judge (per-capability and per-combination scores, POPE), plus the paired
  per-question gain with its bootstrap CI.
- `report.html`: `mmalign report` over the demo folder (training curves, grids, tables).
"""
from __future__ import annotations

import json
from pathlib import Path


def diffusion_evals(out: Path, methods) -> list[Path]:
    """CLIPScore comparisons of each method's held-out samples against the base's; returns the results files."""
    from ..assets import SHAPEWORLD_CLIP
    from ..evals.images import CompareSettings, ScorerSettings, compare_image_folders, format_comparison

    paths = []
    for name in methods:  # ShapeWorld prompts: the shipped ShapeWorld CLIP is the right scorer, chosen explicitly
        settings = CompareSettings(out / name / "eval", out / "base", out / "evals" / f"clipscore_{name}_vs_base.json",
                                   ScorerSettings(scorer="clipscore", model=str(SHAPEWORLD_CLIP)))
        path, task = compare_image_folders(settings)
        print(format_comparison(task))
        print(f"results: {path}")
        paths.append(path)
    return paths


def _bench_items(rows: list[dict]):
    from ..evals.mmvet import BenchItem
    from ..evals.shapeworld_bench import SHAPEWORLD_TAGS

    return [BenchItem(id=f"q{i:05d}", question=r["question"], answer=r["truth"],
                      capabilities=tuple(SHAPEWORLD_TAGS[r["capability"]]), category=r["capability"],
                      type=r["capability"]) for i, r in enumerate(rows)]


def mllm_evals(mllm_out: Path) -> list[Path]:
    """MM-Vet-style (rule judge) and POPE results for the base and aligned answers the demo saved."""
    from ..evals.judges import RuleJudge
    from ..evals.mllm_bench import JudgeSettings
    from ..evals.mllm_tasks import item_scores, mmvet_tasks, paired_comparison
    from ..evals.results import write_results
    from .mllm import read_mllm_demo

    judge, judge_settings, paths, scores = RuleJudge(), JudgeSettings("rule"), [], {}
    demo = read_mllm_demo(mllm_out)
    for name in ("base", "aligned"):
        rows = [json.loads(x) for x in (mllm_out / f"{name}_answers.jsonl").read_text().splitlines() if x.strip()]
        items = _bench_items(rows)
        captions = {it.id: r["caption"] for it, r in zip(items, rows) if "caption" in r}  # older runs: none
        tasks = mmvet_tasks(items, [r["answer"] for r in rows], judge, judge_settings, seed=0)
        scores[name] = item_scores(tasks["mmvet"])
        if name == "aligned":
            tasks["mmvet"].extra["comparison"] = {"against": "base",
                                                  **paired_comparison(scores["base"], scores["aligned"], 2000, 0,
                                                                      groups=captions or None,
                                                                      unit="scene captions")}
        model = demo["model"] if name == "base" else str(mllm_out / "mllm_dpo" / "final")
        provenance = {"model": model, "bench": "ShapeWorld held-out VQA (mmalign.mllm.demo)",
                      "heldout_seed": demo["heldout_seed"], "judge": judge.id, "judge_temperature": None,
                      "parse_failures": int(tasks["mmvet"].metrics["parse_failures"]),
                      "generation": {"greedy": True}, "seeds": {"pairs": demo["pair_seed"]}}
        paths.append(write_results(mllm_out / "evals" / f"mmvet_{name}.json", tasks, model=model,
                                   provenance=provenance))
    return paths


def write_demo_report(out: Path) -> Path:
    from ..evals.report import write_report

    return write_report([out], out / "report.html")
