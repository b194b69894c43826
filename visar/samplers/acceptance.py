"""Lossless draft-and-verify rule shared by the speculative and Jacobi samplers.

Three pieces (docs/speculative.md, ``docs/design/samplers.md`` section 1):

* :func:`processed_laws`: the distribution the plain sampler (``"autoregressive"``) draws a token from,
  after guidance (evaluated per row at the token's absolute position, LlamaGen's ``cfg_interval``),
  temperature, top-k and top-p: the *processed* law, on the same operations as the plain sampler;
* :func:`residual`: ``(p - q)+``, falling back to ``p`` in rows where that mass is exactly zero;
* :func:`accept_drafts`: draft tokens ``x_j ~ q_j`` are accepted while ``u_j * q_j(x_j) < p_j(x_j)``
  (float64, never divided); at the first rejection ``y`` comes from the residual, and when every draft
  is accepted from the bonus law ``p_{k'+1}``. Each emitted token then has law ``p``, whatever ``q`` is.
"""
from __future__ import annotations

from typing import Callable

import torch

from visar.nn.guidance import cfg_mix
from visar.samplers.logits import check_finite, process_logits, sample_categorical


def processed_laws(raw: torch.Tensor, batch: int, token_index: torch.Tensor, cfg_scale: float, cfg_interval: int,
                   temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Processed laws ``[B, n, V]`` (float32, rows sum to 1) of raw logits ``raw [R, n, V]``.

    Args:
        raw: model logits; rows ``[cond; uncond]`` (``R = 2B``) when guided, else ``R = B``.
        batch: ``B``.
        token_index: ``LongTensor [B, n]``, the absolute image-token index each entry predicts; token
            ``t >= 1`` uses the conditional logits alone when ``cfg_interval > -1 and t - 1 > cfg_interval``
            (the plain sampler's rule, :func:`visar.samplers.autoregressive.guided_logits`).
        cfg_scale, cfg_interval, temperature, top_k, top_p: validated options.
    """
    logits = raw
    if raw.shape[0] != batch:
        cond, uncond = raw[:batch], raw[batch:]
        logits = cfg_mix(cond, uncond, cfg_scale)
        if cfg_interval > -1:
            logits = torch.where((token_index - 1 > cfg_interval)[..., None], cond, logits)
    check_finite(logits, "speculative sampling")
    return torch.softmax(process_logits(logits, temperature, top_k, top_p), dim=-1)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Unnormalised residual weights ``max(0, p - q)`` ``[..., V]`` (float64); rows whose residual mass is
    exactly zero (``p == q``: the rejection could not have happened) fall back to ``p``."""
    p, q = p.double(), q.double()
    r = (p - q).clamp_min(0)
    return torch.where((r.sum(-1, keepdim=True) > 0), r, p)


def accept_drafts(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, proposed: torch.Tensor,
                  generator: torch.Generator | None,
                  residual_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = residual,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify ``drafts`` against the target, row by row.

    Args:
        p: target laws ``[B, m + 1, V]``; ``p[:, j]`` is the law of draft position ``j`` (``j = m``: the bonus).
        q: laws ``[B, m, V]`` each draft token was drawn from.
        drafts: ``LongTensor [B, m]``, ``drafts[:, j] ~ q[:, j]``.
        proposed: ``LongTensor [B]`` in ``[0, m]``: drafts that count in each row (later ones are ignored).
        generator: source of the uniforms and of the correction draws.
        residual_fn: the correction law (weights) from ``(p_a, q_a)``; :func:`residual`.
    Returns:
        ``(accepted [B], y [B])``: accepted drafts ``a`` (the first ``a`` are kept) and the token that
        follows them: from ``residual_fn(p_a, q_a)`` when ``a < proposed``, else the bonus from ``p_a``.
    """
    B, m = drafts.shape
    u = torch.rand(B, m, generator=generator, device=p.device, dtype=torch.float64)
    px = p.gather(-1, drafts[..., None])[..., 0].double()
    qx = q.gather(-1, drafts[..., None])[..., 0].double()
    ok = (u * qx < px) & (torch.arange(m, device=p.device) < proposed[:, None])
    accepted = ok.long().cumprod(1).sum(1)  # [B]
    rows = torch.arange(B, device=p.device)
    p_a = p[rows, accepted]
    q_a = q[rows, accepted.clamp_max(m - 1)]
    weights = torch.where((accepted < proposed)[:, None], residual_fn(p_a, q_a), p_a.double())
    return accepted, sample_categorical(weights, generator)


__all__ = ["processed_laws", "residual", "accept_drafts"]
