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
from .shipped_pairs import shipped_pairs

BASE_PIPELINE = SHAPEWORLD_SD
HELDOUT_SEED = 20_000  # held-out evaluation scenes (captions never seen in training)
PAIR_SEED = 30_000  # training-split captions the on-policy pairs are sampled for

# Evaluation-only settings, beside the training recipes: the guidance each method's held-out samples are drawn
# with when it differs from DemoSettings.guidance. CCA replaces guidance, so its samples are drawn guidance-free.
EVAL_GUIDANCE: dict[str, float] = {"diffusion_cca": 1.0}


def heldout_prompts(n: int, split: str = "test") -> list[str]:
    """`n` held-out captions of `split`: "test" for reported numbers, "validation" for choosing settings."""
    if split not in ("validation", "test"):
        raise ValueError(f"split must be 'validation' or 'test', got {split!r}")
    return [s.caption for s in sample_scenes(HELDOUT_SEED, n, split=split)]


@dataclass
class DemoSettings:
    n: int = 512  # held-out prompts, one fixed seed each
    split: str = "test"  # held-out half the prompts come from: "test" (reported) or "validation" (calibration)
    steps: int = 15  # DDIM steps for evaluation samples (as for the pair samples)
    guidance: float = 4.0
    methods: tuple[str, ...] = ("diffusion_dpo",)  # registered pair-method names; () = evaluate the base only
    pair_prompts: int = 256  # training-split prompts sampled for pairs (per round)
    per_prompt: int = 4  # samples per prompt
    pairing: str = "all"  # every two samples of a prompt whose scores differ (see make_onpolicy_pairs)
    min_winner_score: float | None = None  # e.g. 2.0: winners satisfy the whole caption
    pair_steps: int = 15  # DDIM steps for the pair samples
    train_steps: int | None = None  # overrides train.max_steps of every recipe (per round); None: each recipe's
    batch_size: int = 32  # overrides train.batch_size, capped by the number of pairs
    rounds: int = 1  # on-policy rounds: round r samples new pairs from round r-1's model and trains from it
    overrides: tuple[str, ...] = ()  # extra recipe overrides "key=value" (calibration sweeps), for every method
    fresh_pairs: bool = False  # sample round 1's pairs even when the shipped set (shipped_pairs.py) matches


def _check_model(model) -> None:
    local = Path(model).exists()
    if (local and not (Path(model) / "model_index.json").is_file()) or (not local and str(model).count("/") != 1):
        raise FileNotFoundError(f"no pipeline at {model} (a pipeline directory or a hub id owner/name); "
                                f"the shipped base is rebuilt by scripts/build_shapeworld_base.sh")


def load_sd_pipeline(model):
    """A pipeline directory, hub id or training export (full pipeline or LoRA export on its recorded base)."""
    from ..diffusion.load_for_sampling import load_for_sampling
    return load_for_sampling(str(model))


def evaluate(pipe, prompts, seeds, out: Path, s: DemoSettings, guidance: float | None = None) -> tuple[list, dict]:
    from ..diffusion.sampling import sample_images, save_samples, score_samples

    t0 = time.time()
    images = sample_images(pipe, prompts, seeds, steps=s.steps, guidance=s.guidance if guidance is None else guidance,
                           desc=f"held-out samples ({Path(out).name})")
    scored = score_samples(images, prompts)
    save_samples(out, images, prompts, seeds, scored["per_sample"])
    scored["seconds"] = round(time.time() - t0, 1)
    return images, scored


def train_method(name: str, model, pairs_dir: Path, out: Path, s: DemoSettings) -> tuple[float, int]:
    """Train one pair method from configs/shapeworld_<name>.yaml (plus `s.overrides`), placed under `out` and
    sized by `s` (see demo.load_demo_recipe); returns wall seconds (data encoding included) and pair-steps trained
    (optimizer steps x pairs per step, as resolved from the recipe)."""
    from ..core.registry import method_class
    from ..core.trainer import train

    with open(pairs_dir / "metadata.jsonl") as f:
        n_pairs = sum(1 for _ in f)
    steps = {} if s.train_steps is None else {"train.max_steps": s.train_steps}
    exp = load_demo_recipe(f"shapeworld_{name}", {
        "model.pretrained": str(model), "data.path": str(pairs_dir), "data.cache_dir": str(out / "cache"),
        "output_dir": str(out / name), **steps, "train.batch_size": min(s.batch_size, n_pairs)}, extra=s.overrides)
    t0 = time.time()
    train(exp, method_class(exp.method)(exp.args, exp.output_dir))
    return round(time.time() - t0, 1), exp.train.max_steps * exp.train.batch_size


def onpolicy_pairs(pipe, out: Path, s: DemoSettings, round_: int = 1) -> dict:
    """Best-vs-worst (or all ranked) pairs from `pipe` on training-split prompts; each round draws new prompts."""
    from ..diffusion.onpolicy import make_onpolicy_pairs, shapeworld_reward

    seed = PAIR_SEED + 100_000 * (round_ - 1)
    prompts = [sc.caption for sc in sample_scenes(seed, s.pair_prompts, split="train")]
    pairs = make_onpolicy_pairs(pipe, prompts, s.per_prompt, out, shapeworld_reward, seed=seed, steps=s.pair_steps,
                                guidance=s.guidance, pairing=s.pairing, min_winner_score=s.min_winner_score)
    if pairs["pairs"] < 2:
        raise ValueError(f"only {pairs['pairs']} on-policy pairs: too few to train on "
                         f"(more --pair-prompts or --per-prompt)")
    return pairs


def run_method(name: str, model, out: Path, s: DemoSettings, first_pairs: Path) -> tuple[Path, dict]:
    """`s.rounds` rounds of pairs -> training (round 1 on `first_pairs`, drawn from the base); returns the final
    model directory, per-round numbers (pairs, train seconds) and the pair-steps trained (all rounds)."""
    current, rounds, pair_steps = model, [], 0
    for r in range(1, s.rounds + 1):
        where = out if s.rounds == 1 else out / name / f"round{r}"
        pairs_dir = first_pairs if r == 1 else where / "pairs"
        pairs = None if r == 1 else onpolicy_pairs(load_sd_pipeline(current), pairs_dir, s, r)
        train_s, trained = train_method(name, current, pairs_dir, where, s)
        pair_steps += trained
        current = where / name / "final"
        rounds.append({"round": r, "train_seconds": train_s, **({"pairs": pairs} if pairs else {})})
    return Path(current), {"pair_steps": pair_steps, **({"rounds": rounds} if s.rounds > 1 else {})}


def run_demo(out: str | Path, model: str | Path = BASE_PIPELINE, settings: DemoSettings | None = None) -> dict:
    from ..evals.compare import compare_scores
    from ..diffusion.onpolicy import reward_from_scores

    s = settings or DemoSettings()
    unknown = [m for m in s.methods if m not in PAIR_METHOD_NAMES]
    if unknown:
        raise ValueError(f"unknown demo method(s) {unknown} (known: {', '.join(PAIR_METHOD_NAMES)}; "
                         f"core.registry.canonical_name resolves aliases)")
    if s.rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {s.rounds}")
    _check_model(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = load_sd_pipeline(model)
    prompts, seeds = heldout_prompts(s.n, s.split), list(range(s.n))
    base_images, base_scored = evaluate(base, prompts, seeds, out / "base", s)
    by_guidance = {s.guidance: base_scored}  # the base sampled at each guidance a method is evaluated with
    results = {"model": str(model), "n_prompts": s.n, "prompt_seed": HELDOUT_SEED, "sample_seeds": [0, s.n - 1],
               "sampler": {"scheduler": type(base.scheduler).__name__, "steps": s.steps, "guidance": s.guidance},
               "settings": asdict(s), "base": {"accuracy": base_scored["summary"],
                                               "eval_seconds": base_scored["seconds"]}, "aligned": {}}
    rows = [base_images[:16]]
    if s.methods:
        shipped = shipped_pairs(model, s, PAIR_SEED)
        if shipped:  # the same pairs this run would sample, built once by scripts/build_shapeworld_pairs.sh
            first_pairs, results["pairs"] = shipped[0], {**shipped[1], "shipped": str(shipped[0])}
        else:
            first_pairs, results["pairs"] = out / "pairs", onpolicy_pairs(base, out / "pairs", s)
        for name in s.methods:
            t_train = time.time()
            final, extra = run_method(name, model, out, s, first_pairs)
            train_s = round(time.time() - t_train, 1)
            guidance = EVAL_GUIDANCE.get(name, s.guidance)
            if guidance not in by_guidance:  # the proper baseline of a guidance-free method: the base guidance-free
                _, by_guidance[guidance] = evaluate(base, prompts, seeds, out / f"base_guidance{guidance:g}", s,
                                                    guidance)
                results["base"][f"accuracy_guidance{guidance:g}"] = by_guidance[guidance]["summary"]
            images, scored = evaluate(load_sd_pipeline(final), prompts, seeds, out / name / "eval", s, guidance)
            rows.append(images[:16])
            entry = {"accuracy": scored["summary"], "train_seconds": train_s, "guidance": guidance,
                     "eval_seconds": scored["seconds"], **extra,
                     **compare_scores(scored["per_sample"], by_guidance[guidance]["per_sample"], reward_from_scores,
                                     prompts)}
            if guidance != s.guidance:  # and the gap left to the base sampled with CFG
                entry["vs_cfg_base"] = compare_scores(scored["per_sample"], base_scored["per_sample"],
                                                      reward_from_scores, prompts)
            results["aligned"][name] = entry
    image_grid([im for r in rows for im in r], [p for _ in rows for p in prompts[:16]], cols=16).save(out / "grid.png")
    results["seconds"] = round(time.time() - t0, 1)
    path = write_diffusion_demo(out / "results.json", results)
    return unpack_diffusion_demo(json.loads(path.read_text()))  # what the file holds: the same dict


def _pct(v: float) -> str:
    return f"{100 * v:5.1f}"


def format_results(results: dict) -> str:
    """Plain-text summary: base accuracy, then per method the accuracy, the paired gain and the win rate.
    `results`: run_demo's return, or unpack_diffusion_demo(a loaded results.json)."""
    split = results.get("settings", {}).get("split", "heldout")
    lines = [f"held-out ShapeWorld prompts ({split} split): {results['n_prompts']}  (total {results['seconds']} s)",
             f"base: {results['model']}"]
    for key, v in results["base"]["accuracy"].items():
        lines.append(f"  {key:8s} {_pct(v['mean'])} %  95% CI [{_pct(v['ci95'][0])}, {_pct(v['ci95'][1])}]  n={v['n']}")
    if "pairs" in results:
        p = results["pairs"]
        lines.append(f"on-policy pairs: {p['pairs']} from {p['prompts']} prompts x {p['per_prompt']} samples "
                     + (f"(the shipped set {p['shipped']}, identical to sampling them; --fresh-pairs samples them)"
                        if "shipped" in p else f"({p['seconds']} s)"))
    for name, r in results["aligned"].items():
        wr = r["win_rate"]
        lines.append(f"{name}: trained {r['train_seconds']} s, sampled at guidance {r.get('guidance', '?')}"
                     + "".join(f"; round {x['round']}: {x['pairs']['pairs']} pairs"
                               + (f" (samples score {x['pairs']['mean_score']:.3f})" if "mean_score" in x['pairs']
                                  else "") for x in r.get("rounds", []) if "pairs" in x))
        lines += [f"  {w}" for w in rounds_not_compounding(results.get("pairs", {}), r.get("rounds", []))]
        for key, v in r["accuracy"].items():
            g = r["gain"][key]
            lines.append(f"  {key:8s} {_pct(v['mean'])} %  gain {100 * g['gain']:+5.1f} "
                         f"[{100 * g['ci95'][0]:+.1f}, {100 * g['ci95'][1]:+.1f}]")
        lines.append(f"  win rate vs base {_pct(wr['win_rate'])} % [{_pct(wr['ci95'][0])}, {_pct(wr['ci95'][1])}]"
                     f"  W/T/L {wr['wins']}/{wr['ties']}/{wr['losses']}")
        if "ci_unit" in r:
            lines.append(f"  (CIs: {r['ci_unit']})")
        if "vs_cfg_base" in r:
            lines.append(f"  vs the base sampled at guidance {results['sampler']['guidance']:g}: all correct "
                         f"{_ci(r['vs_cfg_base']['gain']['correct'])}")
    return "\n".join(lines)


def rounds_not_compounding(first_pairs: dict, rounds: list[dict]) -> list[str]:
    """A warning for each on-policy round whose pairs' samples (drawn from the previous round's model on new training
    captions) score lower on average than the previous round's: the previous round made the model's own samples
    worse, so this round learns from worse pairs. Measured on ShapeWorld: Diffusion-DPO's rounds rise and compound
    (0.935, 0.981, 0.994); InPO's and flow DPO's fall and lose (benchmarks/RESULTS.md, "On-policy rounds")."""
    previous, out = first_pairs.get("mean_score"), []
    for x in rounds:
        now = x.get("pairs", {}).get("mean_score")
        if now is not None and previous is not None and now < previous:
            out.append(f"warning: round {x['round']}'s samples score {now:.3f}, below round {x['round'] - 1}'s "
                       f"{previous:.3f}: the rounds are not compounding")
        previous = now if now is not None else previous
    return out


def _ci(g: dict) -> str:
    return f"{100 * g['gain']:+.1f} [{100 * g['ci95'][0]:+.1f}, {100 * g['ci95'][1]:+.1f}]"


def _win(wr: dict) -> str:
    return f"{_pct(wr['win_rate']).strip()} % [{_pct(wr['ci95'][0]).strip()}, {_pct(wr['ci95'][1]).strip()}]"


def comparison_table(results: dict) -> str:
    """Markdown table of the methods in one demo run (equal pair budget). Each method's gain and win rate are
    paired against the base sampled at the method's own guidance (its proper baseline: guidance-free for CCA);
    a method sampled at another guidance than the base's also shows its gap to the CFG-sampled base."""
    head = ["| method | guidance | correct | gain (95% CI) | win rate vs base (95% CI) | vs CFG base | pair-steps "
            "| train s |", "|---|---|---|---|---|---|---|---|"]
    base, g0 = results["base"], results["sampler"]["guidance"]
    body = [f"| base | {g0:g} | {_pct(base['accuracy']['correct']['mean']).strip()} % | | | | | |"]
    for key, acc in base.items():
        if key.startswith("accuracy_guidance"):
            body.append(f"| base | {key[len('accuracy_guidance'):]} | {_pct(acc['correct']['mean']).strip()} % "
                        f"| | | | | |")
    for name, r in results["aligned"].items():
        cfg = _ci(r["vs_cfg_base"]["gain"]["correct"]) if "vs_cfg_base" in r else ""
        body.append(f"| {name} | {r['guidance']:g} | {_pct(r['accuracy']['correct']['mean']).strip()} % "
                    f"| {_ci(r['gain']['correct'])} | {_win(r['win_rate'])} | {cfg} | {r.get('pair_steps', '')} "
                    f"| {r['train_seconds']} |")
    return "\n".join(head + body)
