"""`mmalign eval images` and `mmalign eval compare`: the namespace becomes settings for `evals.images`, whose
results are printed. Torch is imported only inside the commands."""
from __future__ import annotations

from ..assets import SHAPEWORLD_CLIP as SHIPPED_CLIP
from .images import MIN_BOOT, SCORER_CHOICES


def scorer_settings(a):
    from .images import ScorerSettings

    return ScorerSettings(scorer=a.scorer, model=a.model, arch=a.arch, head=a.head, batch_size=a.batch_size,
                          bad_rows=a.bad_rows, n_boot=a.n_boot, seed=a.seed)


def cmd_images(a) -> None:
    from .images import ImageEvalSettings, score_image_folder

    out, task, report = score_image_folder(ImageEvalSettings(a.dir, a.out, scorer_settings(a)))
    lo, hi = task.extra["ci95"]
    print(f"{a.scorer}: {task.extra['mean']:.4f} [{lo:.4f}, {hi:.4f}] over {task.n_effective} images "
          f"({report.summary()})")
    print(f"results: {out}")


def cmd_compare(a) -> None:
    from .images import CompareSettings, compare_image_folders, format_comparison

    out, task = compare_image_folders(CompareSettings(a.a, a.b, a.out, scorer_settings(a)))
    print(format_comparison(task))
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
