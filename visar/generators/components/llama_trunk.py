"""The causal Llama transformer trunk of next-token image generators (LlamaGen, Sun et al. 2024).

The trunk knows nothing about what a token is: it maps **condition tokens** ``[B, C, D]`` followed by
**input embeddings** ``[B, N, D]`` to hidden states after the final RMSNorm. The discrete generator
(:mod:`visar.generators.next_token.llamagen`) adds a token embedding and a logits head around it; a
continuous-token variant adds a linear input projection and a diffusion head instead.

Sequence layout (LlamaGen): positions ``0..C-1`` hold the condition tokens (one class embedding, or
120 projected caption features), position ``C + i`` holds image token ``i``; the hidden state at
position ``C - 1 + i`` predicts image token ``i``. Rotary embeddings are 2D over the image grid with
**zero rows** (cos = sin = 0) for the condition positions, exactly as the official table: their
queries and keys are multiplied by zero, so the condition enters attention only through its values.

Cached decoding runs on a static :class:`~visar.nn.kv_cache.CacheState`: keys/values are written in
place at explicit per-row positions and a query at position ``t`` attends to keys ``<= t`` of its own
row (plus the caption padding rule), so entries beyond a row's committed length are never read and
rolling back is just lowering ``lengths``.
"""
from __future__ import annotations

import torch
from torch import nn

from visar.nn.attention import Attention
from visar.nn.kv_cache import CacheState
from visar.nn.mlp import GeluMlp, SwiGLU, find_multiple
from visar.nn.norms import RMSNorm
from visar.nn.rope import grid_positions, rope_2d_angles, rope_tables


def llama_ffn_hidden(dim: int, multiple_of: int = 256) -> int:
    """LlamaGen's SwiGLU width ``find_multiple(int(2 * 4 * dim / 3), multiple_of)`` (2048 for dim 768)."""
    return find_multiple(int(2 * 4 * dim / 3), multiple_of)


class LlamaBlock(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x))``, ``out = h + swiglu(norm(h))`` (no biases anywhere)."""

    def __init__(self, dim: int, num_heads: int, ffn_hidden: int, norm_eps: float = 1e-5,
                 attn_dropout: float = 0.0, resid_dropout: float = 0.0, ffn_dropout: float = 0.0):
        super().__init__()
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=False, proj_bias=False,
                              attn_dropout=attn_dropout, proj_dropout=resid_dropout)
        self.mlp_norm = RMSNorm(dim, norm_eps)
        self.mlp = SwiGLU(dim, ffn_hidden, bias=False, act="silu", dropout=ffn_dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache=None, cache_pos=None, attend_len: int | None = None) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), rope=rope, mask=mask, cache=cache, cache_pos=cache_pos,
                          attend_len=attend_len)
        return h + self.mlp(self.mlp_norm(h))


class CaptionEmbedding(nn.Module):
    """Text condition tokens: ``fc2(gelu_tanh(fc1(caption)))`` without biases (LlamaGen t2i).

    ``uncond_embedding [cond_len, caption_dim]`` is the learned unconditional caption used for CFG
    (a persistent buffer in the official checkpoints). ``forward(caption, drop_prob, generator)``
    replaces whole captions by it with probability ``drop_prob`` (CFG training).
    """

    def __init__(self, caption_dim: int, dim: int, cond_len: int = 120):
        super().__init__()
        self.caption_dim, self.cond_len = caption_dim, cond_len
        self.register_buffer("uncond_embedding", torch.randn(cond_len, caption_dim) / caption_dim ** 0.5)
        self.proj = GeluMlp(caption_dim, dim, out_dim=dim, bias=False, approximate="tanh")

    def forward(self, caption: torch.Tensor, drop_prob: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """``caption [B, cond_len, caption_dim] -> [B, cond_len, dim]``."""
        if drop_prob > 0:
            drop = torch.rand(caption.shape[0], generator=generator, device=caption.device) < drop_prob
            caption = torch.where(drop[:, None, None], self.uncond_embedding.to(caption.dtype), caption)
        return self.proj(caption)


class LlamaTrunk(nn.Module):
    """Condition tokens + input embeddings -> hidden states, with or without a static KV cache.

    Args:
        dim: width ``D``.
        depth: number of blocks.
        num_heads: attention heads (``head_dim = D / num_heads``, divisible by 4 for 2D RoPE).
        cond_len: ``C``, number of condition tokens (1 for class labels, 120 for LlamaGen t2i).
        grid_size: image tokens per side; the sequence holds ``grid_size**2`` image tokens.
        ffn_hidden: SwiGLU width; ``None`` uses :func:`llama_ffn_hidden`.
        rope_base, norm_eps: RoPE base and RMSNorm epsilon.
        token_dropout, attn_dropout, resid_dropout, ffn_dropout: training-only dropouts (LlamaGen
            applies ``token_dropout`` to the embedded sequence, ``resid_dropout`` after the attention
            projection and ``ffn_dropout`` after the SwiGLU).
    """

    def __init__(self, dim: int, depth: int, num_heads: int, cond_len: int, grid_size: int,
                 ffn_hidden: int | None = None, rope_base: float = 10000.0, norm_eps: float = 1e-5,
                 token_dropout: float = 0.0, attn_dropout: float = 0.0, resid_dropout: float = 0.0,
                 ffn_dropout: float = 0.0):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 4:
            raise ValueError(f"width {dim} with {num_heads} heads gives head_dim {dim / num_heads}; "
                             "2D RoPE needs an integer head_dim divisible by 4")
        self.dim, self.depth, self.num_heads, self.head_dim = dim, depth, num_heads, dim // num_heads
        self.cond_len, self.grid_size = cond_len, grid_size
        self.num_tokens = grid_size * grid_size
        hidden = ffn_hidden or llama_ffn_hidden(dim)
        self.drop = nn.Dropout(token_dropout)
        self.blocks = nn.ModuleList(
            LlamaBlock(dim, num_heads, hidden, norm_eps, attn_dropout, resid_dropout, ffn_dropout)
            for _ in range(depth))
        self.norm = RMSNorm(dim, norm_eps)
        rows, cols = grid_positions(grid_size)
        cos, sin = rope_tables(rope_2d_angles(rows, cols, self.head_dim, rope_base), zero_prefix=cond_len)
        self.register_buffer("rope_cos", cos, persistent=False)  # [C + L, head_dim / 2]
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def max_len(self) -> int:
        """Sequence length ``C + L`` covered by the RoPE table and the caches."""
        return self.cond_len + self.num_tokens

    def attention_mask(self, cond_mask: torch.Tensor | None, length: int | None = None) -> torch.Tensor:
        """Boolean mask ``[B or 1, S, S]`` (True = may attend) over the first ``S = length`` positions.

        Causal; keys at condition positions whose ``cond_mask`` is 0 are hidden from every query except
        the position itself (LlamaGen's caption padding rule: the diagonal is forced to 1).
        """
        S = self.max_len if length is None else length
        device = self.rope_cos.device if cond_mask is None else cond_mask.device
        idx = torch.arange(S, device=device)
        mask = (idx[None, :] <= idx[:, None])[None]  # [1, S, S]
        if cond_mask is not None:
            C = min(cond_mask.shape[1], S)
            valid = torch.ones(cond_mask.shape[0], S, dtype=torch.bool, device=device)
            valid[:, :C] = cond_mask[:, :C].bool()
            mask = (mask & valid[:, None, :]) | torch.eye(S, dtype=torch.bool, device=device)[None]
        return mask

    def forward(self, cond_tokens: torch.Tensor, x: torch.Tensor | None = None,
                cond_mask: torch.Tensor | None = None, return_hidden: bool = False):
        """Full causal pass (teacher forcing / training).

        Args:
            cond_tokens: ``[B, C, D]`` embedded condition.
            x: ``[B, N, D]`` input embeddings of image tokens ``0..N-1`` (``N <= L - 1`` for next-token
                prediction; may be ``None``).
            cond_mask: ``[B, C]`` 1 = valid condition token, 0 = padding (text models), or ``None``.
            return_hidden: also return the residual stream entering block 0 and after every block.
        Returns:
            ``h [B, C + N, D]`` after the final norm, and with ``return_hidden`` a list
            ``[embed, block_0, ..., block_{depth-1}, final_norm]`` of ``[B, C + N, D]`` tensors.
        """
        h = cond_tokens if x is None else torch.cat([cond_tokens, x], dim=1)  # [B, S, D]
        S = h.shape[1]
        if S > self.max_len:
            raise ValueError(f"sequence of {S} positions exceeds the model's {self.max_len} "
                             f"({self.cond_len} condition + {self.num_tokens} image tokens)")
        h = self.drop(h)
        rope = (self.rope_cos[:S], self.rope_sin[:S])
        mask = self.attention_mask(cond_mask, S)[:, None]  # [B|1, 1, S, S]
        hidden = [h]
        for blk in self.blocks:
            h = blk(h, rope, mask)
            hidden.append(h)
        h = self.norm(h)
        if return_hidden:
            return h, hidden + [h]
        return h

    # -- cached decoding -------------------------------------------------------------------------
    def new_cache(self, batch: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> CacheState:
        """A static cache for ``batch`` rows and all ``C + L`` positions (lengths start at 0)."""
        p = self.norm.weight
        return CacheState(self.depth, batch, self.max_len, self.num_heads, self.head_dim,
                          dtype=dtype or p.dtype, device=device or p.device)

    def extend(self, x: torch.Tensor, positions: torch.Tensor, cache: CacheState, mask_table: torch.Tensor,
               attend_len: int | None = None) -> torch.Tensor:
        """Run ``x [R, n, D]`` at sequence positions ``positions [R, n]`` over ``cache``.

        Keys/values are written in place at ``positions``; queries attend to cache entries by position
        through ``mask_table [R or 1, S, S]`` (from :meth:`attention_mask`). ``attend_len`` restricts
        attention to the first ``attend_len`` cache entries (it must exceed every position; ``None``
        attends to all, which keeps shapes static for ``torch.compile``). Returns normed hidden states
        ``[R, n, D]``. Does not change ``cache.lengths``.
        """
        R = x.shape[0]
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [R, n, head_dim/2]
        rows = torch.arange(R, device=x.device)[:, None] if mask_table.shape[0] > 1 else \
            torch.zeros(R, 1, dtype=torch.long, device=x.device)
        mask = mask_table[rows, positions]  # [R, n, S]
        if attend_len is not None:
            mask = mask[..., :attend_len]
        mask = mask[:, None]  # [R, 1, n, S]
        h = x
        for blk, layer_cache in zip(self.blocks, cache.layers):
            h = blk(h, (cos, sin), mask, cache=layer_cache, cache_pos=positions, attend_len=attend_len)
        return self.norm(h)

    def prefill(self, cond_tokens: torch.Tensor, cache: CacheState, mask_table: torch.Tensor) -> torch.Tensor:
        """Write the condition tokens ``[R, C, D]`` at positions ``0..C-1``; returns the normed hidden
        state of the last condition position ``[R, D]`` (it predicts image token 0) and sets
        ``cache.lengths`` to ``C``."""
        R, C, _ = cond_tokens.shape
        pos = torch.arange(C, device=cond_tokens.device)[None].expand(R, C)
        h = self.extend(cond_tokens, pos, cache, mask_table, attend_len=C)
        cache.lengths.fill_(C)
        return h[:, -1]


def init_llama_weights(module: nn.Module, std: float = 0.02) -> None:
    """LlamaGen's init: linear weights and embeddings ~ N(0, std), biases zero."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)


__all__ = ["LlamaTrunk", "LlamaBlock", "CaptionEmbedding", "llama_ffn_hidden", "init_llama_weights"]
