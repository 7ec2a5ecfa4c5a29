"""Image grids with captions, for before/after comparisons on the same seeds."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont


def image_grid(images: list[Image.Image], captions: list[str] | None = None, cols: int = 8,
               cell: int = 128) -> Image.Image:
    """Images upscaled (nearest) to `cell` px in a `cols`-wide grid, each with its caption underneath."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    font = ImageFont.load_default()
    text_h = 24 if captions else 0
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * cell, rows * (cell + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        grid.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
        if captions:
            words, lines = captions[i].split(), ["", ""]
            for w in words:  # two short lines
                k = 0 if len(lines[0]) + len(w) < 22 else 1
                lines[k] = (lines[k] + " " + w).strip()
            draw.text((x + 2, y + cell), lines[0], fill=(0, 0, 0), font=font)
            draw.text((x + 2, y + cell + 11), lines[1], fill=(0, 0, 0), font=font)
    return grid
