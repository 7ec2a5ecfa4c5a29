#!/usr/bin/env bash
# The exact command that builds the shipped SD3-format (rectified-flow) ShapeWorld base
# (mmalign/assets/shapeworld_sd3). It reuses the shipped SD base's VAE (mmalign/assets/shapeworld_sd/vae):
# build that first (build_shapeworld_base.sh).
# One stage: 2000 steps at batch 64 with a cosine learning-rate decay, about 50-80 minutes on 2 CPU cores
# (1.75-2.2 s/step measured on one busy thread, plus 20000 renders and 5 evaluations of 128 validation captions).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY scripts/train_shapeworld_flow.py --out mmalign/assets/shapeworld_sd3 --seed 0 --steps 2000 --decay cosine \
    --threads 2
