"""The Tokenizer interface.

Images are float tensors ``[B, 3, H, W]`` in ``[-1, 1]``. ``kind`` tells what tokens look like:

* ``"discrete"``: ``LongTensor [B, h, w]`` ids in ``[0, vocab_size)``; ``embed(ids) -> [B, C, h, w]``.
* ``"multiscale"``: a list of ``LongTensor [B, h_k, w_k]``, one per scale of ``scales``.
* ``"continuous"``: ``FloatTensor [B, C, h, w]``, already scaled (``scale_factor``).
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any

import torch

from visar.utils.config import Configurable
from visar.utils.validation import check_images


class Tokenizer(Configurable, metaclass=ABCMeta):
    kind: str = "?"
    #: image pixels per token side
    downsample: int = 1

    def check_images(self, images: torch.Tensor) -> None:
        """Validate ``images [B, 3, H, W]`` (finite floats in ``[-1, 1]``, a non-empty batch, a size divisible
        by :attr:`downsample`) and their dtype against the weights' (outside autocast)."""
        check_images(images, self.downsample)
        weight = next((p for p in self.parameters() if p.is_floating_point()), None)
        if (weight is not None and images.dtype != weight.dtype
                and not torch.is_autocast_enabled(images.device.type)):
            raise TypeError(f"images are {images.dtype} but the tokenizer's weights are {weight.dtype}: pass "
                            f"images.to({weight.dtype}) (or move the tokenizer with .to(dtype=...))")

    def latent_size(self, height: int, width: int | None = None) -> tuple[int, int]:
        """Token grid ``(h, w)`` for an image of ``height x width`` pixels."""
        width = height if width is None else width
        if height % self.downsample or width % self.downsample:
            raise ValueError(f"image size {height}x{width} is not divisible by downsample {self.downsample}")
        return height // self.downsample, width // self.downsample

    @abstractmethod
    def encode(self, images: torch.Tensor) -> Any:
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` -> tokens (see the module docstring for each kind)."""

    @abstractmethod
    def decode(self, tokens: Any) -> torch.Tensor:
        """Tokens -> images ``[B, 3, H, W]``, nominally in ``[-1, 1]`` (not clamped unless stated)."""
