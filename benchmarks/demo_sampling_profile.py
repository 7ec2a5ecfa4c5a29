"""Where the demo's time goes: held-out sampling of the shipped ShapeWorld base (15 DDIM steps, guidance 4) at
several batch sizes, in one process, side by side; images are compared bitwise with the first batch size's.

    .venv/bin/python benchmarks/demo_sampling_profile.py 64 128 32            # 128 prompts (N=... to change)
    OMP_NUM_THREADS=1 N=64 .venv/bin/python benchmarks/demo_sampling_profile.py 64   # thread scaling: run both
"""
import os
import sys
import time

import numpy as np
from diffusers import StableDiffusionPipeline

from mmalign.assets import SHAPEWORLD_SD
from mmalign.demo.diffusion import heldout_prompts
from mmalign.diffusion.sampling import sample_images

pipe = StableDiffusionPipeline.from_pretrained(str(SHAPEWORLD_SD), safety_checker=None, requires_safety_checker=False)
n = int(os.environ.get("N", 128))
prompts, seeds, first = heldout_prompts(n), list(range(n)), None
for bs in [int(b) for b in sys.argv[1:] or ["64"]]:
    t = time.time()
    images = np.stack([np.asarray(im) for im in sample_images(pipe, prompts, seeds, steps=15, guidance=4.0,
                                                              batch_size=bs)])
    dt = time.time() - t
    same = "" if first is None else f"; identical to batch {sys.argv[1]}: {bool((images == first).all())}"
    first = images if first is None else first
    print(f"batch {bs}: {dt:.1f} s for {n} images ({os.environ.get('OMP_NUM_THREADS', 'default')} threads){same}")
