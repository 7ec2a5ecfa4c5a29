"""`mmalign eval images` and `mmalign eval compare`: CLIP-family scores of sample folders, and paired comparisons.

A sample folder is what `mmalign.demo.diffusion.save_samples` writes: ``samples.jsonl`` (rows ``file_name``, ``prompt``,
``seed``) and the images it names; the run's ``samples/`` sub-folder itself may be given. Torch is imported
only inside the commands.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..assets import SHAPEWORLD_CLIP as SHIPPED_CLIP
SCORER_CHOICES = ("clipscore", "pickscore", "hpsv2", "aesthetic")  # mmalign.evals.clip_scorers.SCORERS
MIN_BOOT = 1000


def samples_root(folder: str | Path) -> Path:
    """The folder holding samples.jsonl: `folder` itself or, for a run's samples/ folder, its parent."""
    folder = Path(folder)
    for root in (folder, folder.parent):
        if (root / "samples.jsonl").is_file():
            return root
    raise FileNotFoundError(f"{folder}: no samples.jsonl here or in its parent (rows file_name, prompt, seed)")


def parse_rows(folder: str | Path, bad_rows: str):
    """(root, entries, report): one entry per non-blank line, the row dict (with its image path, None when the
    file is missing) or None when the row itself is bad; bad rows are counted under "skip", a DataError under
    "error"."""
    from ..datasets.records import SkipReport, jsonl_rows, reject

    root = samples_root(folder)
    report, entries = SkipReport(), []
    for where, row in jsonl_rows(root / "samples.jsonl", report, bad_rows):
        entries += [None] * (report.total - 1 - len(entries))  # a None for each line before that was not JSON
        why = _row_problem(row)
        if why is not None:
            reject(report, bad_rows, why, where)
            entries.append(None)
            continue
        path = root / row["file_name"]
        if not path.is_file():  # the row's prompt and seed still count for compare's alignment check
            reject(report, bad_rows, "image file not found", where)
            path = None
        entries.append({**row, "path": path, "where": where})
    entries += [None] * (report.total - len(entries))  # trailing lines that were not JSON
    return root, entries, report


def _row_problem(row) -> str | None:
    if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
        return "missing file_name"
    if not isinstance(row.get("prompt"), str):
        return "missing or non-string prompt"
    if not isinstance(row.get("seed"), int) or isinstance(row.get("seed"), bool):
        return "missing or non-integer seed"
    return None


def load_images(entries, report, bad_rows: str) -> list:
    """Decode each entry's image (None for bad rows, or ones that do not decode)."""
    from ..datasets.records import open_rgb

    return [None if e is None or e["path"] is None else open_rgb(e["path"], report, bad_rows, e["where"])
            for e in entries]


def _scorer(a):
    from .clip_scorers import make_scorer

    if not (Path(a.model).exists() or a.arch or str(a.model).startswith("hf-hub:")):
        sys.exit(f"--model: {a.model} not found (an open_clip model directory, or a weights file with --arch)")
    return make_scorer(a.scorer, a.model, a.arch, a.head)


def _score_entries(scorer, entries, images, batch_size: int) -> list:
    keep = [i for i, im in enumerate(images) if im is not None]
    scores = scorer.score([images[i] for i in keep], [entries[i]["prompt"] for i in keep], batch_size)
    out = [None] * len(entries)
    for i, s in zip(keep, scores):
        out[i] = s
    return out


def cmd_images(a) -> None:
    from ..datasets.records import DataError
    from .results import TaskResult, write_results
    from ..core.stats import bootstrap_ci

    root, entries, report = parse_rows(a.dir, a.bad_rows)
    images = load_images(entries, report, a.bad_rows)
    scorer = _scorer(a)
    scores = _score_entries(scorer, entries, images, a.batch_size)
    rows = [{"file_name": e["file_name"], "prompt": e["prompt"], "seed": e["seed"], a.scorer: s}
            for e, s in zip(entries, scores) if s is not None]
    report.kept = len(rows)
    if not rows:
        raise DataError(f"{root}: no row could be scored ({report.summary()})")
    mean, lo, hi = bootstrap_ci([r[a.scorer] for r in rows], a.n_boot, a.seed)
    task = TaskResult({a.scorer: mean}, {a.scorer: True}, n_original=report.total, n_effective=len(rows),
                      config={"dir": str(root), "scorer": a.scorer, "bad_rows": a.bad_rows}, samples=rows,
                      extra={"mean": mean, "ci95": [lo, hi], "n_boot": a.n_boot, "boot_seed": a.seed,
                             "rows": report.to_dict()})
    out = write_results(a.out or root / f"eval_{a.scorer}.json", {f"images_{a.scorer}": task}, model=str(a.model),
                        provenance=scorer.provenance)
    print(f"{a.scorer}: {mean:.4f} [{lo:.4f}, {hi:.4f}] over {len(rows)} images ({report.summary()})")
    print(f"results: {out}")


def aligned_pairs(a_entries, b_entries, a_root, b_root) -> None:
    """Refuse unless both folders list the same (prompt, seed) rows in the same order; rows bad in either
    folder are left to the bad-row policy and are not compared."""
    if len(a_entries) != len(b_entries):
        raise ValueError(f"{a_root} has {len(a_entries)} rows but {b_root} has {len(b_entries)}: compare needs "
                         f"the same prompts and seeds in the same order")
    for k, (x, y) in enumerate(zip(a_entries, b_entries)):
        if x is not None and y is not None and (x["prompt"], x["seed"]) != (y["prompt"], y["seed"]):
            raise ValueError(f"row {k + 1} differs: {x['where']} has prompt {x['prompt']!r} seed {x['seed']}, "
                             f"{y['where']} has prompt {y['prompt']!r} seed {y['seed']}")


def per_prompt_means(prompts: list[str], a_scores: list[float], b_scores: list[float]):
    """Mean A and B score per distinct prompt (over its seeds), prompts in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    a = [sum(a_scores[i] for i in ix) / len(ix) for ix in groups.values()]
    b = [sum(b_scores[i] for i in ix) / len(ix) for ix in groups.values()]
    return list(groups), a, b


def cmd_compare(a) -> None:
    from ..datasets.records import DataError
    from .results import TaskResult, write_results
    from ..core.stats import bootstrap_ci, paired_gain_ci, win_rate

    if a.n_boot < MIN_BOOT:
        sys.exit(f"--n-boot must be at least {MIN_BOOT}, got {a.n_boot}")
    a_root, a_entries, a_report = parse_rows(a.a, a.bad_rows)
    b_root, b_entries, b_report = parse_rows(a.b, a.bad_rows)
    aligned_pairs(a_entries, b_entries, a_root, b_root)
    a_images, b_images = load_images(a_entries, a_report, a.bad_rows), load_images(b_entries, b_report, a.bad_rows)
    both = [x is not None and y is not None for x, y in zip(a_images, b_images)]
    a_images = [im if ok else None for im, ok in zip(a_images, both)]
    b_images = [im if ok else None for im, ok in zip(b_images, both)]
    scorer = _scorer(a)
    sa = _score_entries(scorer, a_entries, a_images, a.batch_size)
    sb = _score_entries(scorer, b_entries, b_images, a.batch_size)
    rows = [{"prompt": x["prompt"], "seed": x["seed"], "file_name_a": x["file_name"], "file_name_b": y["file_name"],
             "score_a": u, "score_b": v} for x, y, u, v in zip(a_entries, b_entries, sa, sb) if u is not None]
    if not rows:
        raise DataError(f"no row could be scored in both {a_root} and {b_root}")
    prompts, pa, pb = per_prompt_means([r["prompt"] for r in rows], [r["score_a"] for r in rows],
                                       [r["score_b"] for r in rows])
    wr = win_rate(pa, pb, a.n_boot, a.seed)
    diff, dlo, dhi = paired_gain_ci(pa, pb, a.n_boot, a.seed)
    means = {k: bootstrap_ci(v, a.n_boot, a.seed) for k, v in (("a", pa), ("b", pb))}
    task = TaskResult({"win_rate": wr["win_rate"], "mean_diff": diff}, {"win_rate": True, "mean_diff": True},
                      n_original=len(both), n_effective=len(rows),
                      config={"a": str(a_root), "b": str(b_root), "scorer": a.scorer, "bad_rows": a.bad_rows},
                      samples=rows,
                      extra={"wins": wr["wins"], "ties": wr["ties"], "losses": wr["losses"],
                             "win_rate_ci95": wr["ci95"], "mean_diff_ci95": [dlo, dhi],
                             "mean_a": list(means["a"]), "mean_b": list(means["b"]), "n_prompts": len(prompts),
                             "unit": "prompt (scores averaged over its seeds)", "n_boot": a.n_boot,
                             "boot_seed": a.seed, "rows_a": a_report.to_dict(), "rows_b": b_report.to_dict()})
    out = write_results(a.out or b_root / f"compare_{a.scorer}.json", {f"compare_{a.scorer}": task},
                        model=str(a.model), provenance=scorer.provenance)
    skipped = len(both) - len(rows)
    print(f"{a.scorer}: A = {a_root}  B = {b_root}  ({len(rows)} pairs, {len(prompts)} prompts, {skipped} skipped)")
    print(f"{'':8}{'mean':>10}  95% CI")
    for name, (m, lo, hi) in (("A", means["a"]), ("B", means["b"]), ("A - B", (diff, dlo, dhi))):
        print(f"{name:8}{m:>10.4f}  [{lo:.4f}, {hi:.4f}]")
    print(f"A vs B  W/T/L {wr['wins']}/{wr['ties']}/{wr['losses']}  win rate {wr['win_rate']:.3f} "
          f"[{wr['ci95'][0]:.3f}, {wr['ci95'][1]:.3f}]")
    print(f"results: {out}")


def _scorer_args(p) -> None:
    p.add_argument("--scorer", choices=SCORER_CHOICES, default="clipscore")
    p.add_argument("--model", default=str(SHIPPED_CLIP),
                   help="CLIP backbone: an open_clip model directory (open_clip_config.json + weights; default: "
                        "the shipped ShapeWorld CLIP), hf-hub:org/repo, or a weights file / pretrained tag with --arch "
                        "(for hpsv2: the HPS state dict)")
    p.add_argument("--arch", help="open_clip architecture name or model-config JSON for a weights file "
                                  "(default for a file: ViT-H-14 for hpsv2, ViT-L-14-quickgelu for aesthetic)")
    p.add_argument("--head", help="aesthetic: the MLP head state-dict file")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bad-rows", choices=["skip", "error"], default="skip",
                   help="a row with a missing/unreadable image or bad fields: counted skip, or an error")
    p.add_argument("--n-boot", type=int, default=2000, help=f"bootstrap resamples (at least {MIN_BOOT} for compare)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")


def register(esub) -> None:
    p = esub.add_parser("images", help="score a folder of samples with CLIPScore / PickScore / HPSv2 / aesthetic",
                        description="Score images listed in samples.jsonl (file_name, prompt, seed) and write a "
                                    "results file: mean with a bootstrap CI, per-sample scores, weight hashes.")
    p.add_argument("dir", help="folder with samples.jsonl (or a run's samples/ folder)")
    p.add_argument("--out", help="results file (default: DIR/eval_<scorer>.json)")
    _scorer_args(p)
    p.set_defaults(fn=cmd_images)

    p = esub.add_parser("compare", help="paired comparison of two sample folders (same prompts and seeds)",
                        description="Score two sample folders with the same prompts and seeds in the same order; "
                                    "A vs B W/T/L and win rate with a bootstrap CI over prompts, and the mean "
                                    "score difference A - B with its paired CI.")
    p.add_argument("a", help="sample folder A (the candidate)")
    p.add_argument("b", help="sample folder B (the baseline)")
    p.add_argument("--out", help="results file (default: B/compare_<scorer>.json)")
    _scorer_args(p)
    p.set_defaults(fn=cmd_compare)
