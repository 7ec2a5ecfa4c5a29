"""Video: temporal layers on a frozen image UNet (temporal.py), clip encoding (clips.py), video pipelines and
seeded sampling (sampling.py), temporal training and Video Diffusion-DPO (methods.py). Frames and video pairs
are read by mmalign.datasets.video; the ShapeWorld motion demo is mmalign.demo.video."""
