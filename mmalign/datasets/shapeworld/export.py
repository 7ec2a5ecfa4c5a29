"""Write a ShapeWorld dataset in the on-disk formats a user's own data would use.

    out/
      metadata.jsonl   imagefolder captions: {"file_name": "images/000000.png", "text": ..., "scene": {...}}
      images/*.png
      vqa.jsonl        {"image": "images/000000.png", "question", "answer", "capability"}   (if vqa_per_scene)
      conversations.jsonl  the same VQA as TRL-format conversations {"images", "messages", "capability"}
      videos.jsonl     {"file_name": "videos/000000.gif", "text": ..., "direction"}      (if videos)
      videos/*.gif
      info.json        seed, counts, resolution, split
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from .render import render_scene
from .scene import sample_scenes
from .video import sample_clip, write_clip
from .vqa import make_vqa


def write_dataset(out: str | Path, n: int, seed: int = 0, resolution: int = 32, split: str | None = "train",
                  vqa_per_scene: int = 0, videos: int = 0, n_frames: int = 8) -> dict:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    (out / "images").mkdir(parents=True)
    scenes = sample_scenes(seed, n, split=split)
    rng = random.Random(seed + 1)
    n_vqa = 0
    with open(out / "metadata.jsonl", "w") as meta, open(out / "vqa.jsonl", "w") as vqa, \
            open(out / "conversations.jsonl", "w") as conv:
        for i, scene in enumerate(scenes):
            name = f"images/{i:06d}.png"
            render_scene(scene, resolution).save(out / name)
            meta.write(json.dumps({"file_name": name, "text": scene.caption, "scene": scene.to_dict()}) + "\n")
            if vqa_per_scene:
                for item in make_vqa(scene, rng, per_scene=vqa_per_scene):
                    vqa.write(json.dumps({"image": name, "question": item.question, "answer": item.answer,
                                          "capability": item.capability}) + "\n")
                    conv.write(json.dumps({"images": [name], "capability": item.capability, "messages": [
                        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.question}]},
                        {"role": "assistant", "content": [{"type": "text", "text": item.answer}]}]}) + "\n")
                    n_vqa += 1
    if not vqa_per_scene:
        (out / "vqa.jsonl").unlink()
        (out / "conversations.jsonl").unlink()
    if videos:
        (out / "videos").mkdir()
        with open(out / "videos.jsonl", "w") as f:
            for i in range(videos):
                clip = sample_clip(rng, n_frames=n_frames, size=resolution)
                name = f"videos/{i:06d}.gif"
                write_clip(clip, out / name)
                f.write(json.dumps({"file_name": name, "text": clip.caption, "direction": clip.direction}) + "\n")
    info = {"seed": seed, "images": n, "vqa": n_vqa, "videos": videos, "resolution": resolution, "split": split}
    (out / "info.json").write_text(json.dumps(info, indent=1))
    return info
