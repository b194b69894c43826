"""Entities: ordered groups of tokens that an autoregressive model predicts one group at a time.

xAR (Ren et al. 2025, "Beyond Next-Token: Next-X Prediction") names the unit of prediction an
*entity* X: a single token, a ``k x k`` cell of neighbouring tokens, a strided subsample, a scale
or the whole image. Every entity type is an :class:`EntityLayout`: it turns a latent
``[B, C, H, W]`` into a sequence ``[B, N, C]`` of entities (``sizes`` tokens each) and back, gives
every sequence position a 2D coordinate on the ``H x W`` grid (for rotary embeddings) and the
block-causal mask over the entities. A model, its KV cache and its sampler only use this interface.

* Token, cell, subsample and image entities are **partitions of one token grid**
  (:class:`GridPartition`, ``N = H * W``): a permutation of the raster positions plus the group sizes;
  a concrete partition only lists which raster positions form each entity (``raster_order``).
* Scale entities (:class:`ScalePyramid`) are the latent area-downsampled to each scale of a list
  ending at the grid size: ``N = sum(s_k^2)``; the last scale is the latent itself.

:class:`CellPartition` is the entity of the released xAR models (8 x 8 cells of a 16 x 16 grid).
:data:`ENTITY_TYPES` is the registry (name -> class), :func:`make_partition` builds one by name.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F


def block_causal_mask(sizes: list[int] | tuple[int, ...], dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Additive ``[L, L]`` mask (0 = may attend, ``-inf`` = not), ``L = sum(sizes)``.

    Position ``i`` of block ``b(i)`` sees position ``j`` iff ``b(j) <= b(i)``: full attention inside
    a block (a scale or an entity) and to every earlier block.
    """
    block = torch.tensor([b for b, n in enumerate(sizes) for _ in range(n)], device=device)
    allowed = block[None, :] <= block[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, float("-inf"))


class EntityLayout(ABC):
    """An ordered sequence of entities built from an ``H x W`` token grid.

    Attributes:
        height, width: token grid size of the latents ``[B, C, H, W]``.
        sizes: tokens per entity, in generation order; ``num_tokens = sum(sizes)``.
    """

    height: int
    width: int
    sizes: list[int]

    @classmethod
    def from_options(cls, height: int, width: int, cell: int = 1, stride: int = 1,
                     scales: list[int] | tuple[int, ...] | None = None) -> "EntityLayout":
        """Build from the generator's entity options; each type reads the ones it needs (default: ``cell``)."""
        return cls(height, width, cell)

    @property
    def num_entities(self) -> int:
        return len(self.sizes)

    @property
    def num_tokens(self) -> int:
        return sum(self.sizes)

    def offsets(self) -> list[int]:
        """Start of each entity in the sequence, plus the total length at the end."""
        out = [0]
        for s in self.sizes:
            out.append(out[-1] + s)
        return out

    def mask(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """Block-causal additive mask ``[N, N]`` over the entities."""
        return block_causal_mask(self.sizes, dtype, device)

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.dim() != 4 or tuple(latents.shape[2:]) != (self.height, self.width):
            raise ValueError(f"latents must be [B, C, {self.height}, {self.width}] for this "
                             f"{type(self).__name__}, got {tuple(latents.shape)}")

    def _check_sequence(self, seq: torch.Tensor) -> None:
        if seq.dim() != 3 or seq.shape[1] != self.num_tokens:
            raise ValueError(f"expected a sequence [B, {self.num_tokens}, C], got {tuple(seq.shape)}")

    @abstractmethod
    def to_sequence(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, N, C]`` in entity order."""

    @abstractmethod
    def from_sequence(self, seq: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` in entity order -> ``[B, C, H, W]``."""

    @abstractmethod
    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows [N], cols [N])``: grid coordinates of every sequence position (for 2D RoPE)."""


class GridPartition(EntityLayout):
    """An ordered partition of an ``H x W`` token grid into entities (``N = H * W``).

    Attributes:
        order: ``LongTensor [H*W]``; ``order[i]`` is the raster index of sequence position ``i``.
        inverse: ``argsort(order)``.
    """

    def __init__(self, height: int, width: int):
        if height < 1 or width < 1:
            raise ValueError(f"grid size must be positive, got {height}x{width}")
        self.height, self.width = height, width
        order, sizes = self.raster_order()
        order = torch.as_tensor(order, dtype=torch.long, device="cpu")
        if sorted(order.tolist()) != list(range(height * width)) or sum(sizes) != height * width:
            raise ValueError(f"{type(self).__name__} does not partition a {height}x{width} grid")
        self.order, self.sizes = order, list(sizes)
        self.inverse = torch.argsort(order)

    @abstractmethod
    def raster_order(self) -> tuple[list[int], list[int]]:
        """``(order, sizes)``: raster indices in sequence order and the size of each entity."""

    def to_sequence(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, H*W, C]`` in entity order."""
        self._check_latents(latents)
        flat = latents.flatten(2).transpose(1, 2)  # [B, HW, C] raster order
        return flat[:, self.order.to(latents.device)]

    def from_sequence(self, seq: torch.Tensor) -> torch.Tensor:
        """``[B, H*W, C]`` in entity order -> ``[B, C, H, W]``."""
        self._check_sequence(seq)
        B, N, C = seq.shape
        flat = seq[:, self.inverse.to(seq.device)]
        return flat.transpose(1, 2).reshape(B, C, self.height, self.width)

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer ``(row, col)`` of every sequence position (int64 ``[H*W]`` each)."""
        return self.order // self.width, self.order % self.width


class CellPartition(GridPartition):
    """``k x k`` cells of neighbouring tokens, cells in raster order, tokens row-major inside a cell.

    ``cell=1`` is next-token (raster) order; ``cell = H = W`` is the whole image as one entity. The
    released xAR models use ``cell=8`` on a 16 x 16 grid (4 cells).
    """

    def __init__(self, height: int, width: int, cell: int):
        if cell < 1 or height % cell or width % cell:
            valid = [c for c in range(1, min(height, width) + 1) if height % c == 0 and width % c == 0]
            raise ValueError(f"cell size {cell} must divide the token grid {height}x{width} (valid: {valid})")
        self.cell = cell
        super().__init__(height, width)

    def raster_order(self) -> tuple[list[int], list[int]]:
        k, H, W = self.cell, self.height, self.width
        idx = torch.arange(H * W, device="cpu").view(H // k, k, W // k, k).permute(0, 2, 1, 3)  # [gh, gw, k, k]
        return idx.reshape(-1).tolist(), [k * k] * ((H // k) * (W // k))


class TokenPartition(CellPartition):
    """Next-token entities: every token is an entity, raster order (``CellPartition`` with ``cell=1``)."""

    def __init__(self, height: int, width: int):
        super().__init__(height, width, 1)

    @classmethod
    def from_options(cls, height, width, cell=1, stride=1, scales=None):
        return cls(height, width)


class ImagePartition(GridPartition):
    """The whole image as one entity, raster order (for a square grid: ``CellPartition`` with ``cell=H``)."""

    def __init__(self, height: int, width: int):
        super().__init__(height, width)

    @classmethod
    def from_options(cls, height, width, cell=1, stride=1, scales=None):
        return cls(height, width)

    def raster_order(self) -> tuple[list[int], list[int]]:
        return list(range(self.height * self.width)), [self.height * self.width]


class SubsamplePartition(GridPartition):
    """Strided subsamples: ``stride^2`` entities of ``(H/stride) x (W/stride)`` distant tokens each.

    Entity ``a * stride + b`` holds the positions ``(i * stride + a, j * stride + b)`` for all ``i, j``
    (row-major in ``(i, j)``); entities come in raster order of their offset ``(a, b)``. Every entity
    covers the whole image at a coarse sampling, so later entities fill the gaps between earlier ones.
    ``stride=1`` is the whole image as one entity.
    """

    def __init__(self, height: int, width: int, stride: int):
        if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1 or height % stride or width % stride:
            valid = [s for s in range(1, min(height, width) + 1) if height % s == 0 and width % s == 0]
            raise ValueError(f"subsample stride {stride!r} must divide the token grid {height}x{width} "
                             f"(valid: {valid})")
        self.stride = stride
        super().__init__(height, width)

    @classmethod
    def from_options(cls, height, width, cell=1, stride=1, scales=None):
        return cls(height, width, stride)

    def raster_order(self) -> tuple[list[int], list[int]]:
        s, H, W = self.stride, self.height, self.width
        idx = torch.arange(H * W, device="cpu").view(H // s, s, W // s, s).permute(1, 3, 0, 2)  # [a, b, i, j]
        return idx.reshape(-1).tolist(), [(H // s) * (W // s)] * (s * s)


def default_scales(size: int) -> list[int]:
    """``[1, 2, 4, ...]`` (powers of two below ``size``) followed by ``size``: e.g. 8 -> [1, 2, 4, 8]."""
    out, s = [], 1
    while s < size:
        out.append(s)
        s *= 2
    return out + [size]


class ScalePyramid(EntityLayout):
    """Next-scale entities: entity ``k`` is the whole latent area-downsampled to ``s_k x s_k``.

    The sequence is ``[scale s_0 (s_0^2 tokens, row-major), scale s_1, ..., scale s_{E-1}]`` with
    ``N = sum(s_k^2)``; the last scale must equal the grid (it is the latent itself), so
    :meth:`from_sequence` returns the last scale and ignores the coarser ones. A token of scale ``s``
    at ``(i, j)`` covers a ``H/s x W/s`` block of the grid; its RoPE coordinate is that block's centre
    ``((i + 0.5) H / s - 0.5, (j + 0.5) W / s - 0.5)``, so tokens of different scales that look at the
    same place share a position.

    Args:
        height, width: the latent grid (must be square).
        scales: strictly increasing positive sides, last ``== height`` (default :func:`default_scales`).
    """

    def __init__(self, height: int, width: int, scales: list[int] | tuple[int, ...] | None = None):
        if height < 1 or height != width:
            raise ValueError(f"scale entities need a square latent grid, got {height}x{width}")
        scales = default_scales(height) if scales is None else scales
        if (not isinstance(scales, (list, tuple)) or not scales
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in scales)):
            raise ValueError(f"scales must be a non-empty list of positive integers, got {scales!r}")
        if any(b <= a for a, b in zip(scales[:-1], scales[1:])):
            raise ValueError(f"scales must be strictly increasing, got {list(scales)}")
        if scales[-1] != height:
            raise ValueError(f"the last scale must equal the latent grid size {height} (it is the latent itself), "
                             f"got scales {list(scales)}; e.g. {default_scales(height)}")
        self.height, self.width = height, width
        self.scales = [int(s) for s in scales]
        self.sizes = [s * s for s in self.scales]

    @classmethod
    def from_options(cls, height, width, cell=1, stride=1, scales=None):
        return cls(height, width, scales)

    def maps(self, latents: torch.Tensor) -> list[torch.Tensor]:
        """``[B, C, H, W]`` -> the latent area-downsampled to every scale, ``[B, C, s_k, s_k]`` each (the
        last one is ``latents`` itself). FlowAR's teacher-forcing targets use the same pyramid."""
        self._check_latents(latents)
        return [latents if s == self.height else F.interpolate(latents, size=(s, s), mode="area")
                for s in self.scales]

    def to_sequence(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, sum(s_k^2), C]``: the area-downsampled latent at every scale."""
        return torch.cat([z.flatten(2).transpose(1, 2) for z in self.maps(latents)], dim=1)

    def from_sequence(self, seq: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` -> ``[B, C, H, W]``: the last (full-resolution) scale."""
        self._check_sequence(seq)
        B, N, C = seq.shape
        return seq[:, N - self.sizes[-1]:].transpose(1, 2).reshape(B, C, self.height, self.width)

    def split(self, seq: torch.Tensor) -> list[torch.Tensor]:
        """``[B, N, C]`` -> the maps of every scale, ``[B, C, s_k, s_k]`` each."""
        self._check_sequence(seq)
        B, _, C = seq.shape
        off = self.offsets()
        return [seq[:, off[k]:off[k + 1]].transpose(1, 2).reshape(B, C, s, s) for k, s in enumerate(self.scales)]

    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 block-centre coordinates on the ``H x W`` grid of every sequence position."""
        rows, cols = [], []
        for s in self.scales:
            c = (torch.arange(s, dtype=torch.float64) + 0.5) * (self.height / s) - 0.5
            rows.append(c[:, None].expand(s, s).reshape(-1))
            cols.append(c[None, :].expand(s, s).reshape(-1))
        return torch.cat(rows).float(), torch.cat(cols).float()


#: entity name -> layout class, built with ``cls.from_options(height, width, cell=, stride=, scales=)``
ENTITY_TYPES: dict[str, type[EntityLayout]] = {
    "token": TokenPartition,
    "cell": CellPartition,
    "subsample": SubsamplePartition,
    "scale": ScalePyramid,
    "image": ImagePartition,
}


def make_partition(entity: str, height: int, width: int, cell: int = 1, *, stride: int = 1,
                   scales: list[int] | tuple[int, ...] | None = None) -> EntityLayout:
    """Build the entity layout named ``entity`` (a key of :data:`ENTITY_TYPES`) for a ``height x width`` grid.

    ``cell`` is read by ``"cell"``, ``stride`` by ``"subsample"``, ``scales`` by ``"scale"``; ``"token"``
    and ``"image"`` take no option.
    """
    if entity not in ENTITY_TYPES:
        raise ValueError(f"unknown entity type {entity!r}; available: {sorted(ENTITY_TYPES)}")
    return ENTITY_TYPES[entity].from_options(height, width, cell=cell, stride=stride, scales=scales)
