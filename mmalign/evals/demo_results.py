"""The demos' `results.json` files in the results-file layout (evals/results.py) and back: `write_*` turns the
dict a demo builds into tasks, `unpack_*` turns a loaded file into that dict again (what the demos' text
summaries and `mmalign report` read). Each file says its kind in mmalign.kind.

Diffusion demo (kind "diffusion_demo"): one task per model, ``shapeworld_t2i_base`` and
``shapeworld_t2i_<method>``: metrics = ShapeWorld attribute accuracies; configs[task]["model"] = "base" or the
method; extra = per-attribute 95 % CIs (``ci95``) and counts (``n``), timings, and for a method its paired
``gain`` and ``win_rate`` against the base and its sampling ``guidance``.
Vision-language demo (kind "mllm_demo"): ``shapeworld_vqa_<side>`` (metrics overall and macro score; extra the
per-capability ``table``; the aligned side also the paired ``comparison`` and ``train_seconds``) and
``shapeworld_pope_<side>`` (POPE metrics on the existence questions; extra ``yes_ratio`` and ``unparsed``), side
base / aligned.
In both, the base task's extra["run"] holds the run's own numbers (the on-policy pairs drawn from the base, the
total seconds); provenance holds the seeds, the sampler and the demo's settings.
Video demo (kind "video_demo", written by demo.video.run_video_demo): ``shapeworld_motion_base`` / ``_aligned``
/ ``_gain`` (metrics = means, extra["ci95"]; the gain task's extra also the pairs, timings, training metrics).
"""
from __future__ import annotations

from pathlib import Path

from .results import TaskResult, results_kind, task_metrics, write_results

DIFFUSION_DEMO, MLLM_DEMO, VIDEO_DEMO = "diffusion_demo", "mllm_demo", "video_demo"
T2I, VQA, POPE = "shapeworld_t2i_", "shapeworld_vqa_", "shapeworld_pope_"
POPE_METRICS = ("accuracy", "precision", "recall", "f1")
SIDES = ("base", "aligned")


def _run_numbers(results: dict) -> dict:
    return {k: results[k] for k in ("pairs", "seconds") if k in results}


def _higher(metrics: dict) -> dict:
    return {k: True for k in metrics}


def _check_kind(doc: dict, kind: str) -> None:
    if results_kind(doc) != kind:
        raise ValueError(f"not a {kind} results file (kind {results_kind(doc)!r})")


def write_diffusion_demo(path, results: dict) -> Path:
    """`results`: the dict `demo.diffusion.run_demo` builds (base / aligned accuracy, gains, win rates)."""
    n = results["n_prompts"]
    models = {"base": {**results["base"], "run": _run_numbers(results)}, **results["aligned"]}
    tasks = {}
    for name, r in models.items():
        acc = r["accuracy"]
        tasks[T2I + name] = TaskResult(
            metrics={k: v["mean"] for k, v in acc.items()}, higher_is_better=_higher(acc), n_original=n,
            config={"model": name}, extra={"ci95": {k: v["ci95"] for k, v in acc.items()},
                                           "n": {k: v["n"] for k, v in acc.items()},
                                           **{k: v for k, v in r.items() if k != "accuracy"}})
    provenance = {k: results[k] for k in ("prompt_seed", "sample_seeds", "sampler", "settings")}
    return write_results(path, tasks, model=results["model"], provenance=provenance, kind=DIFFUSION_DEMO)


def unpack_diffusion_demo(doc: dict) -> dict:
    """The dict `write_diffusion_demo` was given, from the loaded file."""
    _check_kind(doc, DIFFUSION_DEMO)
    mm, metrics = doc["mmalign"], task_metrics(doc)
    models = {}
    for task, cfg in doc["configs"].items():
        extra = dict(mm["extra"][task])
        ci, n = extra.pop("ci95"), extra.pop("n")
        acc = {k: {"mean": v, "ci95": ci[k], "n": n[k]} for k, v in metrics[task].items()}
        models[cfg["model"]] = {"accuracy": acc, **extra}
    base = models.pop("base")
    run = base.pop("run")
    return {"model": doc["config"]["model"], "n_prompts": doc["n-samples"][T2I + "base"]["original"],
            **mm["provenance"], "base": base, "aligned": models, **run}


def write_mllm_demo(path, results: dict) -> Path:
    """`results`: the dict `demo.mllm.run_mllm_demo` builds (per-capability tables, POPE, paired gains)."""
    extra = {"base": {"run": _run_numbers(results)},
             "aligned": {"comparison": results["comparison"], "train_seconds": results["train_seconds"]}}
    tasks = {}
    for side in SIDES:
        r = results[side]
        overall = {"overall": r["overall"], "macro": r["macro"]}
        tasks[VQA + side] = TaskResult(metrics=overall, higher_is_better=_higher(overall),
                                       n_original=results["n_questions"], config={"model": side},
                                       extra={"table": r["table"], **extra[side]})
        pope = {k: r["pope"][k] for k in POPE_METRICS}
        tasks[POPE + side] = TaskResult(metrics=pope, higher_is_better=_higher(pope), n_original=r["pope"]["n"],
                                        config={"model": side},
                                        extra={k: r["pope"][k] for k in ("yes_ratio", "unparsed")})
    provenance = {k: results[k] for k in ("heldout_seed", "pair_seed", "settings")}
    return write_results(path, tasks, model=results["model"], provenance=provenance, kind=MLLM_DEMO)


def unpack_mllm_demo(doc: dict) -> dict:
    """The dict `write_mllm_demo` was given, from the loaded file."""
    _check_kind(doc, MLLM_DEMO)
    mm, metrics = doc["mmalign"], task_metrics(doc)
    sides, extras = {}, {}
    for side in SIDES:
        extras[side] = dict(mm["extra"][VQA + side])
        pope_extra = mm["extra"][POPE + side]
        pope = {**metrics[POPE + side], "yes_ratio": pope_extra["yes_ratio"],
                "n": doc["n-samples"][POPE + side]["original"], "unparsed": pope_extra["unparsed"]}
        sides[side] = {"table": extras[side].pop("table"), **metrics[VQA + side], "pope": pope}
    return {"model": doc["config"]["model"], **mm["provenance"],
            "n_questions": doc["n-samples"][VQA + "base"]["original"], **extras["base"].pop("run"),
            **sides, **extras["aligned"]}


def unpack_video_demo(doc: dict) -> dict:
    """The dict `demo.video.run_video_demo` returns, from its loaded results file."""
    _check_kind(doc, VIDEO_DEMO)
    metrics, extra = task_metrics(doc), doc["mmalign"]["extra"]

    def with_ci(task: str) -> dict:
        ci = extra[task]["ci95"]
        return {k: {"mean": v, "lo": ci[k][0], "hi": ci[k][1]} for k, v in metrics[task].items()}

    gain = extra["shapeworld_motion_gain"]
    return {"settings": doc["mmalign"]["provenance"]["settings"], "pairs": gain["pairs"],
            "train_metrics": gain["train_metrics"], "models": {side: with_ci(f"shapeworld_motion_{side}")
                                                               for side in SIDES},
            "gain": with_ci("shapeworld_motion_gain"), "seconds": gain["seconds"]}
