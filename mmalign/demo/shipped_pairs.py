"""The demo's first-round on-policy pairs, shipped (`mmalign/assets/shapeworld_pairs`, built from the shipped base
by `scripts/build_shapeworld_pairs.sh`), so `make demo` trains at once instead of sampling them again.

The set records its source: a content digest of the base's weights and the pair settings (prompt seed and count,
samples per prompt, pairing, winner filter, sampler steps and guidance). The demo uses it only when all of that
equals what it would sample itself; any other model or setting, or `--fresh-pairs`, samples pairs as before."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..assets import SHAPEWORLD_PAIRS

PIPELINE_PARTS = ("model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae")


def weights_digest(model) -> str | None:
    """sha256 over the relative path and bytes of every file of a local pipeline's components (logs and cards
    left out); None for a hub id or a folder that is not a pipeline."""
    root = Path(model)
    if not (root / "model_index.json").is_file():
        return None
    h = hashlib.sha256()
    for part in PIPELINE_PARTS:
        p = root / part
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
            h.update(f.relative_to(root).as_posix().encode() + b"\0")
            h.update(f.read_bytes())
    return h.hexdigest()


def pair_source(model, s, prompt_seed: int) -> dict:
    """What determines the pairs `onpolicy_pairs` draws from `model` with the demo settings `s`."""
    return {"base_sha256": weights_digest(model), "prompt_seed": prompt_seed, "prompts": s.pair_prompts,
            "per_prompt": s.per_prompt, "pairing": s.pairing, "min_winner_score": s.min_winner_score,
            "steps": s.pair_steps, "guidance": s.guidance}


def shipped_pairs(model, s, prompt_seed: int, where: Path = SHAPEWORLD_PAIRS) -> tuple[Path, dict] | None:
    """(the shipped pair folder, its report) when it holds exactly the pairs `model` and `s` would give, else None."""
    report_file = where / "pairs_report.json"
    if s.fresh_pairs or not report_file.is_file():
        return None
    report = json.loads(report_file.read_text())
    if report.get("source") != pair_source(model, s, prompt_seed) or report["source"]["base_sha256"] is None:
        return None
    return where, report
