"""Static, preallocated key/value caches.

One tensor pair per layer (a single big tensor with per-layer slices makes a compiled step copy the
whole cache on every call). Writes happen in place at explicit positions; nothing is ever grown with
``torch.cat``. Rolling back (speculative decoding) only lowers the committed lengths in
:class:`CacheState`: entries beyond them are masked out by position and later overwritten.

The tensors start zero-filled, not ``torch.empty``: a step over the whole cache (the checked ``step`` of
next-token models, the compiled decode step, rows at different positions) reads entries nobody wrote yet,
with attention weight 0, and ``0 * NaN`` is NaN. Recycled memory can hold NaN or inf (freed ``-inf``
logits of a top-k filter, for one), so an empty cache would poison such steps. Stale entries of earlier
writes are finite and therefore harmless.
"""
from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Keys and values of one attention layer, ``[B, S_max, H, D]`` each."""

    def __init__(self, batch: int, max_len: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        shape = (batch, max_len, num_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def write(self, pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v [B, n, H, D]`` at positions ``pos`` (an int start, or per-row ``[B, n]``), cast to
        the cache's dtype (under autocast the projections come out in the autocast dtype)."""
        n = k.shape[1]
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if isinstance(pos, int):
            if pos + n > self.max_len:
                raise IndexError(f"KV cache overflow: writing {n} entries at {pos} into {self.max_len}")
            self.k[:, pos:pos + n] = k
            self.v[:, pos:pos + n] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[rows, pos] = k
            self.v[rows, pos] = v

    def read(self, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, length, D]`` (views, no copy)."""
        k, v = (self.k, self.v) if length is None else (self.k[:, :length], self.v[:, :length])
        return k.transpose(1, 2), v.transpose(1, 2)


def cache_dtype(param_dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype a new cache should hold: autocast's dtype for ``device`` while autocast is on there (what
    the attention projections produce, half the memory of float32), else ``param_dtype``."""
    kind = torch.device(device).type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return param_dtype


class CacheState(nn.Module):
    """The caches of all layers plus per-row committed lengths ``[B]``.

    ``lengths[b]`` counts the valid cache entries of row ``b``; positions ``>= lengths[b]`` are stale.
    """

    def __init__(self, num_layers: int, batch: int, max_len: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.layers = nn.ModuleList(
            KVCache(batch, max_len, num_heads, head_dim, dtype, device) for _ in range(num_layers))
        self.register_buffer("lengths", torch.zeros(batch, dtype=torch.long, device=device), persistent=False)

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        return self.layers[0].max_len

    def advance(self, n: int | torch.Tensor) -> None:
        """Mark ``n`` more entries (int, or per-row ``[B]``) as committed."""
        self.lengths += n

    def rewind(self, n: int | torch.Tensor) -> None:
        """Forget the last ``n`` committed entries (int, or per-row ``[B]``); no data is copied."""
        n = torch.as_tensor(n, device=self.lengths.device)
        if (n < 0).any() or (n > self.lengths).any():
            raise ValueError(f"cannot rewind {n.tolist()} entries from lengths {self.lengths.tolist()}")
        self.lengths -= n
