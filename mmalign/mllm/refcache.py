"""Reference log-probabilities computed once, before training, and stored on disk.

The entry for a (model files, data file, the image files its rows point to, encoding settings) key is
`root/<fingerprint[:20]>/`: one part file per chunk of rows, written atomically, so an interrupted pass resumes
where it stopped; `key.json` holds the full key. Training then needs no reference model at all (no frozen copy
in memory, no second forward).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..datasets.cache import fingerprint

PART_ROWS = 256


def cached_reference_logps(root: str, key: dict, rows: Sequence, compute: Callable[[list], torch.Tensor],
                           batch_size: int, log=print) -> dict[int, torch.Tensor]:
    """{row index in `rows`: tensor of that row's reference log-probs}, computing `compute(batch_rows)` -> (n, k)
    for the parts not on disk yet. `rows` is a list or a lazy dataset: one batch of rows is read at a time, and
    none for a part on disk."""
    entry = Path(root) / fingerprint(key)[:20]
    entry.mkdir(parents=True, exist_ok=True)
    key_file = entry / "key.json"
    if key_file.exists() and json.loads(key_file.read_text()) != json.loads(json.dumps(key, default=str)):
        raise RuntimeError(f"{entry}: fingerprint collision with a different key; remove the folder")
    key_file.write_text(json.dumps(key, indent=1, default=str))
    out: dict[int, torch.Tensor] = {}
    n = len(rows)
    computed = 0
    bar = tqdm(total=n, desc="reference log-probs", unit="row")
    for lo in range(0, n, PART_ROWS):
        hi = min(lo + PART_ROWS, n)
        path = entry / f"part{lo // PART_ROWS:05d}.safetensors"
        ids = torch.arange(lo, hi)
        if path.exists():
            try:
                t = load_file(str(path))
                if torch.equal(t["index"], ids):
                    out.update(zip(ids.tolist(), t["logps"]))
                    bar.update(hi - lo)
                    continue
            except Exception:  # a damaged part is recomputed
                pass
        chunks = []
        for b in range(lo, hi, batch_size):
            chunks.append(compute([rows[i] for i in range(b, min(b + batch_size, hi))]).float().cpu())
            bar.update(len(chunks[-1]))
        logps = torch.cat(chunks)
        tmp = path.with_suffix(".tmp")
        save_file({"index": ids, "logps": logps.contiguous()}, str(tmp))
        os.replace(tmp, path)
        out.update(zip(ids.tolist(), logps))
        computed += hi - lo
    bar.close()
    log(f"reference log-probs: {n - computed} rows from {entry}, {computed} computed")
    return out
