"""Normalisation layers used across families."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visar.ops.adaln import norm_modulate
from visar.ops.rmsnorm import rms_norm


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back **before** the weight is applied.

    ``y = cast(x * rsqrt(mean(x^2) + eps)) * weight`` (LlamaGen, FlowAR and xAR order).
    ``affine=False`` gives the weight-free variant FlowAR/xAR blocks use. Runs :func:`visar.ops.rms_norm` (a fused
    kernel on CUDA, the same torch operations as before elsewhere).

    Args:
        dim: size of the last axis.
        eps: added to the mean square (1e-5 in LlamaGen, 1e-6 in FlowAR/xAR).
        affine: learn a per-channel weight (initialised to one).
    """

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``x [..., D] -> [..., D]``; with ``residual`` (shaped like ``x``) the norm of ``x + residual`` and the
        sum: ``(norm(x + residual), x + residual)``."""
        return rms_norm(x, self.weight, self.eps, residual)

    def modulated(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``norm(x) * (1 + scale) + shift`` (AdaLN; ``shift``/``scale`` broadcast over ``x [..., D]``) as one op:
        :func:`visar.ops.norm_modulate`, equal to ``modulate(self(x), shift, scale)``."""
        return norm_modulate(x, shift, scale, "rms", self.eps, self.weight)


def layer_norm_no_affine(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last axis without parameters (VAR and AdaLN-style blocks)."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)
