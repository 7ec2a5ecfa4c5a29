#!/usr/bin/env python3
"""Train the tiny ShapeWorld CLIP (open_clip architecture) from scratch with a contrastive InfoNCE loss.

1. Render training-split ShapeWorld scenes (a fraction also degraded, as a small generator's samples look)
   and tokenize their captions with open_clip's CLIP BPE tokenizer (its vocabulary ships with open_clip).
2. Train image and text towers together. Several scenes share a caption, so the InfoNCE targets are
   multi-positive: row i's target spreads uniformly over the batch items whose caption equals caption i,
       L = ½ [CE(s·I·Tᵀ, Y) + CE(s·T·Iᵀ, Y)],  Y_ij = [c_i = c_j] / Σ_k [c_i = c_k],  s = exp(logit_scale).
3. Save an open_clip model directory (open_clip_config.json + fp16 safetensors, loaded back as fp32),
   reload it through mmalign.evals.clip_backbone.load_backbone, and measure held-out retrieval
   (mmalign.evals.retrieval.shapeworld_retrieval); write summary.json, train_log.jsonl and README.md.

    python scripts/train_shapeworld_clip.py --out mmalign/assets/shapeworld_clip

scripts/build_shapeworld_clip.sh holds the exact command that built the shipped model.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from mmalign.datasets.shapeworld import degrade, render_scene, sample_scenes
from mmalign.evals.clip_backbone import build_clip, load_backbone, save_backbone
from mmalign.evals.retrieval import shapeworld_retrieval

MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 64, "layers": 3, "head_width": 16, "mlp_ratio": 2},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2, "mlp_ratio": 2},
}
PREPROCESS_CFG = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}


def render_data(seed: int, n: int, size: int):
    """uint8 images (N, H, W, 3) clean and degraded, caption ids (N,), the distinct captions."""
    scenes = sample_scenes(seed, n, split="train")
    rng = np.random.default_rng(seed)
    clean, dirty = [], []
    for s in scenes:
        im = render_scene(s, size)
        clean.append(np.asarray(im))
        dirty.append(np.asarray(degrade(im, rng)))
    captions = sorted({s.caption for s in scenes})
    index = {c: i for i, c in enumerate(captions)}
    return np.stack(clean), np.stack(dirty), torch.tensor([index[s.caption] for s in scenes]), captions


def normalise(batch_u8: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float, the same arithmetic as ToTensor + Normalize."""
    x = torch.from_numpy(batch_u8).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(PREPROCESS_CFG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS_CFG["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def multi_positive_infonce(img: torch.Tensor, txt: torch.Tensor, caption_ids: torch.Tensor,
                           scale: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The loss in the module docstring on L2-normalised (B, D) features; also the in-batch i->t accuracy."""
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    logits = scale * img @ txt.T
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    acc = same.gather(1, logits.argmax(1, keepdim=True)).mean().item()
    return loss, acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenes", type=int, default=20000)
    ap.add_argument("--degrade-frac", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-sets", type=int, default=16)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    size = MODEL_CFG["vision_cfg"]["image_size"]
    clean, dirty, cap_ids, captions = render_data(a.seed, a.scenes, size)
    tokens = open_clip.SimpleTokenizer(context_length=MODEL_CFG["text_cfg"]["context_length"])(captions)
    print(f"{len(clean)} scenes, {len(captions)} distinct captions, rendered in {time.time() - t0:.0f}s", flush=True)

    model = build_clip(MODEL_CFG)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / a.warmup) * 0.5 *
                                              (1 + math.cos(math.pi * min(s, a.steps) / a.steps)))
    gen = torch.Generator().manual_seed(a.seed)
    log = open(out / "train_log.jsonl", "w")
    model.train()
    t_train = time.time()
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, len(clean), (a.batch,), generator=gen)
        use_dirty = torch.rand(a.batch, generator=gen) < a.degrade_frac
        pix = np.where(use_dirty.numpy()[:, None, None, None], dirty[idx.numpy()], clean[idx.numpy()])
        ids = cap_ids[idx]
        img = model.encode_image(normalise(pix), normalize=True)
        txt = model.encode_text(tokens[ids], normalize=True)
        loss, acc = multi_positive_infonce(img, txt, ids, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == a.steps:
            row = {"step": step, "loss": round(loss.item(), 4), "batch_i2t_acc": round(acc, 4),
                   "logit_scale": round(model.logit_scale.exp().item(), 3), "lr": sched.get_last_lr()[0],
                   "seconds": round(time.time() - t_train, 1)}
            log.write(json.dumps(row) + "\n")
            log.flush()
            if step % 250 == 0 or step == a.steps:
                print(json.dumps(row), flush=True)
    train_seconds = time.time() - t_train

    save_backbone(model.eval(), MODEL_CFG, out, PREPROCESS_CFG, dtype=torch.float16)
    backbone = load_backbone(out)  # evaluate what ships: the fp16 file read back as fp32
    retrieval = {"clean": shapeworld_retrieval(backbone, n_sets=a.eval_sets),
                 "degraded": shapeworld_retrieval(backbone, n_sets=a.eval_sets, degraded=True)}
    summary = {"args": vars(a), "model_cfg": MODEL_CFG, "distinct_train_captions": len(captions),
               "parameters": sum(p.numel() for p in model.parameters()), "train_seconds": round(train_seconds),
               "total_seconds": round(time.time() - t0), "final_loss": row["loss"],
               "weights_sha256": backbone.provenance["weights_sha256"], "heldout_retrieval": retrieval}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "README.md").write_text(model_card(summary))
    print(json.dumps(retrieval, indent=1))


def model_card(s: dict) -> str:
    r = s["heldout_retrieval"]
    rows = "\n".join(f"| {k} | {v['image_to_text']['top1']:.3f} {v['image_to_text']['ci95']} | "
                     f"{v['text_to_image']['top1']:.3f} {v['text_to_image']['ci95']} |" for k, v in r.items())
    c = r["clean"]
    kinds = ", ".join(f"{k} {v:.3f}" for k, v in c["image_to_text"]["by_kind"].items())
    return f"""# Tiny ShapeWorld CLIP (open_clip)

A {s['parameters'] / 1e6:.2f} M-parameter open_clip `CLIP` (ViT image tower on 32 px, patch 4; 2-layer text
transformer; 64-d joint space) trained from scratch on ShapeWorld training-split scenes and captions with a
multi-positive InfoNCE loss ({s['args']['steps']} steps of batch {s['args']['batch']}, {s['train_seconds']} s on
{s['args']['threads']} CPU thread(s)). Text goes through open_clip's own CLIP BPE tokenizer (49,408 tokens,
context 16), so it loads offline with no hub. Weights are stored as float16 and loaded as float32.

Files: `open_clip_config.json` (model_cfg + preprocess_cfg), `open_clip_model.safetensors`, `summary.json`,
`train_log.jsonl`. Load with `mmalign.evals.clip_backbone.load_backbone(dir)` or
`open_clip.create_model("local-dir:<dir>")` + `open_clip.get_tokenizer("local-dir:<dir>")`.
weights sha256: `{s['weights_sha256']}`

## Held-out retrieval
Top-1 accuracy among {c['set_size']}-way candidate sets of held-out captions (never seen in training; distinct
within a set), {c['n_sets']} sets (seed {c['seed']}), 95 % bootstrap CI over items; chance = {c['chance']:.4f}.
Computed by `mmalign.evals.retrieval.shapeworld_retrieval`.

| images | image -> text | text -> image |
|---|---|---|
{rows}

## Rebuild
`scripts/build_shapeworld_clip.sh`, i.e.
`python scripts/train_shapeworld_clip.py {' '.join(f"--{k.replace('_', '-')} {v}" for k, v in s['args'].items())}`

Limits: a toy evaluator for the ShapeWorld demo. It knows only ShapeWorld's words and 32 px flat shapes;
image->text accuracy by caption kind (clean images): {kinds}. It is not a general image-text model.
"""


if __name__ == "__main__":
    main()
