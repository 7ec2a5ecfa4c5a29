#!/usr/bin/env python3
"""Train the tiny ShapeWorld LLaVA from scratch by SFT on ShapeWorld VQA and save it with `save_pretrained`.

1. Build the randomly initialised model + processor from the architecture file (mmalign.mllm.tiny).
2. Write single-turn VQA conversations about training-split scenes (image + question -> the exact short
   answer; "Describe the image." -> the caption), a fraction of the images degraded, with
   `write_vl_conversations_jsonl`.
3. Train every part (vision tower, projector, LM) with MLLMSFT through mmalign.core.trainer.train.
4. Save the final model + processor to --out and grade greedy answers on held-out scenes (captions never
   seen in training) per capability; write summary.json and train_log.jsonl next to the model.

    python scripts/train_shapeworld_llava.py --out mmalign/assets/shapeworld_llava

scripts/build_shapeworld_llava.sh holds the exact command that built the shipped model. The model is meant
to be good but not perfect, so preference alignment has room to improve it.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from mmalign.core.config import Experiment, TrainConfig
from mmalign.core.trainer import train
from mmalign.datasets.shapeworld import degrade, render_scene, sample_scenes
from mmalign.datasets.shapeworld.vqa import make_vqa
from mmalign.datasets.vl_records import write_vl_conversations_jsonl
from mmalign.mllm.models import VLModelConfig
from mmalign.mllm.sft import MLLMSFT, VLConversationDataConfig, VLSFTConfig
from mmalign.mllm.shapeworld import (answer_messages, evaluate_vqa, format_table, question_messages,
                                     vqa_benchmark)
from mmalign.mllm.tiny import build_tiny_llava, load_architecture

ROOT = Path(__file__).resolve().parents[1]
HELDOUT_SEED = 10_000  # the held-out benchmark's seed (scenes from split="heldout")


def training_rows(seed: int, n_scenes: int, per_scene: int, degrade_frac: float, image_size: int):
    """(images, messages, meta) per VQA item of training-split scenes; one image per conversation."""
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    for k, scene in enumerate(sample_scenes(seed, n_scenes, split="train")):
        clean = render_scene(scene, image_size)
        for item in make_vqa(scene, rng, per_scene):
            degraded = rng.random() < degrade_frac
            image = degrade(clean, np_rng) if degraded else clean
            yield ([image], question_messages(item.question) + answer_messages(item.answer),
                   {"capability": item.capability, "scene": k, "degraded": degraded})


def portable(args: dict) -> dict:
    """Arguments with paths inside the repository written relative to it (for the committed summary)."""
    def rel(v):
        if isinstance(v, str) and Path(v).resolve().is_relative_to(ROOT):
            return str(Path(v).resolve().relative_to(ROOT))
        return v
    return {k: rel(v) for k, v in args.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "mmalign/assets/shapeworld_llava"))
    ap.add_argument("--work", default=str(ROOT / "runs/shapeworld_llava_work"), help="data, checkpoints, trainer logs")
    ap.add_argument("--arch", default=str(ROOT / "configs/models/shapeworld_llava_tiny.yaml"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenes", type=int, default=4000, help="training-split scenes")
    ap.add_argument("--per-scene", type=int, default=6, help="questions per scene")
    ap.add_argument("--degrade-frac", type=float, default=0.3, help="share of training images degraded")
    ap.add_argument("--steps", type=int, default=7000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"])
    ap.add_argument("--eval-scenes", type=int, default=300, help="held-out scenes for the final evaluation")
    ap.add_argument("--eval-per-scene", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest on a shared 2-core CPU")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out, work = Path(a.out), Path(a.work)
    if work.exists():
        shutil.rmtree(work)  # a fresh run every time: no resuming into stale data
    work.mkdir(parents=True)
    t0 = time.time()

    arch = load_architecture(a.arch)
    model, processor = build_tiny_llava(arch, seed=a.seed)
    model.save_pretrained(work / "init")
    processor.save_pretrained(work / "init")
    rows = list(training_rows(a.seed + 1, a.scenes, a.per_scene, a.degrade_frac, arch["image_size"]))
    write_vl_conversations_jsonl(work / "data", rows)
    t_data = time.time() - t0
    print(json.dumps({"phase": "data", "conversations": len(rows), "s": round(t_data, 1)}), flush=True)

    cfg = VLSFTConfig(model=VLModelConfig(pretrained=str(work / "init"), train_vision=True, train_projector=True),
                      data=VLConversationDataConfig(path=str(work / "data")))
    tcfg = TrainConfig(lr=a.lr, max_steps=a.steps, batch_size=a.batch, lr_scheduler=a.schedule,
                       warmup_steps=a.warmup, seed=a.seed, log_every=50, resume="never", weight_decay=0.01)
    t1 = time.time()
    result = train(Experiment(method="mllm_sft", output_dir=str(work / "train"), train=tcfg, args=cfg),
                   MLLMSFT(cfg, str(work / "train")))
    t_train = time.time() - t1

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(work / "train" / "final", out)
    shutil.copy(work / "train" / "metrics.jsonl", out / "train_log.jsonl")

    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    bench = vqa_benchmark(HELDOUT_SEED, a.eval_scenes, a.eval_per_scene, split="heldout")
    res = evaluate_vqa(model, processor, bench)
    print(format_table(res), flush=True)
    summary = {
        "args": portable(vars(a)), "conversations": len(rows), "final_loss": result["metrics"].get("loss"),
        "seconds": {"data": round(t_data, 1), "train": round(t_train, 1), "total": round(time.time() - t0, 1)},
        "heldout": {"seed": HELDOUT_SEED, "scenes": a.eval_scenes, "per_scene": a.eval_per_scene,
                    "items": len(bench), "overall": res["overall"], "macro": res["macro"],
                    "table": res["table"], "pope": res["pope"]},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("seconds", "final_loss")}), flush=True)


if __name__ == "__main__":
    main()
