"""CLIP-family scores of a sample folder (`mmalign eval images`) and the paired comparison of two folders with
the same prompts and seeds (`mmalign eval compare`): settings in, a results file and its TaskResult out.

Folders are read by `sample_folders`. Torch is imported only inside the calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from ..assets import SHAPEWORLD_CLIP
from .sample_folders import aligned_pairs, keep_complete_pairs, load_images, parse_rows, per_prompt_means

ScorerName = Literal["clipscore", "pickscore", "hpsv2", "aesthetic"]  # mmalign.evals.clip_scorers.SCORERS
SCORER_CHOICES = get_args(ScorerName)
MIN_BOOT = 1000  # fewest bootstrap resamples a comparison accepts
SHAPEWORLD_ALIAS = "shapeworld"  # `--model shapeworld`: the shipped ShapeWorld CLIP, chosen explicitly
CI_OVER_PROMPT_GROUPS = "95 % CI over prompts, percentile bootstrap (a prompt's images resampled together)"
CI_OVER_PROMPTS = "95 % CI over prompts (paired percentile bootstrap; a prompt's score is its seeds' mean)"
SHAPEWORLD_NOTICE = (f"clipscore without --model scores with the shipped ShapeWorld CLIP ({SHAPEWORLD_CLIP}), "
                     f"meaningful only for ShapeWorld prompts; pass --model for other images "
                     f"(--model {SHAPEWORLD_ALIAS} chooses it explicitly)")


@dataclass
class ScorerSettings:
    """The scorer and its CLIP backbone (see clip_backbone.resolve), the bad-row policy and the bootstrap."""
    scorer: ScorerName = "clipscore"
    # open_clip directory, hf-hub:org/repo, a weights file or pretrained tag with `arch`, or "shapeworld" (the
    # shipped CLIP); None: CLIPScore on the shipped CLIP with a notice, the other scorers refuse
    model: str | None = None
    arch: str | None = None
    head: str | None = None  # aesthetic: the MLP head state-dict file
    batch_size: int = 64
    bad_rows: Literal["skip", "error"] = "skip"
    n_boot: int = 2000
    seed: int = 0  # bootstrap seed


@dataclass
class ImageEvalSettings:
    dir: str | Path  # folder with samples.jsonl (or a run's samples/ folder)
    out: str | Path | None = None  # default: <folder>/eval_<scorer>.json
    scoring: ScorerSettings = field(default_factory=ScorerSettings)


@dataclass
class CompareSettings:
    a: str | Path  # the candidate's sample folder
    b: str | Path  # the baseline's, same prompts and seeds in the same order
    out: str | Path | None = None  # default: <A>/compare_<scorer>_vs_<B's folder name>.json
    scoring: ScorerSettings = field(default_factory=ScorerSettings)


def backbone_choice(s: ScorerSettings) -> tuple[str, str | None]:
    """(backbone source, notice or None). Refuses a scorer whose published weights are not given; CLIPScore
    without a model gets the shipped ShapeWorld CLIP and a notice saying so."""
    from ..core.config import ConfigError
    from .clip_scorers import DEFAULT_ARCH, check_weights_given

    check_weights_given(s.scorer, s.model, s.head)
    if s.model is None:
        return str(SHAPEWORLD_CLIP), SHAPEWORLD_NOTICE
    model = str(SHAPEWORLD_CLIP) if s.model == SHAPEWORLD_ALIAS else str(s.model)
    if not (Path(model).exists() or s.arch or DEFAULT_ARCH.get(s.scorer) or model.startswith("hf-hub:")):
        raise ConfigError(f"--model: {model} not found (an open_clip model directory, hf-hub:org/repo, "
                          f"'{SHAPEWORLD_ALIAS}', or a weights file with --arch)")
    return model, None


def load_scorer(s: ScorerSettings):
    from .clip_scorers import make_scorer

    return make_scorer(s.scorer, backbone_choice(s)[0], s.arch, s.head)


def _model_extra(notice: str | None) -> dict:
    return {"model_notice": notice} if notice else {}


def _score_entries(scorer, entries, images, batch_size: int) -> list:
    keep = [i for i, im in enumerate(images) if im is not None]
    scores = scorer.score([images[i] for i in keep], [entries[i]["prompt"] for i in keep], batch_size)
    out = [None] * len(entries)
    for i, s in zip(keep, scores):
        out[i] = s
    return out


def score_image_folder(settings: ImageEvalSettings):
    """Score every row of the folder; returns (results path, TaskResult, SkipReport of the rows)."""
    from ..core.stats import bootstrap_ci
    from ..datasets.records import DataError
    from .results import TaskResult, write_results

    s = settings.scoring
    model, notice = backbone_choice(s)
    root, entries, report = parse_rows(settings.dir, s.bad_rows)
    images = load_images(entries, report, s.bad_rows)
    scorer = load_scorer(s)
    scores = _score_entries(scorer, entries, images, s.batch_size)
    rows = [{"file_name": e["file_name"], "prompt": e["prompt"], "seed": e["seed"], s.scorer: v}
            for e, v in zip(entries, scores) if v is not None]
    report.kept = len(rows)
    if not rows:
        raise DataError(f"{root}: no row could be scored ({report.summary()})")
    mean, lo, hi = bootstrap_ci([r[s.scorer] for r in rows], s.n_boot, s.seed, groups=[r["prompt"] for r in rows])
    task = TaskResult({s.scorer: mean}, {s.scorer: True}, n_original=report.total, n_effective=len(rows),
                      config={"dir": str(root), "scorer": s.scorer, "bad_rows": s.bad_rows}, samples=rows,
                      extra={"mean": mean, "ci95": [lo, hi], "ci_unit": CI_OVER_PROMPT_GROUPS, "n_boot": s.n_boot,
                             "boot_seed": s.seed, "rows": report.to_dict(), **_model_extra(notice)})
    out = write_results(settings.out or root / f"eval_{s.scorer}.json", {f"images_{s.scorer}": task},
                        model=model, provenance=scorer.provenance)
    return out, task, report


def compare_image_folders(settings: CompareSettings):
    """Score both folders; A vs B W/T/L and win rate over prompts and the paired mean difference A - B, each with
    a bootstrap CI. Returns (results path, TaskResult)."""
    from ..core.config import ConfigError
    from ..core.stats import bootstrap_ci, paired_gain_ci, win_rate
    from ..datasets.records import DataError
    from .results import TaskResult, write_results

    s = settings.scoring
    if s.n_boot < MIN_BOOT:
        raise ConfigError(f"--n-boot must be at least {MIN_BOOT}, got {s.n_boot}")
    model, notice = backbone_choice(s)
    a_root, a_entries, a_report = parse_rows(settings.a, s.bad_rows)
    b_root, b_entries, b_report = parse_rows(settings.b, s.bad_rows)
    aligned_pairs(a_entries, b_entries, a_root, b_root)
    a_images, b_images = keep_complete_pairs(load_images(a_entries, a_report, s.bad_rows),
                                             load_images(b_entries, b_report, s.bad_rows),
                                             a_entries, b_entries, a_report, b_report)
    scorer = load_scorer(s)
    sa = _score_entries(scorer, a_entries, a_images, s.batch_size)
    sb = _score_entries(scorer, b_entries, b_images, s.batch_size)
    rows = [{"prompt": x["prompt"], "seed": x["seed"], "file_name_a": x["file_name"], "file_name_b": y["file_name"],
             "score_a": u, "score_b": v} for x, y, u, v in zip(a_entries, b_entries, sa, sb) if u is not None]
    if not rows:
        raise DataError(f"no row could be scored in both {a_root} and {b_root}")
    a_report.kept = b_report.kept = len(rows)
    prompts, pa, pb = per_prompt_means([r["prompt"] for r in rows], [r["score_a"] for r in rows],
                                       [r["score_b"] for r in rows])
    wr = win_rate(pa, pb, s.n_boot, s.seed)
    diff, dlo, dhi = paired_gain_ci(pa, pb, s.n_boot, s.seed)
    means = {k: bootstrap_ci(v, s.n_boot, s.seed) for k, v in (("a", pa), ("b", pb))}
    task = TaskResult({"win_rate": wr["win_rate"], "mean_diff": diff}, {"win_rate": True, "mean_diff": True},
                      n_original=len(a_entries), n_effective=len(rows),
                      config={"a": str(a_root), "b": str(b_root), "scorer": s.scorer, "bad_rows": s.bad_rows},
                      samples=rows,
                      extra={"wins": wr["wins"], "ties": wr["ties"], "losses": wr["losses"],
                             "win_rate_ci95": wr["ci95"], "mean_diff_ci95": [dlo, dhi],
                             "mean_a": list(means["a"]), "mean_b": list(means["b"]), "n_prompts": len(prompts),
                             "unit": "prompt (scores averaged over its seeds)", "ci_unit": CI_OVER_PROMPTS,
                             "n_boot": s.n_boot, "boot_seed": s.seed, "rows_a": a_report.to_dict(),
                             "rows_b": b_report.to_dict(), **_model_extra(notice)})
    out = settings.out or a_root / f"compare_{s.scorer}_vs_{b_root.name}.json"  # several candidates, one base
    out = write_results(out, {f"compare_{s.scorer}": task}, model=model, provenance=scorer.provenance)
    return out, task


def format_comparison(task) -> str:
    """The comparison's table: means with CIs of A, B and A - B, then W/T/L and the win rate."""
    c, e = task.config, task.extra
    diff = (task.metrics["mean_diff"], *e["mean_diff_ci95"])
    lines = [f"{c['scorer']}: A = {c['a']}  B = {c['b']}  ({task.n_effective} pairs, {e['n_prompts']} prompts, "
             f"{task.n_original - task.n_effective} skipped)",
             f"{'':8}{'mean':>10}  {e.get('ci_unit', '95 % CI')}"]
    for name, (m, lo, hi) in (("A", e["mean_a"]), ("B", e["mean_b"]), ("A - B", diff)):
        lines.append(f"{name:8}{m:>10.4f}  [{lo:.4f}, {hi:.4f}]")
    lo, hi = e["win_rate_ci95"]
    lines.append(f"A vs B  W/T/L {e['wins']}/{e['ties']}/{e['losses']} over prompts  win rate "
                 f"{task.metrics['win_rate']:.3f} [{lo:.3f}, {hi:.3f}]")
    return "\n".join(lines)
