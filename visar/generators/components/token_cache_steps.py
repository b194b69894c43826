"""The cached step protocol of raster-order next-token models, written once for every such family.

:class:`CachedTokenSteps` implements :class:`~visar.generators.protocol.NextTokenModel`'s ``start`` /
``step`` / ``rewind`` (and the unchecked ``decode_step`` a sampler's hot loop uses) over a
:class:`~visar.generators.components.llama_trunk.LlamaTrunk` with a static KV cache. A family mixes it in and
provides four hooks:

* ``step_condition(cond, guided) -> (cond_tokens [R, C, D], cond_mask [R, C] or None)``: the embedded
  condition rows, ``[cond; null]`` (``R = 2B``) when ``guided``, else ``R = B`` (checks ``cond``);
* ``check_step_inputs(inputs, B, R) -> inputs``: validate ``[B or R, n]`` ids or ``[B or R, n, C]`` tokens;
* ``embed_inputs(inputs [R, n, ...]) -> [R, n, D]``: the trunk's input embeddings;
* ``emit(h [R, ..., D]) -> [R, ..., V or D]``: logits (a linear head, float32) or the hidden states
  themselves (conditioning of a token head).

Sequence layout: ``C = state.cond_len`` condition positions, then image token ``i`` at position ``C + i``;
``state.lengths [R]`` counts committed image tokens per row. Rows may sit at different positions; a row
rolls back by being fed at a smaller ``pos`` or through :meth:`CachedTokenSteps.rewind` (lengths only go
down, nothing is copied: stale entries are masked by position and overwritten later).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from visar.conditions import Condition
from visar.generators.protocol import StepState
from visar.nn.kv_cache import CacheState, cache_dtype


@dataclass
class NextTokenState(StepState):
    """Decoding state of one batch: the static cache and its attention-mask table.

    Attributes:
        batch: ``B``, the number of images; guided: rows are ``[cond; null]`` (``R = 2B``), else ``R = B``.
        cache: per-layer K/V ``[R, C + L, H, D]`` and per-row ``cache.lengths [R]`` in sequence positions
            (condition tokens included).
        mask_table: ``[R or 1, C + L, C + L]`` boolean, who may attend to whom by position.
        cond_len: ``C``, condition positions in front of the image tokens.
    """

    cache: CacheState
    mask_table: torch.Tensor
    cond_len: int = 1

    @property
    def lengths(self) -> torch.Tensor:
        """Committed image tokens per row, ``LongTensor [R]`` (cache lengths minus the condition)."""
        return self.cache.lengths - self.cond_len

    @property
    def token_lengths(self) -> torch.Tensor:
        """Alias of :attr:`lengths`."""
        return self.lengths


class CachedTokenSteps:
    """Mixin: the next-token step protocol over ``self.trunk`` (a ``LlamaTrunk``) and ``self.num_tokens``.

    Subclasses set ``emits`` and implement the hooks named in the module docstring.
    """

    # The four hooks of the module docstring (step_condition, check_step_inputs, embed_inputs, emit) are
    # defined by every subclass; no stubs here (an abc base would break FSDP's re-classing of the model).

    # -- protocol ---------------------------------------------------------------------------------
    def start(self, cond: Condition, guided: bool = False) -> tuple[NextTokenState, torch.Tensor]:
        """Allocate the static cache and prefill the condition.

        Args:
            cond: ``B`` conditions.
            guided: allocate rows ``[cond; null]`` (``R = 2B``) for classifier-free guidance; else ``R = B``.
        Returns:
            ``(state, first [R, V or D])``: the raw emission predicting image token 0 for every row;
            ``state.lengths`` is 0 for every row.
        """
        if not isinstance(guided, bool):
            raise TypeError(f"guided must be a bool (rows [cond; null] or not), got {type(guided).__name__} "
                            f"{guided!r}; the guidance scale belongs to the sampler (cfg_scale=)")
        cond_tokens, cond_mask = self.step_condition(cond, guided)
        R = cond_tokens.shape[0]
        cache = self.trunk.new_cache(R, dtype=cache_dtype(cond_tokens.dtype, cond_tokens.device),
                                     device=cond_tokens.device)
        mask_table = self.trunk.attention_mask(cond_mask)
        state = NextTokenState(batch=cond.batch_size, guided=guided, cache=cache, mask_table=mask_table,
                               cond_len=self.trunk.cond_len)
        return state, self.emit(self.trunk.prefill(cond_tokens, cache, mask_table))

    def step(self, state: NextTokenState, inputs: torch.Tensor, pos: torch.Tensor | int) -> torch.Tensor:
        """Feed image tokens and get what predicts the next ones.

        Args:
            state: from :meth:`start`.
            inputs: ``[B, n, ...]`` (fed to both CFG halves) or ``[R, n, ...]``: ``inputs[:, j]`` is image
                token ``pos + j`` (ids ``LongTensor [., n]`` or continuous tokens ``[., n, C]``).
            pos: per-row image index of ``inputs[:, 0]`` (an int, ``[B]`` or ``[R]``). Each must be ``<=``
                the row's committed tokens; a smaller value rolls the row back.
        Returns:
            ``[R, n, V or D]``: entry ``j`` predicts image token ``pos + j + 1``. Committed lengths become
            ``pos + n``.
        """
        R, B = state.rows, state.batch
        inputs = self.check_step_inputs(inputs, B, R)
        device = state.cache.lengths.device
        pos = torch.as_tensor(pos, dtype=torch.long, device=device)
        pos = pos.expand(inputs.shape[0]) if pos.dim() == 0 else pos
        if pos.shape != (inputs.shape[0],):
            raise ValueError(f"pos must be an int or a [{inputs.shape[0]}] tensor, got shape {tuple(pos.shape)}")
        if inputs.shape[0] == B and R != B:  # both CFG halves get the same tokens
            inputs, pos = inputs.repeat(2, *[1] * (inputs.dim() - 1)), pos.repeat(2)
        committed = state.lengths
        if (pos < 0).any() or (pos > committed).any():
            raise ValueError(f"pos {pos.tolist()} must lie in [0, committed tokens {committed.tolist()}]: "
                             "a row cannot skip positions")
        n = inputs.shape[1]
        if int(pos.max()) + n > self.num_tokens:
            raise ValueError(f"writing {n} tokens at {int(pos.max())} overflows the {self.num_tokens}-token image")
        return self.decode_step(state, inputs.to(device), pos)

    def rewind(self, state: NextTokenState, n: int | torch.Tensor) -> None:
        """Forget the last ``n`` committed image tokens (int or per-row ``[R]``); nothing is copied."""
        n = torch.as_tensor(n, device=state.cache.lengths.device)
        if ((state.lengths - n) < 0).any():
            raise ValueError(f"cannot rewind {n.tolist()} tokens: rows hold {state.lengths.tolist()} image tokens")
        state.cache.rewind(n)

    # -- unchecked fast path ----------------------------------------------------------------------
    def decode_step(self, state: NextTokenState, inputs: torch.Tensor, pos: torch.Tensor,
                    attend_len: int | None = None) -> torch.Tensor:
        """Unchecked :meth:`step` for samplers' hot loops: ``inputs [R, n, ...]`` on the cache's device at
        image positions ``pos [R]``. ``attend_len`` limits attention to the first cache entries (it must
        exceed every written position); ``None`` attends over the whole cache (static shapes: what
        ``compile=True`` compiles, :mod:`visar.samplers.compiled`). Returns ``[R, n, V or D]`` and sets
        committed lengths to ``pos + n``."""
        n = inputs.shape[1]
        seq_pos = state.cond_len + pos[:, None] + torch.arange(n, device=pos.device)  # [R, n]
        h = self.trunk.extend(self.embed_inputs(inputs), seq_pos, state.cache, state.mask_table, attend_len)
        state.cache.lengths.copy_(seq_pos[:, -1] + 1)
        return self.emit(h)


__all__ = ["NextTokenState", "CachedTokenSteps"]
