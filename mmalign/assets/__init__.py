"""The shipped ShapeWorld models: every path to one is named here, once.

Each folder is built by a committed script (`scripts/build_shapeworld_*.sh`) and loads through the same
`from_pretrained` / open_clip code path as a user's checkpoint; each has a model card (README.md).
"""
from pathlib import Path

ASSETS = Path(__file__).resolve().parent
SHAPEWORLD_SD = ASSETS / "shapeworld_sd"  # StableDiffusionPipeline directory (tiny UNet, VAE, CLIP text encoder)
SHAPEWORLD_LLAVA = ASSETS / "shapeworld_llava"  # LlavaForConditionalGeneration + processor
SHAPEWORLD_CLIP = ASSETS / "shapeworld_clip"  # open_clip CLIP (config JSON + safetensors)
SHAPEWORLD_MOTION = ASSETS / "shapeworld_motion"  # diffusers MotionAdapter for SHAPEWORLD_SD
SHAPEWORLD_SD_V = ASSETS / "shapeworld_sd_v"  # SHAPEWORLD_SD converted to v-prediction, zero terminal SNR
SHAPEWORLD_SD3 = ASSETS / "shapeworld_sd3"  # StableDiffusion3Pipeline (rectified flow; weak: see its README)
SHAPEWORLD_PAIRS = ASSETS / "shapeworld_pairs"  # the demo's on-policy pairs from SHAPEWORLD_SD (Pick-a-Pic layout)
