#!/usr/bin/env bash
# The exact commands that built the shipped ShapeWorld base pipeline (mmalign/assets/shapeworld_sd).
# About 80 minutes on 2 CPU cores. Stage 1 trains the VAE, then the UNet + text encoder at a constant LR;
# stage 2 continues from stage 1 with a cosine decay (different data-order seed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STAGE1=${STAGE1:-/tmp/shapeworld_sd_stage1}
$PY scripts/train_shapeworld_base.py --out "$STAGE1" --seed 0 --vae-steps 600 --unet-steps 2400
$PY scripts/train_shapeworld_base.py --init "$STAGE1" --out mmalign/assets/shapeworld_sd --seed 1 \
    --unet-steps 1600 --decay cosine
