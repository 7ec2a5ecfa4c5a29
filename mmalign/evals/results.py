"""Evaluation results files in a layout close to lmms-eval's, so tooling written for it carries over.

One JSON file per evaluation run::

    {"results":   {task: {"alias": task, "<metric>,none": value, "<metric>_stderr,none": value | "N/A"}},
     "higher_is_better": {task: {metric: bool}},
     "n-samples": {task: {"original": N, "effective": M}},
     "configs":   {task: {...task settings...}},
     "versions":  {task: version},
     "config":    {"model": ..., "model_args": ...},
     "date": unix time, "mmalign": {"schema": SCHEMA, "kind": kind, "provenance": {...}, "extra": {task: {...}}}}

Per-sample records go to a sibling ``<stem>_samples_<task>.jsonl``. ``provenance`` holds what makes a number
reproducible (model path or id, judge id and temperature, seeds, evaluator weight hashes, parse failures);
``extra`` holds what lmms-eval has no slot for (CIs, per-capability tables, W/T/L). ``kind`` says who wrote the
file and so how to read it: "eval" (an evaluator: one table per task) or one of the demos ("diffusion_demo",
"mllm_demo", "video_demo"; see evals/demo_results.py).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = "mmalign-results/1"


@dataclass
class TaskResult:
    """One task's scalar metrics (and optional standard errors), settings, samples and extras."""

    metrics: dict[str, float]
    higher_is_better: dict[str, bool]
    n_original: int
    n_effective: int | None = None  # after skips; defaults to n_original
    stderr: dict[str, float] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    version: str = "1"
    samples: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        missing = set(self.metrics) - set(self.higher_is_better)
        if missing:
            raise ValueError(f"higher_is_better is missing metric(s) {sorted(missing)}")
        for k, v in self.metrics.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"metric {k!r} must be a finite number, got {v!r}")
        if self.n_effective is None:
            self.n_effective = self.n_original
        if not 0 <= self.n_effective <= self.n_original:
            raise ValueError(f"n_effective {self.n_effective} must lie in [0, n_original={self.n_original}]")


def write_results(path, tasks: dict[str, TaskResult], model: str, model_args: dict | None = None,
                  provenance: dict | None = None, kind: str = "eval") -> Path:
    """Write the results file (and per-task sample files beside it); returns the results path."""
    if not tasks:
        raise ValueError("no task results to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, t in tasks.items():
        row = {"alias": name}
        for m, v in t.metrics.items():
            row[f"{m},none"] = v
            row[f"{m}_stderr,none"] = t.stderr.get(m, "N/A")
        results[name] = row
    doc = {
        "results": results,
        "higher_is_better": {n: dict(t.higher_is_better) for n, t in tasks.items()},
        "n-samples": {n: {"original": t.n_original, "effective": t.n_effective} for n, t in tasks.items()},
        "configs": {n: t.config for n, t in tasks.items()},
        "versions": {n: t.version for n, t in tasks.items()},
        "config": {"model": model, "model_args": model_args or {}},
        "date": time.time(),
        "mmalign": {"schema": SCHEMA, "kind": kind, "provenance": provenance or {},
                    "extra": {n: t.extra for n, t in tasks.items() if t.extra}},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(path)
    for name, t in tasks.items():
        if t.samples:
            with open(path.with_name(f"{path.stem}_samples_{name}.jsonl"), "w") as f:
                for s in t.samples:
                    f.write(json.dumps(s, default=str) + "\n")
    return path


def read_results(path) -> dict:
    """Load a results file and check its shape; returns {"tasks": {task: {metric: value}}, "doc": raw}."""
    path = Path(path)
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
        raise ValueError(f"{path}: not a results file (no 'results' mapping)")
    return {"tasks": task_metrics(doc), "doc": doc}


def task_metrics(doc: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of a loaded results document, in the file's order."""
    return {name: {k[: -len(",none")]: v for k, v in row.items() if k.endswith(",none")
                   and not k.endswith("_stderr,none")} for name, row in doc["results"].items()}


def results_kind(doc) -> str | None:
    """The kind of a results document: mmalign.kind of one `write_results` wrote ("eval" for files written before
    kinds existed); "eval" for lmms-eval's own output (the same layout: `results` and `higher_is_better`
    mappings, no mmalign block); None for any other JSON."""
    if not isinstance(doc, dict):
        return None
    mm = doc.get("mmalign")
    if isinstance(mm, dict) and mm.get("schema") == SCHEMA:
        return mm.get("kind", "eval")
    if mm is None and isinstance(doc.get("results"), dict) and isinstance(doc.get("higher_is_better"), dict):
        return "eval"
    return None


def metric_value(doc: dict, task: str, metric: str) -> float:
    """One metric from a loaded results document, with a clear error naming what is missing."""
    try:
        return doc["results"][task][f"{metric},none"]
    except KeyError:
        have = sorted(doc.get("results", {}).get(task, {}))
        raise KeyError(f"results have no metric {metric!r} for task {task!r} (have: {have})") from None
