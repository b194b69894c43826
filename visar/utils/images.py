"""Image grids and conversions for results people look at."""
from __future__ import annotations

import io
import os
from pathlib import Path

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
