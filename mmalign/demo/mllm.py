"""The MLLM half of `mmalign demo`: the shipped ShapeWorld LLaVA answers held-out VQA questions; on-policy
answer pairs on training scenes are graded by the exact grader; DPO trains on them; the aligned model answers
the same held-out questions. Reports the per-capability (MM-Vet-style) table, POPE metrics and paired gains
with 95 % bootstrap CIs. DPO trains from configs/shapeworld_mllm_dpo.yaml (see demo.load_demo_recipe)."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..assets import SHAPEWORLD_LLAVA
from ..evals.demo_results import unpack_mllm_demo, write_mllm_demo
from . import load_demo_recipe

MLLM_BASE = SHAPEWORLD_LLAVA
MLLM_HELDOUT_SEED = 40_000  # held-out scenes for evaluation
MLLM_PAIR_SEED = 50_000  # training-split scenes the on-policy answers are sampled for


@dataclass
class MLLMDemoSettings:
    eval_scenes: int = 500  # x 6 = 3000 held-out questions
    eval_per_scene: int = 6
    pair_scenes: int = 400  # x 6 = 2400 training-split questions, 4 sampled answers each
    pair_per_scene: int = 6
    n_samples: int = 4
    temperature: float = 1.0
    pairing: str = "all"
    balance: str = "none"  # "mirror": mllm.shapeworld.mirror_balance on the on-policy pairs
    train_steps: int = 300  # overrides the recipe's train.max_steps
    batch_size: int = 16  # overrides train.batch_size; fewer on-policy pairs than this is an error
    split: str = "test"  # held-out half of the questions: "test" (reported) or "validation" (calibration)
    overrides: tuple[str, ...] = ()  # extra recipe overrides "key=value" (calibration sweeps)
    recipe: str = "shapeworld_mllm_dpo"  # configs/<recipe>.yaml


def _dpo(model: str, pairs_dir: Path, out: Path, s: MLLMDemoSettings) -> float:
    from ..core.registry import method_class
    from ..core.trainer import train

    exp = load_demo_recipe(s.recipe, {
        "model.pretrained": str(model), "data.path": str(pairs_dir), "data.ref_cache_dir": str(out / "ref_cache"),
        "output_dir": str(out), "train.max_steps": s.train_steps, "train.batch_size": s.batch_size},
        extra=s.overrides)
    t0 = time.time()
    train(exp, method_class(exp.method)(exp.args, exp.output_dir))
    return round(time.time() - t0, 1)


def run_mllm_demo(out: str | Path, model: str | Path = MLLM_BASE, settings: MLLMDemoSettings | None = None) -> dict:
    from ..mllm.models import load_vlm
    from ..mllm.shapeworld import compare_vqa, evaluate_vqa, onpolicy_vqa_pairs, vqa_benchmark

    s = settings or MLLMDemoSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base, processor = load_vlm(str(model))
    if s.split not in ("validation", "test"):
        raise ValueError(f"split must be 'validation' or 'test', got {s.split!r}")
    heldout = vqa_benchmark(MLLM_HELDOUT_SEED, s.eval_scenes, s.eval_per_scene, split=s.split)
    before = evaluate_vqa(base, processor, heldout)
    train_bench = vqa_benchmark(MLLM_PAIR_SEED, s.pair_scenes, s.pair_per_scene, split="train")
    pairs = onpolicy_vqa_pairs(base, processor, train_bench, out / "pairs", n_samples=s.n_samples,
                               temperature=s.temperature, seed=MLLM_PAIR_SEED, pairing=s.pairing,
                               balance=s.balance)
    if pairs["n_pairs"] < s.batch_size:
        raise ValueError(f"only {pairs['n_pairs']} on-policy answer pairs: too few to train on")
    train_s = _dpo(str(model), out / "pairs", out / "mllm_dpo", s)
    aligned, _ = load_vlm(str(out / "mllm_dpo" / "final"))
    after = evaluate_vqa(aligned, processor, heldout)
    results = {"model": str(model), "settings": asdict(s), "heldout_seed": MLLM_HELDOUT_SEED,
               "pair_seed": MLLM_PAIR_SEED, "n_questions": len(heldout), "pairs": pairs, "train_seconds": train_s,
               "base": {k: before[k] for k in ("table", "overall", "macro", "pope")},
               "aligned": {k: after[k] for k in ("table", "overall", "macro", "pope")},
               "comparison": compare_vqa(before, after)}
    for name, r in (("base", before), ("aligned", after)):
        (out / f"{name}_answers.jsonl").write_text("".join(
            json.dumps({"question": ex.item.question, "truth": ex.item.answer, "capability": ex.item.capability,
                        "answer": p, "grade": g, "caption": ex.scene.caption}) + "\n"
            for ex, p, g in zip(heldout, r["predictions"], r["scores"])))
    results["seconds"] = round(time.time() - t0, 1)
    write_mllm_demo(out / "results.json", results)
    return read_mllm_results(out)  # what the file holds: the same dict


def read_mllm_results(out: Path) -> dict:
    """The dict run_mllm_demo returned, from `out / "results.json"`."""
    return unpack_mllm_demo(json.loads((Path(out) / "results.json").read_text()))


def read_mllm_demo(out: Path) -> dict:
    """The base model and the seeds of the MLLM demo run saved under `out`."""
    r = read_mllm_results(out)
    return {"model": r["model"], "heldout_seed": r["heldout_seed"], "pair_seed": r["pair_seed"]}


def format_mllm_results(results: dict) -> str:
    """`results`: run_mllm_demo's return, or read_mllm_results(its folder)."""
    from ..mllm.shapeworld import format_comparison

    c, p = results["comparison"], results["pairs"]
    pope = c["pope"]
    split = results.get("settings", {}).get("split", "heldout")
    lines = [f"ShapeWorld VQA, {results['n_questions']} held-out questions ({split} split); DPO on {p['n_pairs']} on-policy answer "
             f"pairs ({p['no_preference']} of {p['n_prompts']} questions gave no preference)",
             format_comparison(c),
             *([f"(CIs: {c['ci_unit']})"] if "ci_unit" in c else []),
             "POPE (existence) accuracy / F1 / yes-ratio: "
             + "  ->  ".join(f"{100 * pope[k]['accuracy']:.1f} / {100 * pope[k]['f1']:.1f} / "
                             f"{100 * pope[k]['yes_ratio']:.0f} %" for k in ("before", "after"))]
    return "\n".join(lines)
