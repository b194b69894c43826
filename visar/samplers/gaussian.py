"""Gaussian arithmetic of continuous speculative decoding (``docs/design/samplers.md`` §2.2-2.3), in log space.

Given the shared trajectory noise ``Z``, the draft's and the target's last denoising steps are the
isotropic-per-channel Gaussians ``q = N(m_q, diag s_q^2)`` and ``p = N(m_p, diag s_p^2)`` over a token of
``C`` channels. Everything here works on rows of such pairs (``[N, C]`` tensors):

* :func:`log_density` with its normalisers (``-sum log s - C/2 log 2 pi``), in float64: in ``C = 16``
  with ``s ~ 0.02`` linear-space densities overflow float32;
* :func:`accept_draft`: ``log u < log p(x) - log q(x)`` (the speculative test, never a division);
* :func:`residual_sample`: the residual ``max(0, p - q)`` by rejection under ``p``: propose ``y ~ p``, keep
  it with probability ``max(0, 1 - q(y)/p(y))``, in growing batches up to a counted cap;
* :func:`relaxed_log_ratio`: the lossy acceptance of the public CSpD code (``relaxation = lambda``).

Randomness comes only from the given ``torch.Generator``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG_2PI = math.log(2.0 * math.pi)


def log_density(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``log N(x; mean, diag std^2)`` summed over the last axis, float64: ``[..., C] -> [...]``."""
    x, mean, std = x.double(), mean.double(), std.double()
    z = (x - mean) / std
    return -0.5 * (z * z).sum(-1) - std.log().sum(-1) - 0.5 * x.shape[-1] * LOG_2PI


def log_ratio(x: torch.Tensor, mean_p: torch.Tensor, std_p: torch.Tensor, mean_q: torch.Tensor,
              std_q: torch.Tensor) -> torch.Tensor:
    """``log p(x) - log q(x)`` of rows ``x [N, C]`` (float64 ``[N]``), normalisers included."""
    return log_density(x, mean_p, std_p) - log_density(x, mean_q, std_q)


def relaxed_log_ratio(x: torch.Tensor, mean_p: torch.Tensor, std_p: torch.Tensor, mean_q: torch.Tensor,
                      std_q: torch.Tensor, relaxation: float, path_p: torch.Tensor | None = None,
                      path_q: torch.Tensor | None = None) -> torch.Tensor:
    """The public CSpD acceptance exponent (LOSSY; ``docs/design/samplers.md`` §2.5), float64 ``[N]``:

    ``-|x - m_p|^2 / (2 l^2 s_p^2) + |x - m_q|^2 / (2 l^2 s_q^2) + sum log(s_q / s_p)
    + sum_{earlier steps} log(sigma_p,t / sigma_q,t)`` with ``l = relaxation``; ``path_p``, ``path_q``
    ``[N, C]`` are the summed log-stds of the steps before the last (``None``: left out).
    """
    x, mp, sp, mq, sq = (t.double() for t in (x, mean_p, std_p, mean_q, std_q))
    lam2 = float(relaxation) ** 2
    out = (-(((x - mp) / sp) ** 2).sum(-1) + (((x - mq) / sq) ** 2).sum(-1)) / (2.0 * lam2)
    out = out + (sq.log() - sp.log()).sum(-1)
    if path_p is not None and path_q is not None:
        out = out + (path_p.double() - path_q.double()).sum(-1)
    return out


def gaussian_draw(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``mean + std * e`` with ``e ~ N(0, I)`` from ``generator`` (``mean``'s shape, device and dtype)."""
    e = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * e


def accept_draft(log_r: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Bool ``[N]``: ``log u < log_r`` with ``u ~ U[0, 1)`` in float64 (accept with probability ``min(1, r)``)."""
    u = torch.rand(log_r.shape, generator=generator, device=log_r.device, dtype=torch.float64)
    return torch.log(u) < log_r


@dataclass
class ResidualDraw:
    """What :func:`residual_sample` returns.

    Attributes:
        tokens: ``[N, C]`` draws (a cap-hit row holds its last proposal, a draw from ``p``: biased).
        proposals: ``LongTensor [N]`` proposals used per row (cap-hit rows: the cap).
        capped: ``BoolTensor [N]`` rows that hit the cap without an accepted proposal.
    """

    tokens: torch.Tensor
    proposals: torch.Tensor
    capped: torch.Tensor


def residual_sample(mean_p: torch.Tensor, std_p: torch.Tensor, mean_q: torch.Tensor, std_q: torch.Tensor,
                    generator: torch.Generator | None, cap: int = 1_000_000, first_batch: int = 16,
                    max_batch: int = 4096) -> ResidualDraw:
    """Draw from ``r(y) ∝ max(0, p(y) - q(y))`` for each row by rejection sampling under ``p``.

    ``r <= p / TV``, so proposing ``y ~ p`` and accepting with probability ``max(0, 1 - q(y)/p(y))`` is exact
    and needs no normalising integral (§2.3); the inner acceptance rate is ``TV(p, q)``. Proposals come in
    batches per pending row (``first_batch``, then 4x larger up to ``max_batch``), each row stopping at its
    first accepted proposal, at most ``cap`` proposals per row.

    Args:
        mean_p, std_p, mean_q, std_q: ``[N, C]`` (``std > 0``).
        generator: source of the proposals and uniforms.
        cap: most proposals per row (an integer >= 1).

    Returns:
        :class:`ResidualDraw` (tokens in ``mean_p``'s dtype).
    """
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"cap (most residual proposals per token) must be an integer >= 1, got {cap!r}")
    N, C = mean_p.shape
    tokens = mean_p.clone()
    proposals = torch.zeros(N, dtype=torch.long, device=mean_p.device)
    done = torch.zeros(N, dtype=torch.bool, device=mean_p.device)
    pending = torch.arange(N, device=mean_p.device)
    batch = first_batch
    while len(pending):
        m = min(batch, cap - int(proposals[pending[0]]))  # every pending row has used the same number of tries
        mp, sp, mq, sq = (t[pending][:, None] for t in (mean_p, std_p, mean_q, std_q))  # [P, 1, C]
        e = torch.randn((len(pending), m, C), generator=generator, device=mean_p.device, dtype=mean_p.dtype)
        y = mp + sp * e  # [P, m, C] proposals from p
        d = log_density(y, mq, sq) - log_density(y, mp, sp)  # log q(y) - log p(y), [P, m]
        u = torch.rand(d.shape, generator=generator, device=d.device, dtype=torch.float64)
        ok = u < -torch.expm1(d)  # u < 1 - q(y)/p(y); never where q >= p
        hit = ok.any(1)
        first = ok.to(torch.int8).argmax(1)  # index of the first accepted proposal (0 where none)
        rows = pending[hit]
        tokens[rows] = y[hit, first[hit]]
        proposals[rows] += first[hit] + 1
        done[rows] = True
        miss = pending[~hit]
        proposals[miss] += m
        tokens[miss] = y[~hit, -1]  # a draw from p: what a cap-hit row falls back to
        pending = miss[proposals[miss] < cap]
        batch = min(4 * batch, max_batch)
    return ResidualDraw(tokens, proposals, ~done)


__all__ = ["log_density", "log_ratio", "relaxed_log_ratio", "gaussian_draw", "accept_draft", "residual_sample",
           "ResidualDraw", "LOG_2PI"]
