"""Ragged per-row feeding of a next-token model's cache (draft-and-verify samplers).

:class:`RaggedFeeder` keeps, for one :class:`~visar.generators.protocol.NextTokenModel` and one token
buffer ``buf [B, L]`` (the sampler's committed tokens, then its drafts), how many leading buffer tokens
of each row the model's cache holds (``cached [B]``). One :meth:`RaggedFeeder.feed` is one model pass:
every row is fed the same number ``m`` of tokens from its own position, so rows stay ragged. Rolling a
row back is lowering ``cached`` (:meth:`RaggedFeeder.forget_from`); the next pass then feeds that row
from the lower position (a smaller ``pos`` rolls the model's row back; nothing is copied).

Rows that need fewer than ``m`` tokens are fed whatever follows in the buffer, at positions at or after
their cached length: those entries are stale by the protocol's rule and are overwritten before they are
read. A window that would run past the image is shifted back and re-feeds committed tokens.
"""
from __future__ import annotations

from typing import Any

import torch

from visar.conditions import Condition


class RaggedFeeder:
    """One model's state, its per-row cached lengths and its pass count.

    Args:
        model: a logits-emitting ``NextTokenModel``; only ``start`` and ``step`` are used (and the
            unchecked ``decode_step`` of cached visar models, when present).
        cond: ``B`` conditions; guided: rows ``[cond; null]`` (``R = 2B``).
        length: ``L``, tokens per row in the buffer (at most ``model.num_tokens``).

    Attributes:
        first: raw logits ``[R, V]`` of image token 0 (from ``start``).
        cached: ``LongTensor [B]``, leading buffer tokens of each row the cache holds.
        passes: model calls so far (``start`` counts 1).
    """

    def __init__(self, model: Any, cond: Condition, guided: bool, length: int):
        self.model, self.length = model, length
        self.state, self.first = model.start(cond, guided)
        self.batch = cond.batch_size
        self.rows = self.first.shape[0]
        self.halves = self.rows // self.batch
        self.device = self.first.device
        self.cached = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        self.passes = 1
        self.fast = hasattr(model, "decode_step") and hasattr(self.state, "cond_len")
        self.window_start = self.cached.clone()  # [B]: position of the last pass's first token
        self.raw: torch.Tensor | None = None

    def feed(self, buf: torch.Tensor, upto: torch.Tensor) -> bool:
        """One pass that makes row ``b`` hold ``buf[b, :upto[b]]`` (``upto >= cached``; equal: nothing needed).

        Returns False (and runs nothing) when no row needs a token. Afterwards :meth:`laws` reads the
        raw logits of the tokens that follow the fed ones.
        """
        need = upto - self.cached
        m = int(need.max())
        if m <= 0:
            return False
        start = torch.minimum(self.cached, torch.full_like(self.cached, self.length - m))  # [B], >= 0
        idx = start[:, None] + torch.arange(m, device=self.device)
        inputs = buf.gather(1, idx).repeat(self.halves, 1)  # [R, m]: both guidance halves
        pos = start.repeat(self.halves)
        if self.fast:
            raw = self.model.decode_step(self.state, inputs, pos, self.state.cond_len + int(start.max()) + m)
        else:
            raw = self.model.step(self.state, inputs, pos)
        self.passes += 1
        self.raw, self.window_start = raw, start
        self.cached = torch.maximum(self.cached, upto)
        return True

    def laws(self, token_index: torch.Tensor) -> torch.Tensor:
        """Raw logits ``[R, n, V]`` predicting image tokens ``token_index [B, n]``.

        Token 0 comes from ``start``; token ``t >= 1`` from the last pass, which must have fed token
        ``t - 1`` of that row (indices outside the last window are clamped: rows that needed nothing get
        logits that mean nothing, which callers ignore).
        """
        first = self.first[:, None].expand(-1, token_index.shape[1], -1)
        if self.raw is None:
            return first
        idx = (token_index - 1 - self.window_start[:, None]).clamp(0, self.raw.shape[1] - 1).repeat(self.halves, 1)
        out = self.raw.gather(1, idx[..., None].expand(-1, -1, self.raw.shape[-1]))
        return torch.where((token_index == 0).repeat(self.halves, 1)[..., None], first, out)

    def forget_from(self, position: torch.Tensor) -> None:
        """Buffer tokens at ``position [B]`` and after changed: the cache no longer holds them."""
        self.cached = torch.minimum(self.cached, position)


__all__ = ["RaggedFeeder"]
