"""Text-to-image diffusion alignment (StableDiffusionPipeline-format models)."""
