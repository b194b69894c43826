"""RMSNorm over the last axis, with an optional residual added first (``y = rmsnorm(x + r)``).

LlamaGen / FlowAR / xAR order: the norm is computed in float32 and cast back to the input dtype **before**
the weight is applied: ``y = cast(h * rsqrt(mean(h^2) + eps)) * weight`` with ``h = x (+ residual)`` (the sum
in the input dtype).
"""
from __future__ import annotations

import torch

from visar.ops.dispatch import kernels, next_power_of_2, use_kernel

#: widest row the kernel takes (one program holds a row); wider rows run the reference
MAX_KERNEL_WIDTH = 1 << 16


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The PyTorch reference of :func:`rms_norm` without a residual: ``x [..., D]`` -> ``[..., D]``."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)
    return y * weight if weight is not None else y


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x [..., D]`` (float32 or bfloat16), optionally of ``x + residual``.

    Args:
        x: ``[..., D]``.
        weight: ``[D]`` per-channel weight, or ``None`` (weight-free norm).
        eps: added to the mean square (> 0).
        residual: ``None``, or a tensor shaped like ``x`` added to it first.

    Returns:
        ``y [..., D]`` in ``x``'s dtype; with ``residual``, ``(y, x + residual)``.
    """
    if weight is not None and weight.shape != x.shape[-1:]:
        raise ValueError(f"weight must be [{x.shape[-1]}] (the last axis of x), got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    D = x.shape[-1]
    if (not use_kernel(x, weight, residual) or D > MAX_KERNEL_WIDTH or x.numel() == 0
            or (residual is not None and residual.dtype != x.dtype)):
        if residual is None:
            return rms_norm_reference(x, weight, eps)
        h = x + residual
        return rms_norm_reference(h, weight, eps), h
    xr = _rows(x)
    rr = _rows(residual) if residual is not None else None
    w = weight.contiguous() if weight is not None else None
    y, h = kernels("rmsnorm").launch(xr, rr, w, float(eps), next_power_of_2(D))
    y = y.view(x.shape)
    return y if residual is None else (y, h.view(x.shape))


__all__ = ["rms_norm", "rms_norm_reference", "MAX_KERNEL_WIDTH"]
