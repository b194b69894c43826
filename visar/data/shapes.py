"""Procedural, class-conditional shapes: a dataset made on the fly, deterministic in ``(seed, index)``.

Ten classes of shape kinds (:data:`CLASSES`) drawn with a random colour, size, position and rotation
on a flat or linear-gradient background. Edges are anti-aliased analytically: every shape is a signed
distance field ``d`` (negative inside) and a pixel's coverage is ``clamp(0.5 - d / pixel, 0, 1)``,
which matches a box-filtered render up to the curvature inside one pixel, at the cost of one
evaluation per pixel. Any size works (32 and 64 px are the usual ones).

Every attribute of image ``i`` comes from a counter-based hash of ``(seed, split, i, attribute)``, so
item ``i`` is the same image whatever the batch, order, worker or process that draws it. The train and
held-out splits use different hash streams (``split="train"`` / ``"test"``), so they never share an
image even for equal indices. Labels are ``i % 10`` (balanced).

Example::

    ds = ShapesDataset(size=32, length=50_000)
    item = ds[0]   # {"image": [3, 32, 32] in [-1, 1], "label": 0, "caption": "a large red circle ..."}
    images, labels = ds.render(range(1000))   # [1000, 3, 32, 32], [1000]
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Sequence

import numpy as np
import torch

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross",
                            "ring", "diamond", "hexagon", "heart", "stripes")
#: rotational symmetry order of each class (0: fully symmetric, 1: none)
_SYMMETRY = {"circle": 0, "square": 4, "triangle": 3, "star": 5, "cross": 4, "ring": 0, "diamond": 2,
             "hexagon": 6, "heart": 1, "stripes": 2}

#: foreground colours: name -> RGB in [0, 1]
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10), "orange": (1.00, 0.55, 0.05), "yellow": (0.95, 0.85, 0.10),
    "green": (0.10, 0.70, 0.20), "cyan": (0.10, 0.80, 0.85), "blue": (0.15, 0.30, 0.95),
    "purple": (0.55, 0.20, 0.80), "pink": (0.95, 0.45, 0.70), "white": (0.96, 0.96, 0.96),
    "brown": (0.55, 0.33, 0.15),
}
#: background colours: name -> RGB in [0, 1]
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.04, 0.04, 0.04), "dark blue": (0.05, 0.08, 0.32), "dark green": (0.05, 0.25, 0.10),
    "dark red": (0.30, 0.05, 0.06), "grey": (0.48, 0.48, 0.50), "light grey": (0.82, 0.82, 0.82),
    "beige": (0.90, 0.85, 0.70), "light blue": (0.72, 0.85, 0.96),
}

_SPLITS = {"train": 0x5EED_0001, "test": 0x7E57_0002}
# attribute ids for the hash
_A_FG, _A_BG, _A_SIZE, _A_X, _A_Y, _A_ROT, _A_GRAD, _A_GDIR, _A_JIT = range(9)


def _luma(rgb: Sequence[float]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


_FG = np.array(list(COLOURS.values()), dtype=np.float32)
_BG = np.array(list(BACKGROUNDS.values()), dtype=np.float32)
# for each background, the foreground colours with enough contrast
_ALLOWED = [np.array([f for f, c in enumerate(COLOURS.values()) if abs(_luma(c) - _luma(b)) > 0.22
                      or np.abs(np.array(c) - np.array(b)).max() > 0.55])
            for b in BACKGROUNDS.values()]


def _uniform(seed: int, stream: int, idx: np.ndarray, attr: int) -> np.ndarray:
    """Counter-based uniforms in [0, 1): splitmix64 of (seed, stream, index, attribute)."""
    with np.errstate(over="ignore"):
        x = (np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
             ^ np.uint64(stream) * np.uint64(0xBF58476D1CE4E5B9)
             ^ (idx.astype(np.uint64) * np.uint64(0x94D049BB133111EB))
             ^ np.uint64(attr + 1) * np.uint64(0xD6E8FEB86659FD93))
        for _ in range(2):
            x = x + np.uint64(0x9E3779B97F4A7C15)
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


# ----------------------------------------------------------------------------------------------
# signed distance fields in shape-local coordinates (shape radius ~1, y up); p: [B, P, 2]

def _sd_polygon(p: torch.Tensor, verts: torch.Tensor) -> torch.Tensor:
    """Exact signed distance to a simple polygon ``verts [V, 2]`` (negative inside). Returns ``[B, P]``."""
    v_i = verts                                    # [V, 2]
    v_j = torch.roll(verts, 1, dims=0)             # previous vertex
    e = v_j - v_i                                  # [V, 2]
    w = p[:, :, None, :] - v_i                     # [B, P, V, 2]
    t = ((w * e).sum(-1) / (e * e).sum(-1)).clamp(0, 1)
    b = w - e * t[..., None]
    d2 = (b * b).sum(-1).amin(-1)                  # [B, P]
    py = p[:, :, None, 1]
    c1 = py >= v_i[:, 1]
    c2 = py < v_j[:, 1]
    c3 = e[:, 0] * w[..., 1] > e[:, 1] * w[..., 0]
    flips = ((c1 & c2 & c3) | (~c1 & ~c2 & ~c3)).sum(-1)
    sign = 1.0 - 2.0 * (flips % 2).to(p.dtype)     # odd crossings: inside -> -1
    return sign * d2.sqrt()


def _sd_box(p: torch.Tensor, hx: float, hy: float) -> torch.Tensor:
    q = p.abs() - torch.tensor([hx, hy], dtype=p.dtype)
    return q.clamp(min=0).norm(dim=-1) + q.amax(-1).clamp(max=0)


def _regular(n: int, r: float, phase: float = math.pi / 2) -> torch.Tensor:
    a = phase + torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    return torch.stack([r * a.cos(), r * a.sin()], -1)


def _star(points: int = 5, r_out: float = 1.0, r_in: float = 0.42) -> torch.Tensor:
    a = math.pi / 2 + torch.arange(2 * points, dtype=torch.float64) * (math.pi / points)
    r = torch.tensor([r_out, r_in], dtype=torch.float64).repeat(points)
    return torch.stack([r * a.cos(), r * a.sin()], -1)


def _cross(arm: float = 0.95, half: float = 0.3) -> torch.Tensor:
    a, h = arm, half
    return torch.tensor([[h, a], [-h, a], [-h, h], [-a, h], [-a, -h], [-h, -h], [-h, -a], [h, -a],
                         [h, -h], [a, -h], [a, h], [h, h]], dtype=torch.float64)


def _heart(n: int = 32) -> torch.Tensor:
    t = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    x = 16 * t.sin() ** 3
    y = 13 * t.cos() - 5 * (2 * t).cos() - 2 * (3 * t).cos() - (4 * t).cos()
    return torch.stack([x, y + 2.5], -1) / 16.5


_POLYGONS = {
    "square": _regular(4, 0.78 * math.sqrt(2), math.pi / 4),
    "triangle": _regular(3, 1.0),
    "star": _star(),
    "cross": _cross(),
    "diamond": torch.tensor([[0.0, 1.0], [-0.55, 0.0], [0.0, -1.0], [0.55, 0.0]], dtype=torch.float64),
    "hexagon": _regular(6, 0.92, 0.0),
    "heart": _heart(),
}


def _sdf(kind: str, p: torch.Tensor) -> torch.Tensor:
    if kind in _POLYGONS:
        return _sd_polygon(p, _POLYGONS[kind].to(p.dtype))
    r = p.norm(dim=-1)
    if kind == "circle":
        return r - 0.85
    if kind == "ring":
        return (r - 0.68).abs() - 0.2
    if kind == "stripes":  # three parallel bars
        return torch.stack([_sd_box(p - torch.tensor([dx, 0.0], dtype=p.dtype), 0.14, 0.85)
                            for dx in (-0.6, 0.0, 0.6)]).amin(0)
    raise ValueError(f"unknown shape kind {kind!r}; known: {', '.join(CLASSES)}")


# ----------------------------------------------------------------------------------------------

class ShapesDataset(torch.utils.data.Dataset):
    """Class-conditional procedural shapes, rendered on demand.

    Args:
        size: image side in pixels (>= 8).
        length: number of items (indices ``0 .. length - 1``).
        split: ``"train"`` or ``"test"`` (held-out; a disjoint hash stream).
        seed: dataset seed; the same ``(seed, split, index)`` always gives the same image.
        gradient_prob: probability of a linear-gradient background.
        cache: optional ``.npy`` path memoising the rendered images as 8-bit RGB (see
            :mod:`visar.data.shapes_cache`; rendered on first use, then memory-mapped). Items then
            come from the 8-bit pixels (within half an 8-bit step of the float renders).

    Items are dicts ``{"image": FloatTensor [3, size, size] in [-1, 1], "label": int, "caption": str}``.
    """

    num_classes = len(CLASSES)
    classes = CLASSES

    def __init__(self, size: int = 32, length: int = 50_000, split: str = "train", seed: int = 0,
                 gradient_prob: float = 0.5, cache: str | os.PathLike | None = None):
        if not isinstance(size, int) or size < 8:
            raise ValueError(f"size must be an int >= 8 pixels, got {size!r}")
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        if not 0.0 <= gradient_prob <= 1.0:
            raise ValueError(f"gradient_prob must be in [0, 1], got {gradient_prob}")
        self.size, self.length, self.split, self.seed = size, length, split, int(seed)
        self.gradient_prob = gradient_prob
        self.cache = str(cache) if cache else None
        self._pixels = None

    def item_labels(self) -> torch.Tensor:
        """``LongTensor [length]``: every item's class (``index % 10``), without rendering."""
        return torch.arange(self.length) % len(CLASSES)

    def pixels(self):
        """The cached ``uint8 [length, size, size, 3]`` memory map (rendered on first call), or ``None``
        without a cache."""
        if self.cache is None:
            return None
        if self._pixels is None:
            from visar.data.shapes_cache import load_or_render

            self._pixels = load_or_render(self, self.cache)
        return self._pixels

    def _images(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        px = self.pixels()
        if px is None:
            return self.render(indices)
        from visar.data.shapes_cache import from_uint8

        idx = self._check_indices(indices)
        order = np.argsort(idx, kind="stable")  # sorted reads of the memory map, then back to order
        rows = np.empty((len(idx),) + px.shape[1:], dtype=np.uint8)
        rows[order] = px[idx[order]]
        return from_uint8(rows), torch.as_tensor(idx % len(CLASSES), dtype=torch.long)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pixels"] = None  # workers re-open the memory map
        return state

    def __len__(self) -> int:
        return self.length

    def _check_indices(self, indices: Iterable[int]) -> np.ndarray:
        idx = np.asarray(list(indices) if not isinstance(indices, (np.ndarray, torch.Tensor)) else indices,
                         dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.length):
            raise IndexError(f"index out of range for a ShapesDataset of length {self.length}: "
                             f"[{idx.min()}, {idx.max()}]")
        return idx

    def attributes(self, indices: Iterable[int]) -> dict[str, np.ndarray]:
        """Raw attributes of ``indices``: label, fg/bg colour ids and RGB, scale, centre, angle, gradient."""
        idx = self._check_indices(indices)
        s, st = self.seed, _SPLITS[self.split]
        u = {a: _uniform(s, st, idx, a) for a in range(9)}
        bg = np.minimum((u[_A_BG] * len(_BG)).astype(np.int64), len(_BG) - 1)
        fg = np.array([_ALLOWED[b][min(int(x * len(_ALLOWED[b])), len(_ALLOWED[b]) - 1)]
                       for b, x in zip(bg, u[_A_FG])], dtype=np.int64)
        scale = 0.32 + 0.48 * u[_A_SIZE]                      # shape radius / half image side
        lim = np.maximum(0.92 - scale, 0.0)
        cx = (2 * u[_A_X] - 1) * lim
        cy = (2 * u[_A_Y] - 1) * lim
        angle = 2 * math.pi * u[_A_ROT]
        grad = u[_A_GRAD] < self.gradient_prob
        gdir = 2 * math.pi * u[_A_GDIR]
        jitter = (u[_A_JIT] - 0.5) * 0.12
        fg_rgb = np.clip(_FG[fg] + jitter[:, None], 0, 1)
        return {"index": idx, "label": idx % len(CLASSES), "fg": fg, "bg": bg, "fg_rgb": fg_rgb,
                "bg_rgb": _BG[bg], "scale": scale, "cx": cx, "cy": cy, "angle": angle,
                "gradient": grad, "gradient_dir": gdir}

    def captions(self, indices: Iterable[int]) -> list[str]:
        """Captions such as ``"a small red star on a dark blue background, rotated"``."""
        a = self.attributes(indices)
        fg_names, bg_names = list(COLOURS), list(BACKGROUNDS)
        out = []
        for k in range(len(a["index"])):
            kind = CLASSES[a["label"][k]]
            sc = a["scale"][k]
            size = "small" if sc < 0.48 else ("medium" if sc < 0.64 else "large")
            bg = bg_names[a["bg"][k]]
            noun = "set of stripes" if kind == "stripes" else kind
            text = f"a {size} {fg_names[a['fg'][k]]} {noun} on a {bg}"
            text += " gradient background" if a["gradient"][k] else " background"
            where = []
            if a["cy"][k] > 0.2:
                where.append("top")
            elif a["cy"][k] < -0.2:
                where.append("bottom")
            if a["cx"][k] > 0.2:
                where.append("right")
            elif a["cx"][k] < -0.2:
                where.append("left")
            if len(where) == 2 or where[:1] in (["top"], ["bottom"]):
                text += ", at the " + " ".join(where)
            elif where:
                text += ", on the " + where[0]
            sym = _SYMMETRY[kind]
            if sym:
                period = 2 * math.pi / sym
                off = a["angle"][k] % period
                if min(off, period - off) > math.radians(10):
                    text += ", rotated"
            out.append(text)
        return out

    def render(self, indices: Iterable[int], chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``FloatTensor [N, 3, size, size]`` in ``[-1, 1]`` and labels ``LongTensor [N]``."""
        a = self.attributes(indices)
        n, S = len(a["index"]), self.size
        images = torch.empty(n, 3, S, S)
        c = (torch.arange(S, dtype=torch.float32) + 0.5) / S * 2 - 1
        ys, xs = torch.meshgrid(-c, c, indexing="ij")         # y up
        grid = torch.stack([xs, ys], -1).reshape(1, S * S, 2)  # [1, P, 2]
        t = lambda k: torch.as_tensor(a[k], dtype=torch.float32)  # noqa: E731
        scale, cx, cy, ang = t("scale"), t("cx"), t("cy"), t("angle")
        fg, bg = t("fg_rgb"), t("bg_rgb")
        # background: flat or a linear gradient from bg to a lighter/darker version of it
        gdir = t("gradient_dir")
        proj = ((grid[..., 0] * gdir.cos()[:, None] + grid[..., 1] * gdir.sin()[:, None]) * 0.5 + 0.5).clamp(0, 1)  # [N, P]
        other = torch.where(bg.mean(-1, keepdim=True) > 0.5, bg * 0.55, (bg + 0.35).clamp(max=1.0))
        g = torch.as_tensor(a["gradient"])[:, None, None].float()
        back = bg[:, None, :] + g * proj[..., None] * (other - bg)[:, None, :]  # [N, P, 3]
        labels = torch.as_tensor(a["label"], dtype=torch.long)
        cover = torch.empty(n, S * S)
        for k, kind in enumerate(CLASSES):
            rows = (labels == k).nonzero().flatten()
            for lo in range(0, len(rows), chunk):
                r = rows[lo:lo + chunk]
                # local coords: rotate by -angle around the centre, divide by the scale
                d = grid - torch.stack([cx[r], cy[r]], -1)[:, None, :]
                co, si = ang[r].cos()[:, None], ang[r].sin()[:, None]
                lx = (co * d[..., 0] + si * d[..., 1]) / scale[r, None]
                ly = (-si * d[..., 0] + co * d[..., 1]) / scale[r, None]
                sd = _sdf(kind, torch.stack([lx, ly], -1))
                pixel = (2.0 / S) / scale[r, None]               # one pixel in local units
                cover[r] = (0.5 - sd / pixel).clamp(0, 1)
        img = back + cover[..., None] * (fg[:, None, :] - back)  # [N, P, 3] in [0, 1]
        images = (img * 2 - 1).reshape(n, S, S, 3).permute(0, 3, 1, 2).contiguous()
        return images, labels

    def __getitem__(self, i: int) -> dict:
        img, lab = self._images([int(i)])
        return {"image": img[0], "label": int(lab[0]), "caption": self.captions([int(i)])[0]}

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """Batched fetch used by ``torch.utils.data.DataLoader`` (one vectorised render per batch)."""
        imgs, labs = self._images(indices)
        caps = self.captions(indices)
        return [{"image": imgs[k], "label": int(labs[k]), "caption": caps[k]} for k in range(len(caps))]


def class_grid(size: int = 64, per_class: int = 8, seed: int = 0, split: str = "train") -> torch.Tensor:
    """``[10 * per_class, 3, size, size]`` images in ``[-1, 1]``, class by class (one grid row per class)."""
    ds = ShapesDataset(size=size, length=len(CLASSES) * per_class, split=split, seed=seed)
    idx = [c + len(CLASSES) * j for c in range(len(CLASSES)) for j in range(per_class)]
    return ds.render(idx)[0]


def save_class_grid(path: str | os.PathLike = "docs/images/shapes_grid.png", size: int = 64, per_class: int = 8,
                    seed: int = 0) -> None:
    """Write the one-row-per-class PNG grid shown in the README (atomically)."""
    from visar.utils.images import save_grid

    save_grid(class_grid(size, per_class, seed), path, nrow=per_class, upscale=1)
