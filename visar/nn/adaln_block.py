"""The AdaLN transformer block shared by FlowAR's AR stacks, FlowAR's small flow head and xAR.

Layout (FlowAR / xAR, Ren et al.):

* weight-free RMSNorm (computed in float32) before attention and before the MLP;
* adaLN from a condition ``c``: ``Linear(cond_dim, 6 D)(SiLU(c))`` split in the order
  **(gamma1, gamma2, scale1, scale2, shift1, shift2)** -- not DiT's (shift, scale, gate) order;
* ``x += gamma1 * attn(norm1(x) * (1 + scale1) + shift1)`` with 2D rotary embedding;
* ``x += gamma2 * mlp(norm2(x) * (1 + scale2) + shift2)`` with a GELU-gated SwiGLU of hidden
  ``int(D * mlp_ratio * 2 / 3)``.

The condition is one vector per image ``[B, C]`` (class embedding: FlowAR's AR stacks), one vector per
token ``[B, N, C]`` (FlowAR's "spatial adaLN" head) or one vector per block of tokens ``[B, E, C]`` with
an index ``[N]`` naming each token's block (xAR's per-entity class + time condition): the modulation
linear then runs on the ``B E`` block rows and its output is expanded to the tokens, which gives the
same values as expanding the condition first at a fraction of the cost.
"""
from __future__ import annotations

import torch
from torch import nn

from visar.nn.attention import Attention
from visar.nn.kv_cache import KVCache
from visar.nn.mlp import SwiGLU
from visar.nn.norms import RMSNorm


#: per-block modulation runs on at least this many rows (zero-padded), and below this many expanded
#: rows the condition is expanded first: CPU GEMMs take another kernel (another summation order) for
#: very few rows (measured: 1-3 rows), and both rules keep the result equal, bit for bit, to the
#: per-token modulation of the expanded condition
MIN_MODULATION_ROWS = 16


def swiglu_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
    """Hidden width of the FlowAR/xAR gated MLP: ``int(dim * mlp_ratio * 2 / 3)`` (2048 for 768)."""
    return int(dim * mlp_ratio * 2 / 3)


class AdaLNBlock(nn.Module):
    """One AdaLN transformer block ``[B, N, D] -> [B, N, D]``.

    Args:
        dim: width ``D``.
        num_heads: attention heads (``D`` divisible by it; head dim divisible by 4 for 2D RoPE).
        mlp_ratio: MLP hidden is ``int(D * mlp_ratio * 2/3)``.
        qkv_bias: bias of the qkv projection (True in the AR stacks, False in FlowAR's flow head).
        cond_dim: width of the condition (``D`` when ``None``).
        norm_eps: epsilon of the weight-free RMSNorms.
        attn_dropout, proj_dropout: dropout probabilities (training only).

    Submodules: ``attn`` (:class:`~visar.nn.attention.Attention`), ``mlp``
    (:class:`~visar.nn.mlp.SwiGLU`, ``w1`` gate / ``w3`` up / ``w2`` down), ``ada_lin``
    (``Sequential(SiLU, Linear(cond_dim, 6 D))``).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 cond_dim: int | None = None, norm_eps: float = 1e-6,
                 attn_dropout: float = 0.0, proj_dropout: float = 0.0):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps=norm_eps, affine=False)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=True,
                              attn_dropout=attn_dropout, proj_dropout=proj_dropout)
        self.norm2 = RMSNorm(dim, eps=norm_eps, affine=False)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio), bias=True, act="gelu", dropout=proj_dropout)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 6 * dim))

    def modulation(self, c: torch.Tensor, cond_index: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """``(gamma1, gamma2, scale1, scale2, shift1, shift2)``, each ``[B, 1, D]`` or ``[B, N, D]``.

        ``cond_index [N]``: ``c`` is ``[B, E, C]`` per block; row ``cond_index[n]`` modulates token ``n``.
        """
        if cond_index is not None and c.shape[0] * cond_index.shape[0] >= MIN_MODULATION_ROWS:
            B, E, C = c.shape
            rows = c.reshape(B * E, C)
            if B * E < MIN_MODULATION_ROWS:  # pad: the same GEMM kernel as the expanded rows would take
                rows = torch.cat([rows, rows.new_zeros(MIN_MODULATION_ROWS - B * E, C)])
            return self.ada_lin(rows)[:B * E].view(B, E, -1)[:, cond_index].chunk(6, dim=-1)
        if cond_index is not None:  # a handful of tokens: expand first, as small a GEMM as the original
            c = c[:, cond_index]
        mod = self.ada_lin(c)
        if mod.dim() == 2:
            mod = mod[:, None]
        return mod.chunk(6, dim=-1)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, cache: KVCache | None = None,
                cache_pos: int | torch.Tensor | None = None, attend_len: int | None = None,
                cond_index: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the block.

        Args:
            x: ``[B, N, D]``.
            c: condition ``[B, C]`` (per image), ``[B, N, C]`` (per token) or ``[B, E, C]`` (per block,
                with ``cond_index [N]`` in ``[0, E)``).
            rope: ``(cos, sin)`` ``[N, head_dim/2]`` for the ``N`` query positions.
            mask: additive ``[.., N, S]`` (0 / -inf) or boolean attention mask, or ``None``.
            cache, cache_pos, attend_len: static KV cache use, see :meth:`Attention.forward`.
            cond_index: ``[N]`` block of each token when ``c`` is per block.
        """
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(c, cond_index)
        h = self.norm1.modulated(x, shift1, scale1)  # modulate(norm1(x), shift1, scale1), fused on CUDA
        x = x + gamma1 * self.attn(h, rope=rope, mask=mask, cache=cache, cache_pos=cache_pos, attend_len=attend_len)
        x = x + gamma2 * self.mlp(self.norm2.modulated(x, shift2, scale2))
        return x
