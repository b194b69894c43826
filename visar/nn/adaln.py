"""Adaptive LayerNorm helpers.

:func:`modulate` is the plain modulation; the blocks call :func:`visar.ops.norm_modulate` (re-exported here),
which fuses the norm before it into one kernel on CUDA.
"""
import torch

from visar.ops.adaln import norm_modulate  # noqa: F401  (re-exported)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift``; shift/scale broadcast over the token axis."""
    return x * (1 + scale) + shift
