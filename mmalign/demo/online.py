"""The online-RL part of the demo (`mmalign demo --parts online`, opt-in: it takes far longer than the 10-minute
demo on CPU): `diffusion_grpo` on the shipped ShapeWorld base, from configs/shapeworld_diffusion_grpo.yaml, once
per trained reward, each run evaluated by the exact ShapeWorld scorer on the held-out test prompts against the
base (same prompts and seeds, paired gain and win rate with 95 % bootstrap CIs).

Two runs by default: the exact scorer as the reward (CLIPScore logged as a held-out reward), and CLIPScore as the
reward (the exact scorer held out) — the reward-hacking lesson: a learned proxy can rise while the exact score
does not. Each run's reward curves (trained and held-out, first and last tenth of the run) and its seconds per
stage (rollout, reward, update) go into <out>/online/results.json.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import load_demo_recipe
from .diffusion import BASE_PIPELINE, DemoSettings, evaluate, heldout_prompts, load_sd_pipeline

RECIPE = "shapeworld_diffusion_grpo"
OTHER_REWARD = {"shapeworld": "clipscore", "clipscore": "shapeworld"}


@dataclass
class OnlineDemoSettings:
    n: int = 512  # held-out prompts (test split), one fixed seed each
    split: str = "test"
    steps: int = 15  # DDIM steps of the evaluation samples (as in the diffusion demo)
    guidance: float = 4.0
    train_steps: int = 150  # optimizer steps, overrides train.max_steps (the recipe: 2 per rollout -> reward)
    rewards: tuple[str, ...] = ("shapeworld", "clipscore")  # one run per trained reward


def curve_summary(metrics_path: Path) -> dict:
    """Mean of each reward metric over the first and the last tenth of the run, and the mean seconds per stage."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    k = max(1, len(rows) // 10)
    keys = sorted({key for r in rows for key in r if key.startswith(("reward/", "heldout/")) and key.endswith("_mean")})
    mean = lambda part, key: sum(r[key] for r in part if key in r) / max(1, sum(key in r for r in part))  # noqa: E731
    stages = sorted({key for r in rows for key in r if key.startswith("time/")})
    return {"iterations": len(rows), "first": {key: mean(rows[:k], key) for key in keys},
            "last": {key: mean(rows[-k:], key) for key in keys},
            "seconds_per_iteration": {key: mean(rows, key) for key in stages}}


def run_online_demo(out: str | Path, model: str | Path = BASE_PIPELINE,
                    settings: OnlineDemoSettings | None = None) -> dict:
    from ..core.registry import method_class
    from ..core.trainer import train
    from ..diffusion.onpolicy import reward_from_scores
    from ..evals.compare import compare_scores

    s = settings or OnlineDemoSettings()
    unknown = [r for r in s.rewards if r not in OTHER_REWARD]
    if unknown:
        raise ValueError(f"online demo rewards must be among {sorted(OTHER_REWARD)}, got {unknown}")
    out = Path(out) / "online"
    out.mkdir(parents=True, exist_ok=True)
    sample = DemoSettings(n=s.n, split=s.split, steps=s.steps, guidance=s.guidance)
    prompts, seeds = heldout_prompts(s.n, s.split), list(range(s.n))
    _, base = evaluate(load_sd_pipeline(model), prompts, seeds, out / "base", sample)
    results = {"model": str(model), "settings": asdict(s), "base": base["summary"], "runs": {}}
    for reward in s.rewards:
        run_dir = out / f"grpo_{reward}"
        exp = load_demo_recipe(RECIPE, {"model.pretrained": str(model), "output_dir": str(run_dir),
                                        "train.max_steps": s.train_steps, "reward.weights": {reward: 1.0},
                                        "reward.heldout": [OTHER_REWARD[reward]]})
        t0 = time.time()
        train(exp, method_class(exp.method)(exp.args, exp.output_dir))
        train_s = round(time.time() - t0, 1)
        _, scored = evaluate(load_sd_pipeline(run_dir / "final"), prompts, seeds, run_dir / "eval", sample)
        results["runs"][reward] = {"accuracy": scored["summary"], "train_seconds": train_s,
                                   "curve": curve_summary(run_dir / "metrics.jsonl"),
                                   **compare_scores(scored["per_sample"], base["per_sample"], reward_from_scores,
                                                   prompts)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return json.loads((out / "results.json").read_text())  # what the file holds (tuples become lists)


def format_online_results(results: dict) -> str:
    b = results["base"]["correct"]
    lines = [f"online RL (diffusion_grpo) on {results['settings']['n']} held-out {results['settings']['split']} "
             f"prompts; base all correct {100 * b['mean']:.1f} % [{100 * b['ci95'][0]:.1f}, {100 * b['ci95'][1]:.1f}]"]
    for reward, r in results["runs"].items():
        g, w, c = r["gain"]["correct"], r["win_rate"], r["curve"]
        lines.append(f"  trained on {reward}: all correct {100 * r['accuracy']['correct']['mean']:.1f} %, gain "
                     f"{100 * g['gain']:+.1f} [{100 * g['ci95'][0]:+.1f}, {100 * g['ci95'][1]:+.1f}], win rate "
                     f"{100 * w['win_rate']:.1f} % [{100 * w['ci95'][0]:.1f}, {100 * w['ci95'][1]:.1f}]; "
                     f"{c['iterations']} steps in {r['train_seconds']} s")
        for key in c["first"]:
            lines.append(f"    {key}: {c['first'][key]:.3f} (first tenth) -> {c['last'][key]:.3f} (last tenth)")
    return "\n".join(lines)
