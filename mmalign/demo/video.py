"""The video demo on ShapeWorld: the shipped image base inflated with the shipped motion adapter -> on-policy
clips for motion captions ("a red circle moving left") -> best-vs-worst pairs by the exact motion scorer
(`score_motion`) -> Video Diffusion-DPO on the motion modules -> base vs aligned on held-out captions and seeds:
direction accuracy and frame consistency with paired bootstrap CIs, GIFs, samples.jsonl and results.json (kind
"video_demo": tasks shapeworld_motion_base / _aligned / _gain, CIs in extra). Video-DPO trains from
configs/shapeworld_video_dpo.yaml (see demo.load_demo_recipe).

Held-out: a quarter of the motion captions (see `motion_captions`) never appears in the pairs; evaluation seeds
differ from the pair seeds. Frame consistency = mean of `score_motion`'s colour_consistent and shape_consistent
(the share of frames whose main object keeps the caption's colour / shape).
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..assets import SHAPEWORLD_MOTION, SHAPEWORLD_SD
from ..evals.demo_results import VIDEO_DEMO, unpack_video_demo
from . import load_demo_recipe

BASE_PIPELINE = SHAPEWORLD_SD
MOTION_ADAPTER = SHAPEWORLD_MOTION
EVAL_SEED = 40_000
PAIR_SEED = 50_000


@dataclass
class VideoDemoSettings:
    n_eval: int = 48  # held-out (caption, seed) clips, sampled by base and aligned
    pair_prompts: int = 24  # training-split captions (with repeats) sampled for pairs
    per_prompt: int = 4  # clips per pair prompt; best vs worst by motion_reward
    steps: int = 8  # DDIM steps for every sample
    guidance: float = 4.0
    train_steps: int = 30  # overrides the recipe's train.max_steps
    batch_size: int = 8  # overrides train.batch_size, capped by the number of pairs
    seed: int = 0  # the pair prompts' and seeds' offset, and train.seed


def motion_captions() -> tuple[list[str], list[str]]:
    """(training-split, held-out) motion captions: (colour i, shape j, direction k) is held out when
    (i + j + k) % 4 == 0 -- a quarter of the grammar, every direction and colour represented on both sides."""
    from ..datasets.shapeworld.scene import COLOURS, SHAPES
    from ..datasets.shapeworld.video import DIRECTIONS, motion_caption

    train, heldout = [], []
    for i, c in enumerate(COLOURS):
        for j, s in enumerate(SHAPES):
            for k, d in enumerate(DIRECTIONS):
                (heldout if (i + j + k) % 4 == 0 else train).append(motion_caption(c, s, d))
    return train, heldout


def motion_reward(scores: dict) -> float:
    """One number from `score_motion`: direction_ok + correct + displacement along the captioned direction
    (clipped to +-0.5, so near-misses rank above clips moving the wrong way) + 0.25 x each consistency."""
    along = max(-0.5, min(0.5, scores["displacement_along"]))
    return (scores["direction_ok"] + scores["correct"] + along
            + 0.25 * (scores["colour_consistent"] + scores["shape_consistent"]))


def frame_consistency(scores: dict) -> float:
    return 0.5 * (scores["colour_consistent"] + scores["shape_consistent"])


def _sample_and_score(pipe, prompts, seeds, s: VideoDemoSettings):
    from ..datasets.shapeworld.video import score_motion
    from ..video.sampling import sample_videos

    clips = sample_videos(pipe, prompts, seeds, num_frames=8, steps=s.steps, guidance=s.guidance)
    return clips, [score_motion(c, p) for c, p in zip(clips, prompts)]


def onpolicy_pairs(pipe, s: VideoDemoSettings) -> tuple[list, dict]:
    """(caption, preferred clip, rejected clip) per training prompt whose samples' rewards differ."""
    from ..diffusion.onpolicy import best_vs_worst

    train_caps, _ = motion_captions()
    rng = random.Random(PAIR_SEED + s.seed)
    prompts = [rng.choice(train_caps) for _ in range(s.pair_prompts)]
    flat = [p for p in prompts for _ in range(s.per_prompt)]
    seeds = [PAIR_SEED + s.seed * 10_000 + k for k in range(len(flat))]
    clips, scores = _sample_and_score(pipe, flat, seeds, s)
    rewards = [motion_reward(x) for x in scores]
    pairs, ties = [], 0
    for i, prompt in enumerate(prompts):
        k = slice(i * s.per_prompt, (i + 1) * s.per_prompt)
        pick = best_vs_worst(rewards[k])
        if pick is None:
            ties += 1
            continue
        b, w = (i * s.per_prompt + j for j in pick)
        pairs.append((prompt, clips[b], clips[w]))
    info = {"prompts": len(prompts), "per_prompt": s.per_prompt, "pairs": len(pairs), "no_preference": ties,
            "direction_acc_of_pair_samples": sum(x["direction_ok"] for x in scores) / len(scores)}
    return pairs, info


def _summary(scores: list[dict]) -> dict[str, list[float]]:
    return {"direction_acc": [float(x["direction_ok"]) for x in scores],
            "frame_consistency": [frame_consistency(x) for x in scores],
            "correct": [float(x["correct"]) for x in scores]}


def _write_samples(out: Path, models: dict, prompts, seeds) -> None:
    from ..datasets.video import write_gif

    with open(out / "samples.jsonl", "w") as f:
        for name, (clips, scores) in models.items():
            (out / "samples" / name).mkdir(parents=True, exist_ok=True)
            for i, (clip, sc) in enumerate(zip(clips, scores)):
                file_name = f"samples/{name}/{i:05d}.gif"
                write_gif(clip, out / file_name, frame_ms=120)
                f.write(json.dumps({"file_name": file_name, "prompt": prompts[i], "seed": seeds[i], "model": name,
                                    "scores": sc}) + "\n")


def run_video_demo(out, settings: VideoDemoSettings | None = None) -> dict:
    """Pairs -> Video-DPO -> held-out comparison; writes `<out>/video/` and returns the results dict.

    Measured with the defaults (one run per lr, each sharing a busy 2-core machine with other jobs, 1 thread):
    24 pairs; direction accuracy base 0.208 [0.104, 0.312] over 48 held-out clips; gain +0.042 [-0.062, +0.146]
    at lr 5e-4 and -0.021 [-0.083, +0.042] at lr 1e-4 -- neither significant; about 940 s wall each there
    (pairs 350, train 313, eval 275)."""
    from ..core.stats import bootstrap_ci, paired_gain_ci
    from ..core.trainer import train
    from ..datasets.video import write_video_pairs_jsonl
    from ..evals.results import TaskResult, write_results
    from ..video.methods import VideoDiffusionDPO
    from ..video.sampling import video_pipeline

    s = settings or VideoDemoSettings()
    out = Path(out) / "video"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    base = video_pipeline(BASE_PIPELINE, MOTION_ADAPTER)
    pairs, pair_info = onpolicy_pairs(base, s)
    if not pairs:
        raise RuntimeError(f"no on-policy pair had differing rewards ({pair_info}); raise pair_prompts/per_prompt")
    write_video_pairs_jsonl(out / "pairs", [(c, w, l, {}) for c, w, l in pairs])  # `mmalign train` can reuse them
    t_pairs = time.time() - t0

    run_dir = out / "train"
    exp = load_demo_recipe("shapeworld_video_dpo", {
        "model.pretrained": str(BASE_PIPELINE), "model.motion_adapter": str(MOTION_ADAPTER),
        "data.path": str(out / "pairs"), "output_dir": str(run_dir), "train.max_steps": s.train_steps,
        "train.batch_size": min(s.batch_size, len(pairs)), "train.seed": s.seed})
    summary = train(exp, VideoDiffusionDPO(exp.args, exp.output_dir, data=pairs))  # the pairs in memory
    t_train = time.time() - t0 - t_pairs

    _, heldout = motion_captions()
    prompts = [heldout[i % len(heldout)] for i in range(s.n_eval)]
    seeds = [EVAL_SEED + i for i in range(s.n_eval)]
    models = {"base": _sample_and_score(base, prompts, seeds, s),
              "aligned": _sample_and_score(video_pipeline(BASE_PIPELINE, run_dir / "final/motion_adapter"),
                                           prompts, seeds, s)}
    per = {name: _summary(scores) for name, (_, scores) in models.items()}
    results = {"settings": asdict(s), "pairs": pair_info, "train_metrics": summary["metrics"], "models": {},
               "gain": {}}
    for name, vals in per.items():
        results["models"][name] = {k: dict(zip(("mean", "lo", "hi"), bootstrap_ci(v, groups=prompts)))
                                   for k, v in vals.items()}
    for k in per["base"]:
        results["gain"][k] = dict(zip(("mean", "lo", "hi"), paired_gain_ci(per["aligned"][k], per["base"][k],
                                                                               groups=prompts)))
    results["seconds"] = {"pairs": round(t_pairs, 1), "train": round(t_train, 1),
                          "eval": round(time.time() - t0 - t_pairs - t_train, 1), "total": round(time.time() - t0, 1)}
    _write_samples(out, models, prompts, seeds)
    tasks = {f"shapeworld_motion_{name}": TaskResult(
        metrics={k: v["mean"] for k, v in results["models"][name].items()},
        higher_is_better={k: True for k in per[name]}, n_original=s.n_eval,
        config={"steps": s.steps, "guidance": s.guidance, "eval_seed": EVAL_SEED},
        extra={"ci95": {k: [v["lo"], v["hi"]] for k, v in results["models"][name].items()}},
        samples=[{"prompt": p, "seed": sd, **sc} for p, sd, sc in zip(prompts, seeds, models[name][1])])
        for name in models}
    tasks["shapeworld_motion_gain"] = TaskResult(
        metrics={k: v["mean"] for k, v in results["gain"].items()}, higher_is_better={k: True for k in per["base"]},
        n_original=s.n_eval, extra={"ci95": {k: [v["lo"], v["hi"]] for k, v in results["gain"].items()},
                                    "pairs": pair_info, "seconds": results["seconds"],
                                    "train_metrics": results["train_metrics"]})
    write_results(out / "results.json", tasks, model=str(BASE_PIPELINE),
                  model_args={"motion_adapter": str(MOTION_ADAPTER), "aligned": str(run_dir / "final")},
                  provenance={"settings": asdict(s), "pair_seed": PAIR_SEED, "eval_seed": EVAL_SEED}, kind=VIDEO_DEMO)
    return read_video_results(out.parent)  # what the file holds: the same dict


def read_video_results(out) -> dict:
    """The dict run_video_demo(out) returned, from `out/video/results.json`."""
    return unpack_video_demo(json.loads((Path(out) / "video" / "results.json").read_text()))


def format_video_results(results: dict) -> str:
    """A markdown table: base and aligned means with 95 % CIs and the paired gain per metric. `results`:
    run_video_demo's return, or read_video_results(its folder)."""
    lines = ["| metric | base | aligned | gain (95 % CI) |", "|---|---|---|---|"]
    for k, g in results["gain"].items():
        b, a = results["models"]["base"][k], results["models"]["aligned"][k]
        lines.append(f"| {k} | {b['mean']:.3f} [{b['lo']:.3f}, {b['hi']:.3f}] | {a['mean']:.3f} "
                     f"[{a['lo']:.3f}, {a['hi']:.3f}] | {g['mean']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}] |")
    p, sec = results["pairs"], results["seconds"]
    lines.append(f"\n{p['pairs']} on-policy pairs from {p['prompts']} prompts x {p['per_prompt']} clips; "
                 f"{results['settings']['train_steps']} Video-DPO steps; {sec['total']:.0f} s "
                 f"(pairs {sec['pairs']:.0f}, train {sec['train']:.0f}, eval {sec['eval']:.0f}).")
    return "\n".join(lines)
