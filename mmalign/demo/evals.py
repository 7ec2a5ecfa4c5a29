"""The demo's outputs through the project's evaluators, ending in one HTML page.

- Diffusion: every method's held-out samples against the base's (same prompts and seeds) with CLIPScore on
  the shipped ShapeWorld CLIP — `mmalign eval compare` itself, so W/T/L, win rate and the mean difference
  come with bootstrap CIs in an lmms-eval-like results file.
- Vision-language: the base's and the aligned model's held-out answers graded by the MM-Vet-style harness
  with the exact ShapeWorld rule judge (per-capability and per-combination scores, POPE), plus the paired
  per-question gain with its bootstrap CI.
- `report.html`: `mmalign report` over the demo folder (training curves, grids, tables).
"""
from __future__ import annotations

import json
from pathlib import Path


def _run_cli(argv: list[str]) -> None:
    from ..cli import build_parser

    a = build_parser().parse_args(argv)
    a.fn(a)


def diffusion_evals(out: Path, methods) -> list[Path]:
    """CLIPScore comparisons of each method's held-out samples against the base's; returns the results files."""
    paths = []
    for name in methods:
        path = out / "evals" / f"clipscore_{name}_vs_base.json"
        _run_cli(["eval", "compare", str(out / name / "eval"), str(out / "base"), "--scorer", "clipscore",
                  "--out", str(path)])
        paths.append(path)
    return paths


def _bench_items(rows: list[dict]):
    from ..evals.cli_mllm import SHAPEWORLD_TAGS
    from ..evals.mmvet import BenchItem

    return [BenchItem(id=f"q{i:05d}", question=r["question"], answer=r["truth"],
                      capabilities=tuple(SHAPEWORLD_TAGS[r["capability"]]), category=r["capability"],
                      type=r["capability"]) for i, r in enumerate(rows)]


def mllm_evals(mllm_out: Path) -> list[Path]:
    """MM-Vet-style (rule judge) and POPE results for the base and aligned answers the demo saved."""
    from ..cli import build_parser
    from ..evals.cli_mllm import eval_mmvet, paired_comparison
    from ..evals.judges import RuleJudge
    from ..evals.results import write_results

    a = build_parser().parse_args(["eval", "mllm", "--model", "demo", "--bench", "demo", "--judge", "rule"])
    judge, paths, scores = RuleJudge(), [], {}
    demo = json.loads((mllm_out / "results.json").read_text())
    for name in ("base", "aligned"):
        rows = [json.loads(x) for x in (mllm_out / f"{name}_answers.jsonl").read_text().splitlines() if x.strip()]
        items = _bench_items(rows)
        tasks = eval_mmvet(items, [r["answer"] for r in rows], judge, a)
        scores[name] = {s["id"]: s["score"] for s in tasks["mmvet"].samples}
        if name == "aligned":
            tasks["mmvet"].extra["comparison"] = {"against": "base",
                                                  **paired_comparison(scores["base"], scores["aligned"], 2000, 0)}
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
