"""Triton kernels of :func:`visar.ops.ddpm_step` and :func:`visar.ops.flow_step`: blocks of 1024 elements."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from visar.ops.kernels.common import cast_to, cfg_mix_f32, cfg_scale_at, round_to, scale_args, tl_dtype

BLOCK = 1024


@triton.jit
def _ddpm_kernel(x_ptr, out_ptr, mean_ptr, std_ptr, s_ptr, s_value, s_stride, numel, C, N,
                 x_coef, eps_coef, c1, c2, clip, log_beta, log_post_var,
                 GUIDED: tl.constexpr, PER_ROW: tl.constexpr, SHARED_X: tl.constexpr, DIVIDE: tl.constexpr,
                 CLIP: tl.constexpr, LEARNED: tl.constexpr, EDT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    row = offs // C
    col = offs % C
    OC = C * 2 if LEARNED else C  # width of a row of out
    ODT = out_ptr.dtype.element_ty
    if GUIDED:
        tok = row % N
        e_c = tl.load(out_ptr + tok * OC + col, mask=mask, other=0.0).to(tl.float32)
        e_u = tl.load(out_ptr + (tok + N) * OC + col, mask=mask, other=0.0).to(tl.float32)
        eps = cfg_mix_f32(e_c, e_u, cfg_scale_at(s_ptr, s_value, s_stride, tok, PER_ROW), ODT, EDT)
        x_row = tok if SHARED_X else row
    else:
        eps = tl.load(out_ptr + row * OC + col, mask=mask, other=0.0).to(tl.float32)
        x_row = row
    x = tl.load(x_ptr + x_row * C + col, mask=mask, other=0.0).to(tl.float32)
    XDT = x_ptr.dtype.element_ty
    MDT = mean_ptr.dtype.element_ty
    if DIVIDE:
        x0 = tl.math.div_rn(round_to(x - round_to(eps_coef * eps, EDT), MDT), x_coef)
    else:
        x0 = round_to(x_coef * x, XDT) - round_to(eps_coef * eps, EDT)
    x0 = round_to(x0, MDT)
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip), clip)
    mean = round_to(c1 * x0, MDT) + round_to(c2 * x, XDT)
    tl.store(mean_ptr + offs, cast_to(mean, MDT), mask=mask)
    if LEARNED:
        v = tl.load(out_ptr + row * OC + C + col, mask=mask, other=0.0).to(tl.float32)
        frac = round_to(round_to(v + 1.0, ODT) / 2.0, ODT)
        logvar = round_to(frac * log_beta, ODT) + round_to(round_to(1.0 - frac, ODT) * log_post_var, ODT)
        logvar = round_to(logvar, ODT)
        tl.store(std_ptr + offs, cast_to(tl.exp(round_to(0.5 * logvar, ODT)), std_ptr.dtype.element_ty), mask=mask)


def launch_ddpm(x: torch.Tensor, out: torch.Tensor, cfg, x_coef: float, eps_coef: float, c1: float, c2: float,
                x0_clip: float | None, log_beta: float | None, log_post_var: float | None, divide: bool,
                shared_x: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """See :func:`visar.ops.ddpm_step` (contiguous ``x [R, C]``, ``out [R, C or 2C]``)."""
    R, C = x.shape
    guided = cfg is not None
    N = R // 2 if guided else R
    learned = log_beta is not None
    eps_dtype = torch.result_type(out, cfg) if isinstance(cfg, torch.Tensor) else out.dtype
    mean = torch.empty((R, C), dtype=torch.promote_types(x.dtype, eps_dtype), device=x.device)
    std = torch.empty((R, C), dtype=out.dtype, device=x.device) if learned else None
    s_ptr, s_value, s_stride, per_row = scale_args(cfg if guided else 1.0, N, x.device)
    n = R * C
    _ddpm_kernel[(triton.cdiv(n, BLOCK),)](
        x, out, mean, std if std is not None else mean, s_ptr, s_value, s_stride, n, C, N,
        float(x_coef), float(eps_coef), float(c1), float(c2), float(x0_clip) if x0_clip is not None else 0.0,
        float(log_beta) if learned else 0.0, float(log_post_var) if learned else 0.0,
        GUIDED=guided, PER_ROW=per_row, SHARED_X=shared_x, DIVIDE=divide, CLIP=x0_clip is not None,
        LEARNED=learned, EDT=tl_dtype(eps_dtype), BLOCK=BLOCK, num_warps=4)
    return mean, std


@triton.jit
def _flow_kernel(x_ptr, v_ptr, vp_ptr, y_ptr, vo_ptr, s_ptr, s_value, s_stride, numel, C, dt,
                 GUIDED: tl.constexpr, PER_ROW: tl.constexpr, HEUN: tl.constexpr, MIX_DT: tl.constexpr,
                 BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    VDT = vo_ptr.dtype.element_ty
    if GUIDED:
        v_c = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v_u = tl.load(v_ptr + numel + offs, mask=mask, other=0.0).to(tl.float32)
        v = cfg_mix_f32(v_c, v_u, cfg_scale_at(s_ptr, s_value, s_stride, offs // C, PER_ROW), v_ptr.dtype.element_ty,
                        MIX_DT)
    else:
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HEUN:
        vp = tl.load(vp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = round_to(0.5 * round_to(vp + v, VDT), VDT)
    tl.store(vo_ptr + offs, cast_to(v, VDT), mask=mask)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    YDT = y_ptr.dtype.element_ty
    tl.store(y_ptr + offs, cast_to((x + round_to(dt * v, VDT)), YDT), mask=mask)


def launch_flow(x: torch.Tensor, v: torch.Tensor, dt: float, cfg, v_prev: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`visar.ops.flow_step` (contiguous tensors)."""
    N, C = x.shape
    guided = cfg is not None
    mix_dtype = torch.result_type(v, cfg) if isinstance(cfg, torch.Tensor) else v.dtype
    v_dtype = torch.promote_types(mix_dtype, v_prev.dtype) if v_prev is not None else mix_dtype
    v_out = torch.empty((N, C), dtype=v_dtype, device=x.device)
    y = torch.empty((N, C), dtype=torch.promote_types(x.dtype, v_dtype), device=x.device)
    s_ptr, s_value, s_stride, per_row = scale_args(cfg if guided else 1.0, N, x.device)
    n = N * C
    _flow_kernel[(triton.cdiv(n, BLOCK),)](x, v, v_prev if v_prev is not None else v, y, v_out, s_ptr, s_value,
                                           s_stride, n, C, dt, GUIDED=guided, PER_ROW=per_row,
                                           HEUN=v_prev is not None, MIX_DT=tl_dtype(mix_dtype), BLOCK=BLOCK,
                                           num_warps=4)
    return y, v_out
