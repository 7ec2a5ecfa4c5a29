"""Rendering ShapeWorld scenes, and degradations that imitate a small generative model's samples."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .scene import CANVAS_RGB, COLOURS, SIZES, Scene, Shape

SUPERSAMPLE = 4


def render_shapes(shapes: tuple[Shape, ...] | list[Shape], size: int = 32,
                  background: tuple[int, int, int] = CANVAS_RGB) -> Image.Image:
    """Draw shapes (antialiased by supersampling) on a plain canvas of `size` x `size` pixels."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(img)
    for s in shapes:
        half = SIZES[s.size] * big / 2
        cx, cy = s.x * big, s.y * big
        box = (cx - half, cy - half, cx + half, cy + half)
        fill = COLOURS[s.colour]
        if s.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif s.shape == "square":
            draw.rectangle(box, fill=fill)
        elif s.shape == "triangle":  # upright, base at the bottom of the box
            draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
        else:
            raise ValueError(f"unknown shape {s.shape!r}")
    return img.resize((size, size), Image.LANCZOS)


def render_scene(scene: Scene, size: int = 32) -> Image.Image:
    return render_shapes(scene.shapes, size)


def degrade(img: Image.Image, rng: np.random.Generator, strength: float = 1.0) -> Image.Image:
    """Imitate an undertrained sampler: washed-out tinted background, global colour shift, blur, noise.

    Measured on a tiny UNet's samples: backgrounds near RGB (150,180,170) instead of the canvas' 245 grey,
    colours right to the eye, soft edges, grain.
    """
    x = np.asarray(img).astype(np.float32)
    bg = np.array(CANVAS_RGB, np.float32)
    is_bg = (np.abs(x - bg).sum(-1) < 30)[..., None]
    new_bg = rng.uniform(140, 250, size=3).astype(np.float32)
    x = np.where(is_bg, x - bg + new_bg, x)
    x = x + rng.uniform(-25, 25, size=3) * strength  # global tint
    x = x * rng.uniform(0.85, 1.1) * strength + x * (1 - strength)  # contrast change
    out = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
    out = out.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.9)) * strength))
    y = np.asarray(out).astype(np.float32) + rng.normal(0, 12 * strength, size=x.shape)
    return Image.fromarray(np.clip(y, 0, 255).astype(np.uint8))
