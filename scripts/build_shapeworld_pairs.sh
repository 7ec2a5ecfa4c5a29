#!/usr/bin/env bash
# The exact command that built the demo's shipped on-policy pairs (mmalign/assets/shapeworld_pairs) from the shipped
# ShapeWorld base: the first round `mmalign demo` would otherwise sample (it checks the recorded source first).
# The shipped set was made with THREADS=1; the thread count does not change the pairs (tests/test_shipped_pairs.py
# samples the first captions again at another thread count and batch size and gets the same pixels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY scripts/build_shapeworld_pairs.py --out mmalign/assets/shapeworld_pairs --pair-prompts 256 --threads ${THREADS:-2}
