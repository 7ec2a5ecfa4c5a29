#!/usr/bin/env bash
# The exact command that builds the shipped SD3-format (rectified-flow) ShapeWorld base
# (mmalign/assets/shapeworld_sd3). It reuses the shipped SD base's VAE (mmalign/assets/shapeworld_sd/vae):
# build that first (build_shapeworld_base.sh).
# One stage: 2000 steps at batch 64 with a cosine learning-rate decay. The shipped model took 88 minutes with
# --threads 1 on a shared 2-core machine (20000 renders, 2.3-3 s/step, 5 evaluations of 128 validation captions).
# It is weak (1.6 % of validation captions fully correct): see mmalign/assets/shapeworld_sd3/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY scripts/train_shapeworld_flow.py --out mmalign/assets/shapeworld_sd3 --seed 0 --steps 2000 --decay cosine \
    --threads 2
