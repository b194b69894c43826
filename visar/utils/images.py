"""Image grids and conversions for results people look at."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import torch

from visar.utils.io import atomic_write_bytes


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` in ``[-1, 1]`` -> ``uint8 [B, H, W, 3]`` (``clamp(127.5 x + 128, 0, 255)``, truncated)."""
    return (images.float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def to_pil(images: torch.Tensor) -> list:
    """``[B, 3, H, W]`` in ``[-1, 1]`` -> a list of ``B`` RGB PIL images."""
    from PIL import Image

    return [Image.fromarray(a.numpy()) for a in to_uint8(images)]


def make_grid_uint8(images: torch.Tensor, nrow: int, pad: int = 2, fill: int = 255) -> torch.Tensor:
    """``uint8 [N, H, W, 3]`` -> one ``uint8 [rows*(H+pad)+pad, nrow*(W+pad)+pad, 3]`` grid."""
    n, h, w, c = images.shape
    nrow = max(1, min(nrow, n))
    rows = (n + nrow - 1) // nrow
    grid = torch.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), fill, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8, upscale: int = 0) -> Path:
    """Save ``uint8 [N, H, W, 3]`` (or float ``[N, 3, H, W]`` in [-1, 1]) as a PNG grid, atomically.

    ``upscale`` (0 = automatic) enlarges small images with nearest neighbour so a grid of 32 px
    images stays readable.
    """
    from PIL import Image

    if images.is_floating_point():
        images = to_uint8(images)
    grid = make_grid_uint8(images.cpu(), nrow)
    img = Image.fromarray(grid.numpy())
    if upscale == 0:
        upscale = max(1, 128 // max(1, images.shape[1]))
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def combine_grids(panels: Sequence[tuple[str, str | Path]], out: str | Path, gap: int = 12, band: int = 16,
                  columns: tuple[int, int] | None = None, height: int | None = None) -> Path:
    """Write the panels ``[(name, png_path), ...]`` side by side to ``out``; returns ``out``.

    ``columns=(k, n)`` crops every panel to its left ``k / n`` (``1 <= k <= n``); ``height`` rescales
    every panel to that many pixels (aspect kept, Lanczos).
    """
    if not panels:
        raise ValueError("give at least one NAME=PNG panel")
    if columns is not None and not (1 <= columns[0] <= columns[1]):
        raise ValueError(f"columns must be K/N with 1 <= K <= N, got {columns}")
    if height is not None and height < 1:
        raise ValueError(f"height must be >= 1, got {height}")
    from PIL import Image, ImageDraw

    images = []
    for name, path in panels:
        if not Path(path).is_file():
            raise FileNotFoundError(f"grid {path} (panel {name!r}) does not exist")
        im = Image.open(path).convert("RGB")
        if columns is not None:
            im = im.crop((0, 0, round(im.width * columns[0] / columns[1]), im.height))
        if height is not None:
            im = im.resize((max(1, round(im.width * height / im.height)), height), Image.LANCZOS)
        images.append((name, im))
    width = sum(im.width for _, im in images) + gap * (len(images) - 1)
    height = band + max(im.height for _, im in images)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for name, im in images:
        draw.text((x + 2, 2), name, fill="black")
        canvas.paste(im, (x, band))
        x += im.width + gap
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())
    return out
