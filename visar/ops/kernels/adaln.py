"""Triton kernel of :func:`visar.ops.adaln`: one program per row of ``x [B, N, D]``."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from visar.ops.kernels.common import cast_to, round_to


@triton.jit
def _norm_modulate_kernel(x_ptr, shift_ptr, scale_ptr, w_ptr, b_ptr, y_ptr, N, D, eps,
                          sh_sb, sh_sn, sc_sb, sc_sn,
                          RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // N
    n = row % N
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        h = x * tl.math.rsqrt(tl.sum(x * x, axis=0) / D + eps)
        h = round_to(h, x_ptr.dtype.element_ty)  # RMSNorm casts back before its weight
        if HAS_WEIGHT:
            h = h * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        mean = tl.sum(x, axis=0) / D
        d = tl.where(mask, x - mean, 0.0)
        h = d * tl.math.rsqrt(tl.sum(d * d, axis=0) / D + eps)
        if HAS_WEIGHT:
            h = h * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            h = h + tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = round_to(h, x_ptr.dtype.element_ty)  # the norm's output dtype
    shift = tl.load(shift_ptr + b * sh_sb + n * sh_sn + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * sc_sb + n * sc_sn + offs, mask=mask, other=0.0).to(tl.float32)
    one_plus = round_to(1.0 + scale, y_ptr.dtype.element_ty)
    y = round_to(h * one_plus, y_ptr.dtype.element_ty) + shift
    tl.store(y_ptr + row * D + offs, cast_to(y, y_ptr.dtype.element_ty), mask=mask)


def launch(x: torch.Tensor, shift: tuple, scale: tuple, weight: torch.Tensor | None, bias: torch.Tensor | None,
           rms: bool, eps: float, out_dtype: torch.dtype, block: int) -> torch.Tensor:
    """``x [B, N, D]`` contiguous; ``shift``/``scale`` as ``(tensor, stride over B, stride over N)`` with unit stride
    on ``D`` -> ``[B, N, D]`` in ``out_dtype``."""
    B, N, D = x.shape
    y = torch.empty((B, N, D), dtype=out_dtype, device=x.device)
    (sh, sh_sb, sh_sn), (sc, sc_sb, sc_sn) = shift, scale
    _norm_modulate_kernel[(B * N,)](x, sh, sc, weight if weight is not None else x, bias if bias is not None else x,
                                    y, N, D, eps, sh_sb, sh_sn, sc_sb, sc_sn, RMS=rms, HAS_WEIGHT=weight is not None,
                                    HAS_BIAS=bias is not None, BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return y
