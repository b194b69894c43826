"""Triton kernel of :func:`visar.ops.sample_logits`: one program per row, the whole row in registers.

Top-k and top-p thresholds are found by bisection on the order-preserving int32 image of the float32 logits
(33 halvings cover the int32 range exactly), so no sort is needed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from visar.ops.dispatch import next_power_of_2
from visar.ops.kernels.common import cfg_mix_f32, round_to

ITERATIONS = 33


@triton.jit
def _sample_kernel(l_ptr, u_ptr, q_ptr, out_ptr, V, cfg, temperature, top_k, top_p,
                   GUIDED: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr, ITERS: tl.constexpr,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < V
    LDT = l_ptr.dtype.element_ty
    logit = tl.load(l_ptr + row * V + offs, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        u = tl.load(u_ptr + row * V + offs, mask=mask, other=0.0).to(tl.float32)
        logit = cfg_mix_f32(logit, u, cfg, LDT, LDT)
    logit = round_to(tl.math.div_rn(logit, temperature), LDT) + 0.0  # + 0.0 turns -0.0 into +0.0
    bits = logit.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)  # ordered like the floats
    keep = mask
    if TOP_K:  # the largest threshold t with count(key >= t) >= k is the k-th largest key
        lo = tl.min(tl.where(mask, key, 1 << 32), axis=0)
        hi = tl.max(tl.where(mask, key, -(1 << 32)), axis=0)
        for _ in range(ITERS):
            mid = lo + (hi - lo + 1) // 2
            ok = tl.sum(tl.where(mask & (key >= mid), 1, 0), axis=0) >= top_k
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        keep = mask & (key >= lo)
    m = tl.max(tl.where(keep, logit, float("-inf")), axis=0)
    e = tl.where(keep, tl.exp(logit - m), 0.0)
    z = tl.sum(e, axis=0)
    if TOP_P:  # the smallest threshold t with mass(key > t) <= top_p; the kept tokens are key >= t
        target = top_p * z
        lo = tl.min(tl.where(keep, key, 1 << 32), axis=0)
        hi = tl.max(tl.where(keep, key, -(1 << 32)), axis=0)
        for _ in range(ITERS):
            mid = lo + (hi - lo) // 2
            ok = tl.sum(tl.where(keep & (key > mid), e, 0.0), axis=0) <= target
            hi = tl.where(ok, mid, hi)
            lo = tl.where(ok, lo, mid + 1)
        keep = keep & (key >= lo)
        e = tl.where(keep, e, 0.0)
        z = tl.sum(e, axis=0)
    q = tl.load(q_ptr + row * V + offs, mask=mask, other=1.0).to(tl.float32)
    score = tl.where(mask, (e / z) / q, -1.0)
    tl.store(out_ptr + row, tl.argmax(score, axis=0).to(tl.int64))


def launch(logits: torch.Tensor, uncond: torch.Tensor | None, noise: torch.Tensor, cfg: float, temperature: float,
           top_k: int, top_p: float) -> torch.Tensor:
    """``logits, uncond, noise [B, V]`` contiguous -> ``LongTensor [B]`` (see :func:`visar.ops.sample_logits`)."""
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.long, device=logits.device)
    block = next_power_of_2(V)
    warps = 4 if block <= 4096 else (8 if block <= 16384 else 16)
    _sample_kernel[(B,)](logits, uncond if uncond is not None else logits, noise, out, V, cfg, temperature,
                         top_k, top_p, GUIDED=uncond is not None, TOP_K=top_k > 0, TOP_P=top_p < 1.0,
                         ITERS=ITERATIONS, BLOCK=block, num_warps=warps)
    return out
