"""Video: frames and video pairs (data.py), temporal layers on a frozen image UNet (temporal.py), video pipelines
and seeded sampling (sampling.py), temporal training and Video Diffusion-DPO (methods.py), the ShapeWorld motion
demo (demo.py)."""
