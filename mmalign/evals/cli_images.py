"""`mmalign eval images` and `mmalign eval compare`: the namespace becomes settings for `evals.images`, whose
results are printed. Torch is imported only inside the commands."""
from __future__ import annotations

from .images import MIN_BOOT, SCORER_CHOICES, SHAPEWORLD_ALIAS


def scorer_settings(a):
    from .images import ScorerSettings

    return ScorerSettings(scorer=a.scorer, model=a.model, arch=a.arch, head=a.head, batch_size=a.batch_size,
                          bad_rows=a.bad_rows, n_boot=a.n_boot, seed=a.seed)


def _print_notice(task) -> None:
    if task.extra.get("model_notice"):
        print(f"note: {task.extra['model_notice']}")


def cmd_images(a) -> None:
    from .images import ImageEvalSettings, score_image_folder

    out, task, report = score_image_folder(ImageEvalSettings(a.dir, a.out, scorer_settings(a)))
    _print_notice(task)
    lo, hi = task.extra["ci95"]
    print(f"{a.scorer}: {task.extra['mean']:.4f} [{lo:.4f}, {hi:.4f}] ({task.extra['ci_unit']}; "
          f"{task.n_effective} images, {report.summary()})")
    print(f"results: {out}")


def cmd_compare(a) -> None:
    from .images import CompareSettings, compare_image_folders, format_comparison

    out, task = compare_image_folders(CompareSettings(a.a, a.b, a.out, scorer_settings(a)))
    _print_notice(task)
    print(format_comparison(task))
    print(f"results: {out}")


def _scorer_args(p) -> None:
    p.add_argument("--scorer", choices=SCORER_CHOICES, default="clipscore",
                   help="clipscore (100·max(cos, 0)); pickscore, hpsv2 and aesthetic need their published weights "
                        "(--model, and --head for aesthetic) and refuse to run without them")
    p.add_argument("--model", default=None,
                   help=f"CLIP backbone: an open_clip model directory (open_clip_config.json + weights), "
                        f"hf-hub:org/repo of one, a weights file or open_clip pretrained tag read with --arch, or "
                        f"'{SHAPEWORLD_ALIAS}' for the shipped ShapeWorld CLIP; unset, clipscore uses the shipped "
                        f"CLIP with a notice (meaningful only for ShapeWorld prompts)")
    p.add_argument("--arch", help="open_clip architecture name or model-config JSON for a weights file or tag "
                                  "(unset: ViT-H-14 for pickscore and hpsv2, ViT-L-14-quickgelu for aesthetic)")
    p.add_argument("--head", help="aesthetic: the LAION aesthetic predictor head (MLP state-dict file)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--bad-rows", choices=["skip", "error"], default="skip",
                   help="a row with a missing/unreadable image or bad fields: counted skip, or an error")
    p.add_argument("--n-boot", type=int, default=2000, help=f"bootstrap resamples (at least {MIN_BOOT} for compare)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")


def register(esub) -> None:
    p = esub.add_parser("images", help="score a folder of samples with CLIPScore / PickScore / HPSv2 / aesthetic",
                        description="Score images listed in samples.jsonl (file_name, prompt, seed) and write a "
                                    "results file: mean with a bootstrap 95 % CI over prompts (a prompt's images "
                                    "resampled together), per-sample scores, "
                                    "weight hashes.")
    p.add_argument("dir", help="folder with samples.jsonl (or a run's samples/ folder)")
    p.add_argument("--out", help="results file (default: DIR/eval_<scorer>.json)")
    _scorer_args(p)
    p.set_defaults(fn=cmd_images)

    p = esub.add_parser("compare", help="paired comparison of two sample folders (same prompts and seeds)",
                        description="Score two sample folders with the same prompts and seeds in the same order; "
                                    "A vs B W/T/L and win rate, and the mean score difference A - B, each with a "
                                    "paired bootstrap 95 % CI over prompts (a prompt's score is its seeds' mean).")
    p.add_argument("a", help="sample folder A (the candidate)")
    p.add_argument("b", help="sample folder B (the baseline)")
    p.add_argument("--out", help="results file (default: A/compare_<scorer>_vs_<B's folder name>.json, so several "
                                 "candidates against one baseline never overwrite each other)")
    _scorer_args(p)
    p.set_defaults(fn=cmd_compare)
