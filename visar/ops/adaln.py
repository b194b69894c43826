"""AdaLN modulation of a normalised input: ``norm(x) * (1 + scale) + shift``.

``norm`` is a LayerNorm (``"layer"``: ``F.layer_norm`` with optional weight and bias; MAR's head blocks, DiT-style
final layers) or an RMSNorm (``"rms"``: :func:`~visar.ops.rms_norm.rms_norm_reference`, optional weight; FlowAR and
xAR blocks). ``shift`` and ``scale`` broadcast over ``x``: one row per image (``[B, 1, D]``), per token
(``[B, N, D]`` or ``[N, D]``), or per entity after the entity rows were expanded to their tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from visar.ops.dispatch import kernels, next_power_of_2, use_kernel
from visar.ops.rmsnorm import MAX_KERNEL_WIDTH, rms_norm_reference

NORMS = ("layer", "rms")


def modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` (torch broadcasting)."""
    return x * (1 + scale) + shift


def norm_modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, norm: str = "layer",
                            eps: float = 1e-6, weight: torch.Tensor | None = None,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """The PyTorch reference of :func:`norm_modulate`."""
    if norm == "layer":
        h = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    else:
        h = rms_norm_reference(x, weight, eps)
    return modulate_reference(h, shift, scale)


def _as_3d(x: torch.Tensor) -> torch.Tensor | None:
    if x.dim() == 3:
        return x
    if x.dim() == 2:
        return x[None]
    return None


def _strides(mod: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, int, int] | None:
    """``mod`` broadcast to ``[B, N, D]`` as ``(tensor, row stride over B, row stride over N)`` with unit stride
    on ``D``, or ``None`` when it does not broadcast that way."""
    if mod.dim() > 3:
        return None
    try:
        e = mod.expand(shape) if mod.dim() == 3 else mod.expand(shape[1:])[None].expand(shape)
    except RuntimeError:
        return None
    if e.stride(2) != 1:
        e = e.contiguous()
    return e, e.stride(0), e.stride(1)


def norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, norm: str = "layer", eps: float = 1e-6,
                  weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``norm(x) * (1 + scale) + shift`` for ``x [..., D]`` (float32 or bfloat16).

    Args:
        x: ``[B, N, D]`` or ``[N, D]`` (any rank for the reference).
        shift, scale: broadcastable to ``x`` (e.g. ``[B, 1, D]``, ``[B, N, D]``, ``[N, D]``); chunks of one
            modulation output (strided views) are read in place.
        norm: ``"layer"`` (LayerNorm, ``bias`` allowed) or ``"rms"`` (RMSNorm computed in float32 and cast back
            before the weight, as :class:`visar.nn.norms.RMSNorm`).
        eps: the norm's epsilon.
        weight, bias: ``[D]`` affine parameters of the norm, or ``None``.

    Returns:
        ``[..., D]`` with torch's result dtype of the reference.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm == "rms" and bias is not None:
        raise ValueError("norm='rms' takes no bias (RMSNorm has a weight only)")
    D = x.shape[-1]
    x3 = _as_3d(x)
    if (x3 is None or not use_kernel(x, shift, scale, weight, bias) or D > MAX_KERNEL_WIDTH or x.numel() == 0
            or torch.broadcast_shapes(x.shape, shift.shape, scale.shape) != x.shape):
        return norm_modulate_reference(x, shift, scale, norm, eps, weight, bias)
    x3 = x3.contiguous()
    sh, sc = _strides(shift, x3.shape), _strides(scale, x3.shape)
    if sh is None or sc is None:
        return norm_modulate_reference(x, shift, scale, norm, eps, weight, bias)
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, shift.dtype), scale.dtype)
    if weight is not None:
        out_dtype = torch.promote_types(out_dtype, weight.dtype)
    if bias is not None:
        out_dtype = torch.promote_types(out_dtype, bias.dtype)
    y = kernels("adaln").launch(x3, sh, sc, weight, bias, norm == "rms", float(eps), out_dtype,
                                        next_power_of_2(D))
    return y.view(x.shape)


__all__ = ["norm_modulate", "norm_modulate_reference", "modulate_reference", "NORMS"]
