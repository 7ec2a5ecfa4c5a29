#!/usr/bin/env bash
# The exact command that built mmalign/assets/shapeworld_sd_v: the shipped epsilon base (shapeworld_sd) converted
# to v-prediction on a zero-terminal-SNR schedule (trailing timesteps), 1600 steps of 64 images with a cosine decay,
# UNet and text encoder trained, VAE kept. About 20 minutes on 2 CPU cores. The video models build on it: the
# epsilon base predicts the image worse than nothing where a clip's motion is decided (benchmarks/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY scripts/train_shapeworld_base.py --init mmalign/assets/shapeworld_sd --out mmalign/assets/shapeworld_sd_v \
    --seed 2 --unet-steps 1600 --decay cosine --prediction-type v_prediction --zero-terminal-snr --threads 2
