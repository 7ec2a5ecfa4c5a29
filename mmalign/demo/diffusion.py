"""The demo on the embedded default: the shipped ShapeWorld base pipeline -> on-policy best-vs-worst pairs scored
by the exact ShapeWorld scorer -> preference training (Diffusion-DPO by default; any pair method by name), each
method from its shipped recipe configs/shapeworld_<method>.yaml -> held-out captions sampled with the same seeds
before and after -> attribute accuracy, paired gains and win rate with bootstrap CIs, and a before/after grid."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..assets import SHAPEWORLD_SD
from ..core.registry import PAIR_METHOD_NAMES
from ..datasets.shapeworld import sample_scenes
from ..evals.demo_results import unpack_diffusion_demo, write_diffusion_demo
from ..evals.grid import image_grid
from . import load_demo_recipe

BASE_PIPELINE = SHAPEWORLD_SD
HELDOUT_SEED = 20_000  # held-out evaluation scenes (captions never seen in training)
PAIR_SEED = 30_000  # training-split captions the on-policy pairs are sampled for

# Evaluation-only settings, beside the training recipes: the guidance each method's held-out samples are drawn
# with when it differs from DemoSettings.guidance. CCA replaces guidance, so its samples are drawn guidance-free.
EVAL_GUIDANCE: dict[str, float] = {"diffusion_cca": 1.0}


def heldout_prompts(n: int) -> list[str]:
    return [s.caption for s in sample_scenes(HELDOUT_SEED, n, split="heldout")]


@dataclass
class DemoSettings:
    n: int = 512  # held-out prompts, one fixed seed each
    steps: int = 15  # DDIM steps for evaluation samples (as for the pair samples)
    guidance: float = 4.0
    methods: tuple[str, ...] = ("diffusion_dpo",)  # registered pair-method names; () = evaluate the base only
    pair_prompts: int = 256  # training-split prompts sampled for pairs
    per_prompt: int = 4  # samples per prompt
    pairing: str = "all"  # every two samples of a prompt whose scores differ (see make_onpolicy_pairs)
    min_winner_score: float | None = None  # e.g. 2.0: winners satisfy the whole caption
    pair_steps: int = 15  # DDIM steps for the pair samples
    train_steps: int = 150  # overrides train.max_steps of every recipe
    batch_size: int = 32  # overrides train.batch_size, capped by the number of pairs


def _check_model(model) -> None:
    local = Path(model).exists()
    if (local and not (Path(model) / "model_index.json").is_file()) or (not local and str(model).count("/") != 1):
        raise FileNotFoundError(f"no pipeline at {model} (a pipeline directory or a hub id owner/name); "
                                f"the shipped base is rebuilt by scripts/build_shapeworld_base.sh")


def _load(model):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, requires_safety_checker=False)


def evaluate(pipe, prompts, seeds, out: Path, s: DemoSettings, guidance: float | None = None) -> tuple[list, dict]:
    from ..diffusion.sampling import sample_images, save_samples, score_samples

    t0 = time.time()
    images = sample_images(pipe, prompts, seeds, steps=s.steps, guidance=s.guidance if guidance is None else guidance,
                           desc=f"held-out samples ({Path(out).name})")
    scored = score_samples(images, prompts)
    save_samples(out, images, prompts, seeds, scored["per_sample"])
    scored["seconds"] = round(time.time() - t0, 1)
    return images, scored


def train_method(name: str, model, pairs_dir: Path, out: Path, s: DemoSettings) -> float:
    """Train one pair method from configs/shapeworld_<name>.yaml, placed under `out` and sized by `s` (see
    demo.load_demo_recipe); returns wall seconds (data encoding included)."""
    from ..core.registry import method_class
    from ..core.trainer import train

    with open(pairs_dir / "metadata.jsonl") as f:
        n_pairs = sum(1 for _ in f)
    exp = load_demo_recipe(f"shapeworld_{name}", {
        "model.pretrained": str(model), "data.path": str(pairs_dir), "data.cache_dir": str(out / "cache"),
        "output_dir": str(out / name), "train.max_steps": s.train_steps,
        "train.batch_size": min(s.batch_size, n_pairs)})
    t0 = time.time()
    train(exp, method_class(exp.method)(exp.args, exp.output_dir))
    return round(time.time() - t0, 1)


def run_demo(out: str | Path, model: str | Path = BASE_PIPELINE, settings: DemoSettings | None = None) -> dict:
    from ..diffusion.onpolicy import make_onpolicy_pairs, reward_from_scores, shapeworld_reward
    from ..evals.compare import compare_scores

    s = settings or DemoSettings()
    unknown = [m for m in s.methods if m not in PAIR_METHOD_NAMES]
    if unknown:
        raise ValueError(f"unknown demo method(s) {unknown} (known: {', '.join(PAIR_METHOD_NAMES)}; "
                         f"core.registry.canonical_name resolves aliases)")
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
            guidance = EVAL_GUIDANCE.get(name, s.guidance)
            images, scored = evaluate(_load(out / name / "final"), prompts, seeds, out / name / "eval", s, guidance)
            rows.append(images[:16])
            results["aligned"][name] = {"accuracy": scored["summary"], "train_seconds": train_s, "guidance": guidance,
                                        "eval_seconds": scored["seconds"],
                                        **compare_scores(scored["per_sample"], base_scored["per_sample"],
                                                         reward_from_scores)}
    image_grid([im for r in rows for im in r], [p for _ in rows for p in prompts[:16]], cols=16).save(out / "grid.png")
    results["seconds"] = round(time.time() - t0, 1)
    path = write_diffusion_demo(out / "results.json", results)
    return unpack_diffusion_demo(json.loads(path.read_text()))  # what the file holds: the same dict


def _pct(v: float) -> str:
    return f"{100 * v:5.1f}"


def format_results(results: dict) -> str:
    """Plain-text summary: base accuracy, then per method the accuracy, the paired gain and the win rate.
    `results`: run_demo's return, or unpack_diffusion_demo(a loaded results.json)."""
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
