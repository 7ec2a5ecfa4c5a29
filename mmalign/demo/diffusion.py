"""The demo on the embedded default: the shipped ShapeWorld base pipeline -> on-policy best-vs-worst pairs scored
by the exact ShapeWorld scorer -> preference training (Diffusion-DPO by default; any pair method by name) ->
held-out captions sampled with the same seeds before and after -> attribute accuracy, paired gains and win
rate with bootstrap CIs, and a before/after grid."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from ..datasets.shapeworld import sample_scenes, score_image
from ..evals.grid import image_grid
from ..core.stats import bootstrap_ci

from ..assets import SHAPEWORLD_SD
BASE_PIPELINE = SHAPEWORLD_SD
HELDOUT_SEED = 20_000  # held-out evaluation scenes (captions never seen in training)
PAIR_SEED = 30_000  # training-split captions the on-policy pairs are sampled for


def heldout_prompts(n: int) -> list[str]:
    return [s.caption for s in sample_scenes(HELDOUT_SEED, n, split="heldout")]


def score_samples(images: list[Image.Image], prompts: list[str]) -> dict:
    """Per-attribute accuracy with 95 % bootstrap CIs over samples, plus the per-sample scores."""
    per = [score_image(im, p) for im, p in zip(images, prompts)]
    summary = {}
    for key in sorted({k for s in per for k in s}):
        vals = [s[key] for s in per if key in s]
        mean, lo, hi = bootstrap_ci(vals)
        summary[key] = {"mean": round(mean, 4), "ci95": [round(lo, 4), round(hi, 4)], "n": len(vals)}
    return {"summary": summary, "per_sample": per}


def save_samples(out: Path, images, prompts, seeds, scores=None) -> None:
    """samples/*.png plus samples.jsonl (file_name, prompt, seed[, scores]): what `eval` tools read back."""
    (out / "samples").mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w") as f:
        for i, (im, p, s) in enumerate(zip(images, prompts, seeds)):
            name = f"samples/{i:05d}.png"
            im.save(out / name)
            row = {"file_name": name, "prompt": p, "seed": s}
            if scores is not None:
                row["scores"] = scores[i]
            f.write(json.dumps(row) + "\n")


# Per-method settings on ShapeWorld (full fine-tune of the 1.1 M-param UNet, frozen-copy reference); every
# method sees the same pairs and the same number of pair-steps (an equal pair budget).
DEMO_RECIPES: dict[str, dict] = {
    "diffusion_dpo": {"train": {"lr": 1e-4}, "objective": {"beta": 5000}},
    "diffusion_sft_winners": {"train": {"lr": 1e-4}},
    "inpo": {"train": {"lr": 1e-4}, "objective": {"beta": 5000}},
    "inversion_dpo": {"train": {"lr": 1e-4}, "objective": {"beta": 5000, "inversion_steps": 4}},
    "diffusion_cca": {"train": {"lr": 1e-4}, "objective": {"beta": 5000, "cca_lambda": 1.0},
                      "eval_guidance": 1.0},  # CCA replaces guidance: its samples are drawn guidance-free
    "diffusion_bco": {"train": {"lr": 1e-4}, "objective": {"beta": 5000}},
}


@dataclass
class DemoSettings:
    n: int = 512  # held-out prompts, one fixed seed each
    steps: int = 15  # DDIM steps for evaluation samples (as for the pair samples)
    guidance: float = 4.0
    methods: tuple[str, ...] = ("diffusion_dpo",)  # () = evaluate the base only
    pair_prompts: int = 256  # training-split prompts sampled for pairs
    per_prompt: int = 4  # samples per prompt
    pairing: str = "all"  # every two samples of a prompt whose scores differ (see make_onpolicy_pairs)
    min_winner_score: float | None = None  # e.g. 2.0: winners satisfy the whole caption
    pair_steps: int = 15  # DDIM steps for the pair samples
    train_steps: int = 150
    batch_size: int = 32


def _check_model(model) -> None:
    local = Path(model).exists()
    if (local and not (Path(model) / "model_index.json").is_file()) or (not local and str(model).count("/") != 1):
        raise FileNotFoundError(f"no pipeline at {model} (a pipeline directory or a hub id owner/name); "
                                f"the shipped base is rebuilt by scripts/build_shapeworld_base.sh")


def _load(model):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, requires_safety_checker=False)


def evaluate(pipe, prompts, seeds, out: Path, s: DemoSettings, guidance: float | None = None) -> tuple[list, dict]:
    from ..diffusion.sampling import sample_images

    t0 = time.time()
    images = sample_images(pipe, prompts, seeds, steps=s.steps, guidance=s.guidance if guidance is None else guidance)
    scored = score_samples(images, prompts)
    save_samples(out, images, prompts, seeds, scored["per_sample"])
    scored["seconds"] = round(time.time() - t0, 1)
    return images, scored


def train_method(name: str, model, pairs_dir: Path, out: Path, s: DemoSettings) -> float:
    """Train one pair method with its demo recipe; returns wall seconds (data encoding included)."""
    from ..core.config import Experiment, TrainConfig, from_dict
    from ..core.trainer import train
    from ..diffusion.preference import PreferenceConfig
    from ..core.registry import method_class

    recipe = DEMO_RECIPES.get(name, {})
    n_pairs = sum(1 for _ in open(pairs_dir / "metadata.jsonl"))
    tcfg = from_dict(TrainConfig, {"max_steps": s.train_steps, "batch_size": min(s.batch_size, n_pairs),
                                   "log_every": 10, "warmup_steps": 10, "resume": "never", **recipe.get("train", {})},
                     "demo")
    args = from_dict(PreferenceConfig, {"model": {"pretrained": str(model)},
                                        "data": {"path": str(pairs_dir), "cache_dir": str(out / "cache")},
                                        "objective": recipe.get("objective", {})}, "demo")
    t0 = time.time()
    train(Experiment(name, str(out / name), tcfg, args), method_class(name)(args, str(out / name)))
    return round(time.time() - t0, 1)


def run_demo(out: str | Path, model: str | Path = BASE_PIPELINE, settings: DemoSettings | None = None) -> dict:
    from ..diffusion.onpolicy import make_onpolicy_pairs, reward_from_scores, shapeworld_reward
    from ..evals.compare import compare_scores

    s = settings or DemoSettings()
    unknown = [m for m in s.methods if m not in DEMO_RECIPES]
    if unknown:
        raise ValueError(f"unknown demo method(s) {unknown} (known: {', '.join(DEMO_RECIPES)})")
    _check_model(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = _load(model)
    prompts, seeds = heldout_prompts(s.n), list(range(s.n))
    base_images, base_scored = evaluate(base, prompts, seeds, out / "base", s)
    results = {"model": str(model), "n_prompts": s.n, "prompt_seed": HELDOUT_SEED, "sample_seeds": [0, s.n - 1],
               "sampler": {"scheduler": type(base.scheduler).__name__, "steps": s.steps, "guidance": s.guidance},
               "settings": asdict(s), "base": {"accuracy": base_scored["summary"],
                                               "eval_seconds": base_scored["seconds"]}, "aligned": {}}
    rows = [base_images[:16]]
    if s.methods:
        pair_prompts = [sc.caption for sc in sample_scenes(PAIR_SEED, s.pair_prompts, split="train")]
        results["pairs"] = make_onpolicy_pairs(base, pair_prompts, s.per_prompt, out / "pairs", shapeworld_reward,
                                               seed=PAIR_SEED, steps=s.pair_steps, guidance=s.guidance,
                                               pairing=s.pairing, min_winner_score=s.min_winner_score)
        if results["pairs"]["pairs"] < 2:
            raise ValueError(f"only {results['pairs']['pairs']} on-policy pairs: too few to train on "
                             f"(more --pair-prompts or --per-prompt)")
        for name in s.methods:
            train_s = train_method(name, model, out / "pairs", out, s)
            guidance = DEMO_RECIPES[name].get("eval_guidance", s.guidance)
            images, scored = evaluate(_load(out / name / "final"), prompts, seeds, out / name / "eval", s, guidance)
            rows.append(images[:16])
            results["aligned"][name] = {"accuracy": scored["summary"], "train_seconds": train_s, "guidance": guidance,
                                        "eval_seconds": scored["seconds"],
                                        **compare_scores(scored["per_sample"], base_scored["per_sample"],
                                                         reward_from_scores)}
    image_grid([im for r in rows for im in r], [p for _ in rows for p in prompts[:16]], cols=16).save(out / "grid.png")
    results["seconds"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def _pct(v: float) -> str:
    return f"{100 * v:5.1f}"


def format_results(results: dict) -> str:
    """Plain-text summary: base accuracy, then per method the accuracy, the paired gain and the win rate."""
    lines = [f"held-out ShapeWorld prompts: {results['n_prompts']}  (total {results['seconds']} s)",
             f"base: {results['model']}"]
    for key, v in results["base"]["accuracy"].items():
        lines.append(f"  {key:8s} {_pct(v['mean'])} %  95% CI [{_pct(v['ci95'][0])}, {_pct(v['ci95'][1])}]  n={v['n']}")
    if "pairs" in results:
        p = results["pairs"]
        lines.append(f"on-policy pairs: {p['pairs']} from {p['prompts']} prompts x {p['per_prompt']} samples "
                     f"({p['seconds']} s)")
    for name, r in results["aligned"].items():
        wr = r["win_rate"]
        lines.append(f"{name}: trained {r['train_seconds']} s")
        for key, v in r["accuracy"].items():
            g = r["gain"][key]
            lines.append(f"  {key:8s} {_pct(v['mean'])} %  gain {100 * g['gain']:+5.1f} "
                         f"[{100 * g['ci95'][0]:+.1f}, {100 * g['ci95'][1]:+.1f}]")
        lines.append(f"  win rate vs base {_pct(wr['win_rate'])} % [{_pct(wr['ci95'][0])}, {_pct(wr['ci95'][1])}]"
                     f"  W/T/L {wr['wins']}/{wr['ties']}/{wr['losses']}")
    return "\n".join(lines)


def comparison_table(results: dict) -> str:
    """Markdown table of the methods in one demo run (equal pair budget): accuracy gain with CI, win rate, time."""
    head = ["| method | correct | gain (95% CI) | win rate vs base (95% CI) | train s |", "|---|---|---|---|---|"]
    base = results["base"]["accuracy"]["correct"]["mean"]
    body = [f"| base | {_pct(base).strip()} % | | | |"]
    for name, r in results["aligned"].items():
        g, wr = r["gain"]["correct"], r["win_rate"]
        body.append(f"| {name} | {_pct(r['accuracy']['correct']['mean']).strip()} % | {100 * g['gain']:+.1f} "
                    f"[{100 * g['ci95'][0]:+.1f}, {100 * g['ci95'][1]:+.1f}] | {_pct(wr['win_rate']).strip()} % "
                    f"[{_pct(wr['ci95'][0]).strip()}, {_pct(wr['ci95'][1]).strip()}] | {r['train_seconds']} |")
    return "\n".join(head + body)
