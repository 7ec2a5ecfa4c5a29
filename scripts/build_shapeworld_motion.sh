#!/usr/bin/env bash
# The exact command that built the shipped ShapeWorld motion adapter (mmalign/assets/shapeworld_motion):
# fresh zero-output motion modules on the frozen shipped image base, 300 steps x 8 clips of 8 frames, 1 thread.
# (Direction-following attempts with --init-adapter/--lora-rank/--lora-where/--t-min, with the text encoder trained
# jointly (--train-text, --sep-weight), and on a lent GPU via benchmarks/device_motion.py: see the adapter's
# README; none shipped.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY scripts/train_shapeworld_motion.py --out mmalign/assets/shapeworld_motion --work runs/shapeworld_motion \
    --clips 2000 --steps 300 --batch 8 --lr 1e-3 --heads 4 --seed 0 --eval-n 64 --eval-steps 10 --threads 1
