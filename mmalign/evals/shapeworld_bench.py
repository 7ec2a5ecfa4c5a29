"""A ShapeWorld MM-Vet-style benchmark (`mmalign data shapeworld-bench`): held-out scenes and exact VQA written
as an `eval mllm` benchmark (bench.jsonl + images).

ShapeWorld VQA kinds -> MM-Vet capability tags (every kind needs recognising the shapes, hence "rec"):
colour, shape, existence -> rec; count -> rec + math (a numeric answer; MM-Vet itself files plain counting
under rec, so rec_math here means "counting"); spatial -> rec + spat; description -> rec + gen.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SHAPEWORLD_TAGS = {"colour": ["rec"], "shape": ["rec"], "existence": ["rec"], "count": ["rec", "math"],
                   "spatial": ["rec", "spat"], "description": ["rec", "gen"]}


@dataclass
class ShapeWorldBenchSettings:
    out: str | Path  # a new (or empty) folder
    n: int  # number of scenes
    per_scene: int = 6  # questions per scene (at most)
    seed: int = 0
    split: Literal["heldout", "validation", "test", "train", ""] = "heldout"  # caption split ('' = any)
    resolution: int = 32


def write_shapeworld_bench(s: ShapeWorldBenchSettings) -> dict:
    """Write bench.jsonl (capabilities are MM-Vet tags; type is the ShapeWorld kind the rule judge uses) and the
    scene images; returns {"bench": path, "questions": n, "images": n}."""
    from ..core.config import ConfigError
    from ..mllm.shapeworld import vqa_benchmark

    out = Path(s.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new folder")
    (out / "images").mkdir(parents=True)
    names, n = {}, 0
    with open(out / "bench.jsonl", "w") as f:
        for ex in vqa_benchmark(seed=s.seed, n_scenes=s.n, per_scene=s.per_scene, split=s.split or None,
                                image_size=s.resolution):
            key = json.dumps(ex.scene.to_dict(), sort_keys=True)
            if key not in names:
                names[key] = f"images/{len(names):05d}.png"
                ex.image.save(out / names[key])
            kind = ex.item.capability
            f.write(json.dumps({"id": f"sw{n:05d}", "question": ex.item.question, "image": names[key],
                                "answer": ex.item.answer, "capabilities": SHAPEWORLD_TAGS[kind],
                                "category": kind, "type": kind}) + "\n")
            n += 1
    return {"bench": str(out / "bench.jsonl"), "questions": n, "images": len(names)}
