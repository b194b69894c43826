"""Triton kernel of :func:`visar.ops.gated_activation` and :func:`visar.ops.gelu`: blocks of 1024 elements."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from visar.ops.kernels.common import cast_to, round_to

BLOCK = 1024
_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


@triton.jit
def _act(x, ACT: tl.constexpr):
    if ACT == 0:  # silu
        y = x / (1.0 + tl.exp(-x))
    elif ACT == 1:  # gelu, exact erf
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    else:  # gelu, tanh approximation; tanh(u) = 1 - 2 / (exp(2u) + 1), |u| <= 20 (float32 tanh is +-1 there)
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        u = tl.minimum(tl.maximum(u, -20.0), 20.0)
        y = 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
    return y


@triton.jit
def _gated_kernel(a_ptr, b_ptr, y_ptr, numel, GATED: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = _act(a, ACT)
    if GATED:
        y = round_to(y, y_ptr.dtype.element_ty)  # the reference rounds act(a) before the product
        y = y * tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, cast_to(y, y_ptr.dtype.element_ty), mask=mask)


def launch(a: torch.Tensor, b: torch.Tensor | None, act: str) -> torch.Tensor:
    """``act(a) * b`` (or ``act(a)`` when ``b`` is ``None``) of contiguous tensors of one shape -> ``a``'s shape."""
    y = torch.empty_like(a)
    n = a.numel()
    _gated_kernel[(triton.cdiv(n, BLOCK),)](a, b if b is not None else a, y, n, GATED=b is not None,
                                            ACT=_CODES[act], BLOCK=BLOCK, num_warps=4)
    return y
