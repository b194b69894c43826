"""Classifier-free guidance mixing ``uncond + (cond - uncond) * scale`` as one kernel.

Used by :func:`visar.nn.guidance.cfg_mix` (guided velocities of FlowAR and xAR, guided noise of the token
heads, guided logits). ``scale`` is a number, a one-element tensor, or one value per row (``[..., 1]`` over
``cond [..., C]``).
"""
from __future__ import annotations

import torch

from visar.ops.dispatch import kernels, use_kernel


def cfg_mix_reference(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``uncond + (cond - uncond) * scale`` with torch (broadcasting)."""
    return uncond + (cond - uncond) * scale


def _per_row_scale(scale: torch.Tensor, cond: torch.Tensor) -> bool:
    """Whether ``scale`` is one value (``numel 1``) or one per row of ``cond [..., C]`` (shape ``[..., 1]``)."""
    if scale.numel() == 1:
        return True
    return scale.dim() == cond.dim() and scale.shape[:-1] == cond.shape[:-1] and scale.shape[-1] == 1


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Guided prediction ``uncond + (cond - uncond) * scale`` of ``cond, uncond [..., C]``.

    ``scale == 1`` is no guidance (callers normally skip the unconditional rows then); the result has torch's
    result dtype of the reference expression.
    """
    tensor_scale = isinstance(scale, torch.Tensor)
    if (not use_kernel(cond, uncond, scale if tensor_scale else None) or cond.shape != uncond.shape
            or cond.dtype != uncond.dtype or cond.numel() == 0 or cond.dim() == 0
            or (tensor_scale and not _per_row_scale(scale, cond))):
        return cfg_mix_reference(cond, uncond, scale)
    out_dtype = torch.result_type(cond, scale) if tensor_scale else cond.dtype
    C = cond.shape[-1]
    y = kernels("cfg").launch(cond.contiguous(), uncond.contiguous(), scale, C, out_dtype)
    return y.view(cond.shape)


__all__ = ["cfg_mix", "cfg_mix_reference"]
