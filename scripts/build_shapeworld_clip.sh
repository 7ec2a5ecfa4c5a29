#!/usr/bin/env bash
# The exact command that built the shipped tiny ShapeWorld CLIP (mmalign/assets/shapeworld_clip): open_clip
# architecture, multi-positive InfoNCE from scratch on one CPU thread. Writes the model directory with
# summary.json, train_log.jsonl and README.md (held-out retrieval accuracy) next to the weights.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY scripts/train_shapeworld_clip.py --out mmalign/assets/shapeworld_clip --seed 0 --scenes 20000 \
    --degrade-frac 0.3 --steps 3000 --batch 128 --lr 1e-3 --warmup 150 --weight-decay 0.1 --threads 1 \
    --eval-sets 16
