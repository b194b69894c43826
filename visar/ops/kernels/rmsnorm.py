"""Triton kernel of :func:`visar.ops.rmsnorm`: one program per row."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from visar.ops.kernels.common import cast_to, round_to


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, D, eps,
                     HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    h = tl.load(x_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h = h + tl.load(r_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
        h = round_to(h, h_ptr.dtype.element_ty)  # the sum in the input dtype, as the reference adds
        tl.store(h_ptr + row * D + offs, cast_to(h, h_ptr.dtype.element_ty), mask=mask)
    ms = tl.sum(h * h, axis=0) / D
    y = round_to(h * tl.math.rsqrt(ms + eps), x_ptr.dtype.element_ty)  # cast back before the weight
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + offs, cast_to(y, y_ptr.dtype.element_ty), mask=mask)


def launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
           block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x, residual [M, D]`` contiguous, ``weight [D]`` or ``None`` -> ``(y [M, D], x + residual or None)``."""
    M, D = x.shape
    out_dtype = torch.promote_types(x.dtype, weight.dtype) if weight is not None else x.dtype
    y = torch.empty((M, D), dtype=out_dtype, device=x.device)
    h = torch.empty_like(x) if residual is not None else None
    _rms_norm_kernel[(M,)](x, residual if residual is not None else x, weight if weight is not None else x, y,
                           h if h is not None else y, D, eps, HAS_RESIDUAL=residual is not None,
                           HAS_WEIGHT=weight is not None, BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return y, h
