"""Build the demo's shipped on-policy pair set (mmalign/assets/shapeworld_pairs) from the shipped ShapeWorld base:
exactly what `mmalign demo` would sample for its first round (demo.diffusion.onpolicy_pairs with the demo's
settings), plus the source record (weights digest and pair settings) the demo checks before using the set.

    python scripts/build_shapeworld_pairs.py --out mmalign/assets/shapeworld_pairs [--pair-prompts 256]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from mmalign.assets import SHAPEWORLD_SD
from mmalign.demo.diffusion import PAIR_SEED, DemoSettings, load_sd_pipeline, onpolicy_pairs
from mmalign.demo.shipped_pairs import pair_source

CARD = """# ShapeWorld on-policy preference pairs (the demo's first round)

{pairs} pairs in the Pick-a-Pic layout (`metadata.jsonl`: caption, jpg_0 = winner, jpg_1 = loser, label_0 = 1,
both exact-scorer scores and sampler seeds; `images/`), drawn from the shipped base `mmalign/assets/shapeworld_sd`:
{prompts} training-split captions (`sample_scenes({seed}, {prompts}, split="train")`) x {per_prompt} samples each
(DDIM {steps} steps, guidance {guidance:g}, sample j of prompt i with seed {seed} + {per_prompt}i + j), scored by the
exact ShapeWorld scorer; pairing "{pairing}" (every two samples of a caption whose scores differ). Captions whose
samples all scored the same give no pair and are counted in `pairs_report.json` ({skipped} of {prompts}).

Built by `scripts/build_shapeworld_pairs.sh` ({seconds} s of sampling on {threads} CPU thread(s)). `mmalign demo`
trains on this folder instead of sampling the same pairs again, but only while `pairs_report.json`'s `source`
(a sha256 of the base's weight and config files, and the pair settings above) equals what the run would sample;
`--fresh-pairs`, another `--model` or other pair settings sample them anew.
`tests/test_shipped_pairs.py` regenerates the first captions' pairs and compares them with these.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--pair-prompts", type=int, default=DemoSettings.pair_prompts)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    s = DemoSettings(pair_prompts=a.pair_prompts)
    out = Path(a.out)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        work = Path(tmp) / "pairs"
        info = onpolicy_pairs(load_sd_pipeline(SHAPEWORLD_SD), work, s)
        info["source"] = pair_source(SHAPEWORLD_SD, s, PAIR_SEED)
        (work / "pairs_report.json").write_text(json.dumps(info, indent=1))
        skipped = sum(info["report"]["skipped"].values())
        (work / "README.md").write_text(CARD.format(
            pairs=info["pairs"], prompts=s.pair_prompts, seed=PAIR_SEED, per_prompt=s.per_prompt, steps=s.pair_steps,
            guidance=s.guidance, pairing=s.pairing, skipped=skipped, seconds=info["seconds"], threads=a.threads))
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    print(json.dumps({k: info[k] for k in ("prompts", "pairs", "seconds")}))


if __name__ == "__main__":
    main()
