"""Image-text retrieval on held-out ShapeWorld pairs: how well a CLIP backbone matches captions to images.

Protocol: sets of K held-out scenes (captions from the held-out split, never seen in training) with K
distinct captions per set. Image->text top-1: an image counts as correct when its own caption has the
strictly highest cosine similarity among the set's K captions; text->image top-1: a caption counts when its own image
ranks first among the set's K images. Chance is 1/K both ways. Accuracy is the mean over all items of all
sets, with a percentile-bootstrap 95 % CI over items.
"""
from __future__ import annotations

import numpy as np
import torch

from ..datasets.shapeworld import Scene, degrade, render_scene, sample_scenes
from ..core.stats import bootstrap_ci

RETRIEVAL_SEED = 40_000  # held-out scenes for retrieval (apart from the demo's and the VQA benchmark's seeds)


def top1_hits(image_emb: torch.Tensor, text_emb: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-item top-1 hits for row-aligned (K, D) embeddings (row i of each is pair i). With sim = I·Tᵀ,
    image i hits when sim[i, i] > sim[i, j] for every j ≠ i, text j when sim[j, j] > sim[i, j] for every
    i ≠ j (a tie is a miss, so a constant model scores 0, not the first index)."""
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"need two (K, D) embedding matrices of the same shape, got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    sim = image_emb.double() @ text_emb.double().T
    diag = sim.diagonal()
    others = sim.masked_fill(torch.eye(len(sim), dtype=torch.bool), -torch.inf)
    return (diag > others.amax(1)).numpy(), (diag > others.amax(0)).numpy()


def heldout_sets(n_sets: int, set_size: int = 64, seed: int = RETRIEVAL_SEED) -> list[list[Scene]]:
    """`n_sets` lists of `set_size` held-out scenes, the captions within a list distinct (a scene whose
    caption the current list already has is passed over)."""
    pool = iter(sample_scenes(seed, n_sets * set_size * 4, split="heldout"))
    sets = []
    for _ in range(n_sets):
        chosen, seen = [], set()
        for scene in pool:
            if scene.caption not in seen:
                chosen.append(scene)
                seen.add(scene.caption)
            if len(chosen) == set_size:
                break
        if len(chosen) < set_size:
            raise ValueError(f"not enough distinct held-out captions for {n_sets} sets of {set_size}")
        sets.append(chosen)
    return sets


def shapeworld_retrieval(backbone, n_sets: int = 8, set_size: int = 64, seed: int = RETRIEVAL_SEED,
                         image_size: int = 32, degraded: bool = False) -> dict:
    """Top-1 image->text and text->image accuracy of `backbone` (a ClipBackbone) on held-out ShapeWorld sets;
    `degraded` renders the images through `degrade` (seeded), as a small generator's samples look."""
    rng = np.random.default_rng(seed)
    i2t, t2i, kinds = [], [], []
    for scenes in heldout_sets(n_sets, set_size, seed):
        kinds += [s.kind for s in scenes]
        images = [render_scene(s, image_size) for s in scenes]
        if degraded:
            images = [degrade(im, rng) for im in images]
        hi, ht = top1_hits(backbone.image_embeddings(images), backbone.text_embeddings([s.caption for s in scenes]))
        i2t.append(hi)
        t2i.append(ht)
    out = {"n_sets": n_sets, "set_size": set_size, "seed": seed, "degraded": degraded, "chance": 1 / set_size}
    for name, hits in (("image_to_text", i2t), ("text_to_image", t2i)):
        mean, lo, hi = bootstrap_ci(np.concatenate(hits).astype(float))
        flat = np.concatenate(hits)
        by_kind = {k: round(float(flat[[kk == k for kk in kinds]].mean()), 4) for k in sorted(set(kinds))}
        out[name] = {"top1": round(mean, 4), "ci95": [round(lo, 4), round(hi, 4)], "by_kind": by_kind}
    return out
