"""Triton kernel of :func:`visar.ops.cfg_mix`: blocks of 1024 elements."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from visar.ops.kernels.common import cast_to, cfg_mix_f32, cfg_scale_at, round_to, scale_args

BLOCK = 1024


@triton.jit
def _cfg_kernel(c_ptr, u_ptr, y_ptr, s_ptr, s_value, s_stride, numel, C,
                PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = cfg_scale_at(s_ptr, s_value, s_stride, offs // C, PER_ROW)
    y = cfg_mix_f32(c, u, s, c_ptr.dtype.element_ty, y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs, cast_to(y, y_ptr.dtype.element_ty), mask=mask)


def launch(cond: torch.Tensor, uncond: torch.Tensor, scale, C: int, out_dtype: torch.dtype) -> torch.Tensor:
    """``cond, uncond`` contiguous of one shape ``[..., C]`` -> the mix in ``out_dtype``."""
    y = torch.empty(cond.shape, dtype=out_dtype, device=cond.device)
    n = cond.numel()
    s_ptr, s_value, s_stride, per_row = scale_args(scale, n // C, cond.device)
    _cfg_kernel[(triton.cdiv(n, BLOCK),)](cond, uncond, y, s_ptr, s_value, s_stride, n, C, PER_ROW=per_row,
                                          BLOCK=BLOCK, num_warps=4)
    return y
