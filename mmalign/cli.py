"""The `mmalign` command."""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import textwrap
from pathlib import Path


def cmd_train(a) -> None:
    from .core.distributed import end_run_processes
    from .core.paths import check_paths
    from .core.registry import load_recipe, method_class
    from .core.trainer import train

    exp = load_recipe(a.config, a.overrides)
    if a.show_config:
        from .core.config_docs import describe_experiment

        print(describe_experiment(exp, method_class(exp.method).config_class))
        return
    check_paths(exp)  # before any model loads
    check_rows_fit_batch(exp)
    method = method_class(exp.method)(exp.args, exp.output_dir)
    summary = train(exp, method)
    print(json.dumps(summary, default=str))
    end_run_processes()


def cmd_export(a) -> None:
    from .core.export import export_run

    print(f"exported: {export_run(a.run, a.step, a.out)}")


def check_rows_fit_batch(exp) -> None:
    """Refuse, before any model loads, a data source with fewer rows than one global batch (counted without
    decoding; unknown counts, e.g. hub ids, are left to the trainer's own check)."""
    from .core.config import ConfigError
    from .datasets.row_count import count_rows

    data = getattr(exp.args, "data", None)
    path = getattr(data, "path", "")
    rows = count_rows(path) if path else (getattr(data, "shapeworld_clips", 0) or None)
    if rows is None:
        return
    if getattr(data, "random_flip", False):
        rows *= 2  # image SFT trains both orientations as rows
    world = int(os.environ.get("WORLD_SIZE", "1"))
    t = exp.train
    need = t.batch_size * t.grad_accum * world
    if rows < need:
        raise ConfigError(f"train.batch_size: {path or 'data.shapeworld_clips'} has at most {rows} rows, fewer than "
                          f"one global batch (train.batch_size {t.batch_size} x train.grad_accum {t.grad_accum} x "
                          f"{world} processes = {need}); lower train.batch_size or train.grad_accum")


def cmd_list(a) -> None:
    from .core.registry import ALIASES, METHODS, recipes

    print("methods (recipe key `method:`):")
    for name, target in METHODS.items():
        aliases = [k for k, v in ALIASES.items() if v == name]
        print(f"  {name:26s} {target}" + (f"  (alias: {', '.join(aliases)})" if aliases else ""))
    found = recipes()
    print("recipes (mmalign train <recipe> key=value ...):" if found else "recipes: none (no configs/ folder here)")
    for path, name in found:
        print(f"  {path:48s} {name}")


def cmd_data_shapeworld(a) -> None:
    from .datasets.shapeworld.export import write_dataset

    info = write_dataset(a.out, a.n, seed=a.seed, resolution=a.resolution,
                         split=None if a.split == "all" else a.split, vqa_per_scene=a.vqa_per_scene,
                         videos=a.videos)
    print(json.dumps(info))


def cmd_data_pairs(a) -> None:
    from diffusers import StableDiffusionPipeline

    from .datasets.shapeworld import sample_scenes
    from .diffusion.onpolicy import get_scorer, make_onpolicy_pairs

    if a.prompts_file:
        prompts = [ln.strip() for ln in Path(a.prompts_file).read_text().splitlines() if ln.strip()]
    else:
        prompts = [s.caption for s in sample_scenes(a.seed, a.n, split="train")]
    pipe = StableDiffusionPipeline.from_pretrained(a.model, safety_checker=None, requires_safety_checker=False)
    info = make_onpolicy_pairs(pipe, prompts, a.per_prompt, a.out, get_scorer(a.scorer), seed=a.seed,
                               steps=a.steps, guidance=a.guidance, pairing=a.pairing,
                               min_winner_score=a.min_winner_score)
    print(json.dumps({k: info[k] for k in ("prompts", "pairs", "mean_score", "seconds")}))


def cmd_data_best_of_n(a) -> None:
    from .datasets.vl_records import read_vl_conversations, write_vl_conversations_jsonl
    from .mllm.models import load_vlm
    from .mllm.rejection import SCORERS, best_of_n, prompts_from_conversations

    records, report = read_vl_conversations(a.prompts, bad_rows=a.bad_rows)
    model, processor = load_vlm(a.model)
    rows, summary = best_of_n(model, processor, prompts_from_conversations(records), a.n, SCORERS[a.scorer],
                              temperature=a.temperature, seed=a.seed, max_new_tokens=a.max_new_tokens,
                              min_score=a.min_score)
    path = write_vl_conversations_jsonl(a.out, rows)
    info = {"written": str(path), "data": report.to_dict(), **summary.to_dict()}
    (Path(a.out) / "best_of_n.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


def cmd_demo(a) -> None:
    from .core.registry import PAIR_METHOD_NAMES, canonical_name
    from .demo.diffusion import DemoSettings, comparison_table, format_results, run_demo
    from .demo.evals import diffusion_evals, mllm_evals, write_demo_report

    parts = [p for p in a.parts.split(",") if p]
    unknown = sorted(set(parts) - {"diffusion", "mllm", "video", "online"})
    if unknown or not parts:
        sys.exit(f"error: --parts: unknown part(s) {unknown}; use diffusion, mllm, video, online (comma-separated)")
    if "mllm" in parts:  # refuse a bad MLLM model before the long diffusion part
        from .demo.mllm import MLLMDemoSettings, format_mllm_results, run_mllm_demo
        if not Path(a.mllm_model).is_dir():
            sys.exit(f"error: --mllm-model: {a.mllm_model} is not a model directory")
    if "diffusion" in parts:
        methods = {"none": (), "all": PAIR_METHOD_NAMES}.get(a.methods)
        if methods is None:  # aliases (inpo) resolve to the registered names, which name the run folders
            methods = tuple(canonical_name(m) for m in a.methods.split(",") if m)
        bad = [o for o in a.set if "=" not in o]
        if bad:
            sys.exit(f"error: --set: expected KEY=VALUE, got {bad}")
        settings = DemoSettings(n=a.n, split=a.split, steps=a.steps, guidance=a.guidance, methods=methods,
                                pair_prompts=a.pair_prompts, per_prompt=a.per_prompt, train_steps=a.train_steps,
                                rounds=a.rounds, min_winner_score=a.min_winner_score, overrides=tuple(a.set),
                                fresh_pairs=a.fresh_pairs)
        results = run_demo(a.out, model=a.model, settings=settings)
        print(format_results(results))
        if len(methods) > 1:
            print(comparison_table(results))
        print(f"results: {Path(a.out) / 'results.json'}  grid: {Path(a.out) / 'grid.png'}")
        if methods and not a.no_evals:
            diffusion_evals(Path(a.out), methods)
    if "mllm" in parts:
        mllm = run_mllm_demo(Path(a.out) / "mllm", model=a.mllm_model,
                             settings=MLLMDemoSettings(train_steps=a.mllm_train_steps, split=a.split,
                                                       recipe=a.mllm_recipe, balance=a.mllm_balance))
        print(format_mllm_results(mllm))
        print(f"results: {Path(a.out) / 'mllm' / 'results.json'}")
        if not a.no_evals:
            for path in mllm_evals(Path(a.out) / "mllm"):
                print(f"MM-Vet-style results (rule judge): {path}")
    if "video" in parts:  # not in the default: it does not fit the demo's 10-minute budget on 2 CPU cores
        from .demo.video import format_video_results, run_video_demo
        video = run_video_demo(Path(a.out))
        print(format_video_results(video))
    if "online" in parts:  # opt-in: GRPO runs take about 40 minutes each on 2 CPU cores
        from .demo.online import OnlineDemoSettings, format_online_results, run_online_demo
        online = run_online_demo(Path(a.out), model=a.model, settings=OnlineDemoSettings(
            n=a.n, split=a.split, steps=a.steps, guidance=a.guidance, train_steps=a.online_steps))
        print(format_online_results(online))
    if not a.no_evals:
        print(f"report: {write_demo_report(Path(a.out))}")


SCORER_NAMES = ("exact_match", "shapeworld_vqa")  # mmalign.mllm.rejection.SCORERS, without importing torch


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default (unless None, a flag's, or already in its help) and keeps a description's
    line breaks, wrapping only lines that are too long."""

    def _shows_default(self, action) -> bool:
        return (action.default not in (None, "", False, argparse.SUPPRESS) and action.nargs != 0
                and (bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)))

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if not self._shows_default(action) or "%(default)" in text or "(default" in text.lower():
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"

    def _format_action(self, action):
        if not action.help and self._shows_default(action):  # no help text: still show the default
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)

    def _fill_text(self, text, width, indent):
        lines = []
        for line in text.splitlines():
            own = re.match(r"\s*", line).group()  # an indented line (a command) continues further in
            lead = indent + own
            lines.append(textwrap.fill(line.strip(), width, initial_indent=lead,
                                       subsequent_indent=lead + ("    " if own else ""))
                         if line.strip() else "")
        return "\n".join(lines)


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser with HelpFormatter; every nested verb inherits it (add_subparsers uses the class)."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


TRAIN_DESCRIPTION = """Train a method from a YAML recipe.

Methods and shipped recipes: mmalign list
Override any key with dotted key=value pairs (values read as YAML):
  mmalign train configs/x.yaml train.lr=5e-5 data.path=my_pairs.jsonl
Every key of the recipe's method with its value, default, range and doc:
  mmalign train --show-config configs/x.yaml [key=value ...]"""


def build_parser() -> argparse.ArgumentParser:
    from .assets import SHAPEWORLD_LLAVA, SHAPEWORLD_SD

    ap = Parser(prog="mmalign", description="Preference alignment workbench for multimodal models.")
    ap.add_argument("--debug", action="store_true",
                    help="show the Python traceback of a configuration, data or evaluation error")
    sub = ap.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("train", help="train a method from a YAML recipe (mmalign list: methods and recipes)",
                       description=TRAIN_DESCRIPTION)
    p.add_argument("config", help="recipe YAML (mmalign list shows the shipped ones under configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys (train.lr=1e-5)")
    p.add_argument("--show-config", action="store_true",
                   help="print every key of the recipe's method config (after the overrides) with its default, "
                        "valid values and doc, and exit without training")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("export", help="export a run's checkpoint (intermediate steps) like its final/",
                       description="Write the policy of a run's checkpoint with the method's own exporter, as the "
                                   "run writes final/ (pipeline, LoRA, adapter or model): sample or evaluate it.")
    p.add_argument("run", help="the run's output_dir (holds config.yaml and checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--out", default=None, help="output folder (default: <run>/export-step-N)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("list", help="list the training methods and the shipped recipes",
                       description="The methods a recipe's `method:` key can name, and the recipes under configs/.")
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser("data", help="make or convert datasets")
    dsub = p.add_subparsers(dest="what", required=True)
    q = dsub.add_parser("shapeworld", help="write a ShapeWorld dataset (imagefolder + VQA + videos)",
                        description="Write a ShapeWorld dataset in the on-disk format user data uses.")
    q.add_argument("--out", required=True, help="output folder (metadata.jsonl + images)")
    q.add_argument("--n", type=int, required=True, help="number of scenes")
    q.add_argument("--seed", type=int, default=0, help="scene seed")
    q.add_argument("--resolution", type=int, default=32, help="image side in pixels")
    q.add_argument("--split", choices=["train", "heldout", "validation", "test", "all"], default="train",
                   help="caption split (held-out captions never appear in 'train'; 'validation' and 'test' are "
                        "the two halves of 'heldout')")
    q.add_argument("--vqa-per-scene", type=int, default=0, help="VQA items per scene (0: none)")
    q.add_argument("--videos", type=int, default=0, help="number of motion clips (GIF)")
    q.set_defaults(fn=cmd_data_shapeworld)

    q = dsub.add_parser("pairs", help="on-policy preference pairs: sample N per prompt, score, best vs worst",
                        description="Sample a pipeline N times per prompt with fixed seeds, score every sample, and "
                                    "write best-vs-worst pairs in the Pick-a-Pic format (jsonl + images).")
    q.add_argument("--out", required=True, help="output folder (metadata.jsonl + images/)")
    q.add_argument("--model", default=str(SHAPEWORLD_SD), help="pipeline directory or hub id")
    q.add_argument("--prompts-file", help="one prompt per line (default: ShapeWorld training-split captions)")
    q.add_argument("--n", type=int, default=256, help="ShapeWorld prompts when no --prompts-file")
    q.add_argument("--per-prompt", type=int, default=4, help="samples per prompt (the candidates of its pairs)")
    q.add_argument("--pairing", choices=["best_worst", "all"], default="best_worst",
                   help="one best-vs-worst pair per prompt, or every two samples whose scores differ")
    q.add_argument("--min-winner-score", type=float, default=None,
                   help="keep pairs whose winner scores at least this (shapeworld: 2.0 = fully correct)")
    q.add_argument("--scorer", default="shapeworld", help="scorer of the samples (mmalign.diffusion.onpolicy)")
    q.add_argument("--seed", type=int, default=0, help="prompt seed and first sample seed")
    q.add_argument("--steps", type=int, default=15, help="DDIM sampling steps")
    q.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    q.set_defaults(fn=cmd_data_pairs)

    q = dsub.add_parser("best-of-n", help="rejection sampling: N answers per prompt from a VLM, keep the best "
                        "(conversations for mllm_sft; repeat for RAFT)")
    q.add_argument("--model", required=True, help="model directory or hub id")
    q.add_argument("--prompts", required=True, help="conversations (jsonl / folder / parquet) ending in a reference answer")
    q.add_argument("--out", required=True, help="output folder (conversations jsonl + best_of_n.json)")
    q.add_argument("--n", type=int, default=4, help="answers sampled per prompt")
    q.add_argument("--scorer", choices=sorted(SCORER_NAMES), default="exact_match",
                   help="how an answer is scored against the reference answer")
    q.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    q.add_argument("--max-new-tokens", type=int, default=32, help="longest answer in tokens")
    q.add_argument("--min-score", type=float, default=None, help="leave out prompts whose best answer scores lower")
    q.add_argument("--seed", type=int, default=0, help="sampling seed")
    q.add_argument("--bad-rows", choices=["skip", "error"], default="skip",
                   help="a bad prompt row: skip it (counted) or stop with an error")
    q.set_defaults(fn=cmd_data_best_of_n)
    __import__("mmalign.evals.cli_mllm", fromlist=["register_data"]).register_data(dsub)

    __import__("mmalign.cli_sample", fromlist=["register"]).register(sub)  # top-level `mmalign sample`

    p = sub.add_parser("demo", help="ShapeWorld demo: base -> on-policy pairs -> DPO -> held-out gains",
                       description="Sample the shipped ShapeWorld base on held-out captions, build on-policy pairs, "
                                   "train preference methods, and compare on the same prompts and seeds.")
    p.add_argument("--out", default="runs/demo", help="output folder (results.json, grid.png, runs, report.html)")
    p.add_argument("--model", default=str(SHAPEWORLD_SD), help="the diffusion base: pipeline directory")
    p.add_argument("--methods", default="diffusion_dpo",
                   help="comma-separated pair methods (aliases such as inpo work), 'all' (the comparison table) "
                        "or 'none' (base only); each trains from configs/shapeworld_<method>.yaml")
    p.add_argument("--n", type=int, default=512, help="held-out prompts (one sample each)")
    p.add_argument("--split", choices=("test", "validation"), default="test",
                   help="held-out half evaluated (both parts): 'test' for reported numbers, 'validation' for "
                        "choosing settings (calibration)")
    p.add_argument("--steps", type=int, default=15, help="DDIM steps of the held-out samples")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale of every sample")
    p.add_argument("--pair-prompts", type=int, default=256, help="training prompts of the on-policy pairs")
    p.add_argument("--per-prompt", type=int, default=4, help="samples per pair prompt (best vs worst)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="optimizer steps of each method (per round); default: each recipe's train.max_steps")
    p.add_argument("--rounds", type=int, default=1,
                   help="on-policy rounds: each later round samples new pairs from the previous round's model "
                        "and trains from it")
    p.add_argument("--min-winner-score", type=float, default=None,
                   help="keep only pairs whose winner scores at least this (2.0: the whole caption is right)")
    p.add_argument("--fresh-pairs", action="store_true",
                   help="sample the first round's pairs even when the shipped set holds the same ones "
                        "(mmalign/assets/shapeworld_pairs: used only for the shipped base and these pair settings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for every diffusion method, e.g. objective.beta=2000 (repeatable)")
    p.add_argument("--parts", default="diffusion,mllm",
                   help="which parts to run, comma-separated: diffusion, mllm, video, online (video and online "
                        "are opt-in: video adds about 15 minutes on 2 CPU cores, online (GRPO with the exact "
                        "scorer, then with CLIPScore, as rewards) about 40 minutes per run at 150 steps)")
    p.add_argument("--online-steps", type=int, default=150,
                   help="optimizer steps of each online GRPO run (the recipe takes two per rollout: 150 = 75 "
                        "rollouts)")
    p.add_argument("--mllm-model", default=str(SHAPEWORLD_LLAVA), help="the MLLM part's base: model directory")
    p.add_argument("--mllm-train-steps", type=int, default=300, help="optimizer steps of the MLLM part's DPO")
    p.add_argument("--mllm-recipe", default="shapeworld_mllm_dpo",
                   help="configs/<recipe>.yaml the MLLM part trains from (shapeworld_mllm_dpo, _mmdpo, _mdpo)")
    p.add_argument("--mllm-balance", choices=["none", "mirror"], default="none",
                   help="mirror: keep as many 'a over b' answer pairs as 'b over a' per capability, so DPO cannot "
                        "gain by shifting the answer prior (benchmarks/RESULTS.md)")
    p.add_argument("--no-evals", action="store_true",
                   help="skip the evaluator pass (CLIPScore comparisons, MM-Vet-style results) and report.html")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("eval", help="score images, compare runs, benchmark vision-language models")
    esub = p.add_subparsers(dest="what", required=True)
    # Each evaluation module adds its verbs here with one register(...) call; keep their imports torch-free.
    __import__("mmalign.evals.cli_video", fromlist=["register"]).register(esub)
    __import__("mmalign.evals.cli_images", fromlist=["register"]).register(esub)
    __import__("mmalign.evals.report", fromlist=["register"]).register(sub)  # top-level `mmalign report`
    __import__("mmalign.evals.cli_mllm", fromlist=["register"]).register(esub)
    # (verbs under `mmalign data` and top-level verbs such as `report` register the same way, below.)
    return ap


def main(argv: list[str] | None = None) -> None:
    from .core.config import ConfigError
    from .datasets.records import DataError
    from .evals.errors import EvalError

    for stream in (sys.stdout, sys.stderr):  # status lines appear as they happen, also when redirected to a file
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    a = build_parser().parse_args(argv)
    try:
        a.fn(a)
    except (ConfigError, DataError, EvalError, FileNotFoundError) as e:  # the user's settings, paths, data
        if a.debug:
            raise
        sys.exit(f"error: {e}")
    except BrokenPipeError:  # the reader went away (`mmalign list | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
