"""Graded answers of the MLLM benchmarks as TaskResults (MM-Vet-style with POPE, LLaVA-Bench-style,
MT-Bench-style), and the paired comparison of two runs' per-item scores. No model runs here."""
from __future__ import annotations

TASK_OF = {"mmvet": "mmvet", "llava-bench": "llava_bench", "mt-bench": "mt_bench"}  # protocol -> main task


def _finite(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _lower_failures(metrics: dict) -> dict:
    """higher_is_better: every metric but the parse-failure count."""
    return {k: k != "parse_failures" for k in metrics}


def mmvet_tasks(items, preds, judge, judge_settings, seed: int) -> dict:
    """{"mmvet": ..., and "pope" when there are yes/no existence items}; `judge_settings` gives runs,
    temperature and tries."""
    from .mmvet import grade_predictions, item_means, summarize_runs
    from .pope import pope_table
    from .results import TaskResult

    js = judge_settings
    graded = grade_predictions(items, preds, judge, runs=js.runs, temperature=js.temperature, tries=js.tries,
                               seed=seed)
    s = summarize_runs(graded, items)
    metrics = {"total": s["total"]["mean"], **{k: v["mean"] for k, v in s["capabilities"].items()},
               "parse_failures": s["parse_failures"]}
    means = item_means(graded)
    samples = [{"id": it.id, "question": it.question, "answer": it.answer, "prediction": p,
                "capabilities": list(it.capabilities), "type": it.type, "score": m,
                "grades": [r[i] for r in graded["grades"]], "parse_failed": [r[i] for r in graded["parse_failed"]],
                "judge_outputs": [r[i] for r in graded["outputs"]]}
               for i, (it, p, m) in enumerate(zip(items, preds, means))]
    tasks = {"mmvet": TaskResult(
        metrics, _lower_failures(metrics), len(items), samples=samples,
        config={"protocol": "mmvet", "judge_runs": graded["runs"], "judge_tries": js.tries},
        extra={k: s[k] for k in ("total", "capabilities", "combinations", "n", "runs", "parse_failures_per_run")})}
    pope = pope_table(items, preds)
    if pope:
        m = {k: pope["all"][k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
        # yes_ratio: 0.5 is ideal for balanced items; marked not-higher-is-better
        tasks["pope"] = TaskResult(m, {k: k != "yes_ratio" for k in m}, pope["all"]["n"],
                                   extra={"splits": pope, "unparsed": pope["all"]["unparsed"]})
    return tasks


def llava_bench_tasks(items, preds, judge, judge_settings, seed: int) -> dict:
    from .llava_bench import rate_items, relative_scores
    from .results import TaskResult

    js = judge_settings
    outcomes = rate_items(items, preds, judge, temperature=js.temperature, tries=js.tries, seed=seed)
    table = relative_scores([o.score for o in outcomes], [it.category for it in items])
    metrics = {f"relative_{k}": v["relative"] for k, v in table.items() if k != "parse_failures"}
    metrics["parse_failures"] = table["parse_failures"]
    samples = [{"id": it.id, "question": it.question, "answer": it.answer, "prediction": p, "category": it.category,
                "score": None if o.score is None else o.score[1], "ratings": o.score, "judge_outputs": o.outputs}
               for it, p, o in zip(items, preds, outcomes)]
    return {"llava_bench": TaskResult(metrics, _lower_failures(metrics), len(items), samples=samples,
                                      config={"protocol": "llava-bench"}, extra={"table": table})}


def mt_bench_tasks(questions, answers, judge, judge_settings, seed: int) -> dict:
    from .mtbench import grade_answers, summarize
    from .results import TaskResult

    js = judge_settings
    records = grade_answers(questions, answers, judge, temperature=js.temperature, tries=js.tries, seed=seed)
    s = summarize(records)
    metrics = _finite({"score": s["score"], **{f"turn_{t}": v for t, v in s["turns"].items()}})
    metrics["parse_failures"] = s["parse_failures"]
    return {"mt_bench": TaskResult(metrics, _lower_failures(metrics), s["n"], samples=records,
                                   config={"protocol": "mt-bench"}, extra=s)}


def item_scores(task) -> dict:
    """{item id: score} of a TaskResult's samples."""
    return {s["id"]: s["score"] for s in task.samples}


def paired_comparison(base: dict[str, float | None], new: dict[str, float | None], n_boot: int, seed: int,
                      groups: dict[str, str] | None = None, unit: str = "images") -> dict:
    """Paired bootstrap CI of new - base over the item ids both have scored (others counted, not used).
    `groups` (item id -> image, caption, ...): items of one group are resampled together (`core.stats`); an id
    without a group is its own."""
    from ..core.stats import ci_unit, paired_gain_ci

    ids = [i for i in new if new[i] is not None and base.get(i) is not None]
    if not ids:
        raise ValueError("no item scored in both runs: nothing to compare (different benchmarks?)")
    labels = None if groups is None else [groups.get(i, f"item {i}") for i in ids]
    g, lo, hi = paired_gain_ci([new[i] for i in ids], [base[i] for i in ids], n_boot=n_boot, seed=seed,
                               groups=labels)
    return {"n_paired": len(ids), "unpaired": len(set(new) | set(base)) - len(ids),
            "base_mean": sum(base[i] for i in ids) / len(ids), "new_mean": sum(new[i] for i in ids) / len(ids),
            "gain": g, "ci95": [lo, hi], "significant": lo > 0 or hi < 0, "ci_unit": ci_unit(labels, unit)}
