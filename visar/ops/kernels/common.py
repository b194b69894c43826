"""Triton helpers shared by the kernels (inlined into them)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def round_to(x, DT: tl.constexpr):
    """``x`` (float32) rounded to the dtype ``DT`` (to nearest, ties to even) and back: the rounding a torch op
    in ``DT`` makes. bfloat16 is rounded with integer arithmetic on the bits, because Triton's interpreter
    truncates in ``.to(tl.bfloat16)`` (the GPU rounds to nearest); the result then casts exactly everywhere."""
    if DT == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        y = bits.to(tl.float32, bitcast=True)
    elif DT == tl.float32:
        y = x
    else:
        y = x.to(DT).to(tl.float32)
    return y


@triton.jit
def cast_to(x, DT: tl.constexpr):
    """``x`` (float32) as ``DT``, rounded to nearest (ties to even), for a store."""
    return round_to(x, DT).to(DT)


@triton.jit
def cfg_scale_at(scale_ptr, scale_value, scale_stride, row, PER_ROW: tl.constexpr):
    """The guidance scale of ``row``: ``scale_value`` or ``scale_ptr[row * scale_stride]`` (float32)."""
    if PER_ROW:
        s = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
    else:
        s = scale_value
    return s


@triton.jit
def cfg_mix_f32(cond, uncond, scale, DIFF_DT: tl.constexpr, DT: tl.constexpr):
    """``uncond + (cond - uncond) * scale`` rounded as torch computes it: the difference in ``DIFF_DT`` (the
    inputs' dtype), the product and the sum in ``DT`` (the result dtype, wider with a float32 scale tensor)."""
    d = round_to(cond - uncond, DIFF_DT)
    return round_to(uncond + round_to(d * scale, DT), DT)


TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a torch floating dtype (float32, bfloat16, float16)."""
    return TL_DTYPES[dtype]


def scale_args(scale, rows: int, device: torch.device) -> tuple:
    """Kernel arguments ``(scale_ptr, scale_value, scale_stride, PER_ROW)`` of a guidance scale: a number, or a
    tensor of 1 or ``rows`` elements (read on the device: no host synchronisation)."""
    if isinstance(scale, torch.Tensor):
        flat = scale.reshape(-1).to(device)
        if flat.numel() not in (1, rows):
            raise ValueError(f"a guidance scale tensor must hold 1 or {rows} (one per row) values, got {flat.numel()}")
        return flat, 0.0, (0 if flat.numel() == 1 else 1), True
    return torch.empty(1, device=device), float(scale), 0, False
