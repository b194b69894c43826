"""Continuous speculative decoding, causal layout: raster-order next-token models (``docs/design/samplers.md`` §2.6).

:func:`sample_causal` drives a target and a draft :class:`~visar.generators.protocol.NextTokenModel` that
emit head conditioning. With ``n[b]`` committed tokens in image row ``b``:

1. **prefill** (target alone, plain sampling): tokens ``0 .. P-1``, ``P >= 1`` (token 0 comes from the
   target's ``start`` pass). The last committed token is always *pending*: the next target pass feeds it.
2. **draft** ``k'[b] = min(k, L - n[b])`` tokens (``max_b k'[b]`` draft passes): the draft catches up with
   the committed tokens it has not seen (a window of 2, re-feeding one cached token when only one is new;
   the first round feeds all ``P``), then draws ``x_j`` for positions ``n + j`` on trajectory noise
   ``Z_j`` (stored), feeding ``x_j`` back.
3. **verify**: one target pass over a window of ``W = k + 1`` tokens starting at ``s = min(n - 1, L - W)``
   (the pending token, then the drafts; rows near the end re-feed committed tokens instead so the window
   stays inside the image) gives ``p`` for positions ``n .. n + k'``; the target's chains run on the same
   ``Z_j`` (the bonus position on noise no committed token used).
4. **accept** the longest prefix with ``log u_j < log p_j(x_j) - log q_j(x_j)``; at the first rejection
   ``a`` draw the residual ``max(0, p_a - q_a)``; if all ``k'`` were accepted and the image is not
   complete, draw the bonus from ``p_{k'}``. Commit ``a + 1`` tokens (``a`` at the image's end).
5. **rollback** is by position: the next passes of both models start at the first position that is not
   validly cached (a smaller ``pos`` rolls the row back, §1.3), so rejected drafts are overwritten before
   anything attends to them. Rows finish in different rounds (ragged, §1.4 A); finished rows keep feeding
   committed tokens at the image's end and are ignored.

Each emitted token has the law ``p(. | everything emitted before)``: the target with the same guidance,
temperature and head steps and a real Gaussian last step, i.e. ``ContinuousARSampler`` with
``final_noise=True``.
"""
from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from visar.conditions import Condition
from visar.samplers.cspd_heads import HeadPair, LastStep


def position_cfg(scale: float, schedule: str, pos: torch.Tensor, num_tokens: int,
                 like: torch.Tensor) -> float | torch.Tensor:
    """Guidance scale of image tokens ``pos [N]``: ``scale`` (constant) or MAR's linear ramp
    ``1 + (scale - 1)(i + 1) / L`` per token as ``[N, 1]`` in ``like``'s dtype (the
    :func:`~visar.samplers.continuous_ar.token_cfg` value at each token's own position)."""
    if schedule == "constant":
        return scale
    ramp = 1.0 + (scale - 1.0) * (pos.to(torch.float64) + 1.0) / num_tokens
    return ramp.to(like.dtype)[:, None]


def _halves(z: torch.Tensor, batch: int, guided: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows ``[cond; null]`` -> ``(cond [B, ...], null [B, ...] or None)``."""
    return (z[:batch], z[batch:]) if guided else (z, None)


class _Grid:
    """Last-step Gaussians of a ``[B, J]`` grid of (row, position) slots."""

    def __init__(self, batch: int, width: int, like: torch.Tensor, path: bool):
        self.mean = like.new_zeros(batch, width, like.shape[-1])
        self.std = torch.ones_like(self.mean)
        self.path = torch.zeros_like(self.mean) if path else None

    def put(self, b: torch.Tensor, j: torch.Tensor | int, step: LastStep) -> None:
        self.mean[b, j], self.std[b, j] = step.mean, step.std
        if self.path is not None:
            self.path[b, j] = step.path

    def get(self, b: torch.Tensor, j: torch.Tensor) -> LastStep:
        return LastStep(self.mean[b, j], self.std[b, j], None if self.path is None else self.path[b, j])


@torch.no_grad()
def sample_causal(target: Any, draft: Any, cond: Condition, pair: HeadPair, *, k: int, prefill: int,
                  cfg_scale: float, draft_cfg_scale: float, cfg_schedule: str, progress: bool,
                  stats: dict) -> torch.Tensor:
    """Tokens ``[B, L, C]`` of the target's law (module docstring); counts go into ``stats``.

    Args:
        target, draft: next-token models emitting head conditioning, same ``num_tokens`` and ``token_dim``.
        cond: ``B`` conditions.
        pair: the two heads (:class:`~visar.samplers.cspd_heads.HeadPair`).
        k: draft length ``>= 1``; prefill: target-only tokens ``P`` in ``[1, L]``.
        cfg_scale, draft_cfg_scale, cfg_schedule: guidance of each model, evaluated at each token's position.
    """
    L, B = target.num_tokens, cond.batch_size
    g_p, g_q = pair.guided["target"], pair.guided["draft"]
    tstate, z = target.start(cond, g_p)  # z [R, D] predicts token 0
    dstate, _ = draft.start(cond, g_q)
    stats.update(target_passes=1, draft_passes=1, rounds=0, row_rounds=0, round_tokens=0)
    C = target.token_dim
    out = z.new_zeros(B, L, C)  # committed tokens
    dev = out.device
    rows = torch.arange(B, device=dev)

    def cfg_p(pos):
        return position_cfg(cfg_scale, cfg_schedule, pos, L, out)

    def cfg_q(pos):
        return position_cfg(draft_cfg_scale, cfg_schedule, pos, L, out)

    bar = tqdm(total=L, disable=not progress, desc="CSpD")
    # -- 1. prefill: plain target sampling (token 0 from the start pass)
    for i in range(prefill):
        if i:
            z = target.step(tstate, out[:, i - 1:i], i - 1)[:, 0]
            stats["target_passes"] += 1
        zc, zu = _halves(z, B, g_p)
        start, steps = pair.noise(B, out)
        out[:, i] = pair.draw(pair.last_step("target", zc, zu, cfg_p(torch.full((B,), i, device=dev)), start, steps))
    bar.update(prefill)
    n = torch.full((B,), prefill, dtype=torch.long, device=dev)
    kk = min(k, L - prefill)
    W = kk + 1
    J = torch.arange(W, device=dev)
    relaxed = pair.relaxation is not None
    first_round = True
    while bool((n < L).any()):
        kr = (L - n).clamp(max=kk)  # drafts per row this round (0 for finished rows)
        # -- 2. draft: catch up with the committed tokens, then kk draws
        lo = torch.zeros_like(n) if first_round else n - 2
        width = prefill if first_round else 2
        window = out[rows[:, None], lo[:, None] + torch.arange(width, device=dev)]  # [B, width, C]
        zq = draft.step(dstate, window, lo)[:, -1]  # predicts token n
        stats["draft_passes"] += 1
        start, steps = pair.noise(B * W, out)
        start, steps = start.view(B, W, C), steps.view(steps.shape[0], B, W, C)
        xs = out.new_zeros(B, kk, C)
        Q = _Grid(B, kk, out, relaxed)
        for j in range(int(kr.max())):  # rows near the end draft fewer; no pass for drafts nobody needs
            if j:
                zq = draft.step(dstate, xs[:, j - 1:j], (n + j - 1).clamp(max=L - 1))[:, 0]
                stats["draft_passes"] += 1
            b = rows[kr > j]
            zc, zu = _halves(zq, B, g_q)
            q = pair.last_step("draft", zc[b], None if zu is None else zu[b], cfg_q(n[b] + j), start[b, j],
                               steps[:, b, j])
            xs[b, j] = pair.draw(q)
            Q.put(b, j, q)
        # -- 3. verify: one target pass over [pending token, drafts] (or committed tokens at the end)
        s = (n - 1).clamp(max=L - W)
        seq = out.clone()
        bd, jd = (J[None, :kk] < kr[:, None]).nonzero(as_tuple=True)  # drafted slots
        seq[bd, n[bd] + jd] = xs[bd, jd]
        zp = target.step(tstate, seq[rows[:, None], s[:, None] + J], s)  # [R, W, D]; entry e predicts s + e + 1
        stats["target_passes"] += 1
        need = (J[None] <= kr[:, None]) & (n[:, None] + J[None] < L)  # positions n .. n + k' inside the image
        bp, jp = need.nonzero(as_tuple=True)
        e = n[bp] - 1 - s[bp] + jp
        zc, zu = _halves(zp, B, g_p)
        P = _Grid(B, W, out, relaxed)
        P.put(bp, jp, pair.last_step("target", zc[bp, e], None if zu is None else zu[bp, e], cfg_p(n[bp] + jp),
                                     start[bp, jp], steps[:, bp, jp]))
        # -- 4. the speculative test, the accepted prefix, the residual or the bonus
        acc = torch.zeros(B, kk, dtype=torch.bool, device=dev)
        acc[bd, jd] = pair.accept(xs[bd, jd], P.get(bd, jd), Q.get(bd, jd))
        a = acc.to(torch.long).cumprod(1).sum(1)  # accepted prefix length per row
        rej = a < kr
        bonus = ~rej & (n + kr < L)
        y = out.new_zeros(B, C)
        br = rows[rej]
        y[br] = pair.residual(P.get(br, a[br]), Q.get(br, a[br]))
        bb = rows[bonus]
        y[bb] = pair.draw(P.get(bb, kr[bb]))
        # -- 5. commit; the next passes start where the caches stop being valid
        ba, ja = (J[None, :kk] < a[:, None]).nonzero(as_tuple=True)
        out[ba, n[ba] + ja] = xs[ba, ja]
        by = rows[rej | bonus]
        out[by, n[by] + a[by]] = y[by]
        stats["drafted"] += int(kr.sum())
        stats["accepted"] += int(a.sum())
        stats["rejected"] += int(rej.sum())
        stats["rounds"] += 1
        stats["row_rounds"] += int((kr > 0).sum())
        emitted = a + (rej | bonus).to(torch.long)
        stats["round_tokens"] += int(emitted.sum())
        done = int(n.min())
        n = n + emitted
        bar.update(int(n.min()) - done)
        first_round = False
    bar.close()
    return out


__all__ = ["sample_causal", "position_cfg"]
