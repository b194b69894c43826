"""FlowAR's flow-matching head: a small AdaLN transformer over the tokens of one scale.

Given the noisy tokens ``x_t [B, N, C]`` of one ``s x s`` scale (``N = s^2``), the flow time ``t`` and
the AR transformer's output ``z [B, N, D]`` at the same positions, it predicts the velocity
``v = eps - x`` of the linear path ``x_t = (1 - t) x + t eps`` (t = 1 is noise, t = 0 is data).

Two block types (official ``SimpleTransformerAdaLN``):

* ``cross=False`` (FlowAR-S, "Block_v1"): :class:`~visar.nn.adaln_block.AdaLNBlock` with
  *spatial* adaLN from ``SiLU(t_emb + c)`` per token and a qkv projection without bias.
* ``cross=True`` (FlowAR-L/H, "Block_v2", :class:`CrossHeadBlock`): the attention branch is
  modulated by ``t`` only, an ungated cross-attention to ``z`` follows, and the MLP is modulated per
  token by ``SiLU(c + t)``.

Time is quantised like the official code, ``(t * 1000).long()`` on the float32 value, then embedded
with the 256-dim ``[cos | sin]`` sinusoid and an MLP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visar.nn.adaln_block import AdaLNBlock, swiglu_hidden
from visar.nn.attention import Attention
from visar.nn.embeddings import TimestepEmbedding, quantize_timestep, timestep_sinusoid
from visar.nn.mlp import SwiGLU
from visar.nn.norms import RMSNorm
from visar.nn.rope import apply_rope, grid_positions, rope_2d_angles, rope_tables


class CrossAttention(nn.Module):
    """Cross-attention ``q = W_q x``, ``(k, v) = W_kv z`` (no biases), rotary on q and k, output proj with bias.

    Args:
        dim: query width ``W``. kv_dim: width of the attended sequence. num_heads: heads.
    """

    def __init__(self, dim: int, kv_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, z: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``x [B, N, W]`` attends to ``z [B, M, kv_dim]``; ``rope`` tables must cover ``N == M`` positions."""
        B, N, W = x.shape
        q = self.q(x).view(B, N, self.num_heads, self.head_dim)
        k, v = self.kv(z).view(B, z.shape[1], 2, self.num_heads, self.head_dim).unbind(2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(B, N, W))


class CrossHeadBlock(nn.Module):
    """FlowAR-L/H head block ("Block_v2").

    ``x += gamma_a * attn(mod(norm1 x; t))``; ``x += crossattn(norm2_1 x, norm2_2 z)``;
    ``x += gamma_m * mlp(mod(norm3 x; c + t))``; each adaLN split is (gamma, scale, shift).
    """

    def __init__(self, dim: int, cond_dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps=norm_eps, affine=False)
        self.attn = Attention(dim, num_heads, qkv_bias=False, proj_bias=True)
        self.norm2_1 = RMSNorm(dim, eps=norm_eps, affine=True)
        self.norm2_2 = RMSNorm(cond_dim, eps=norm_eps, affine=True)
        self.crossattn = CrossAttention(dim, cond_dim, num_heads)
        self.norm3 = RMSNorm(dim, eps=norm_eps, affine=False)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio), bias=True, act="gelu")
        self.ada_lin_attn = nn.Linear(dim, 3 * dim)
        self.ada_lin_mlp = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, tc: torch.Tensor, z: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``x [B, N, W]``, ``t [B, W]`` time embedding, ``tc [B, N, W]`` = t + c, ``z [B, N, D]``."""
        gamma_a, scale_a, shift_a = self.ada_lin_attn(F.silu(t))[:, None].chunk(3, dim=-1)
        x = x + gamma_a * self.attn(self.norm1.modulated(x, shift_a, scale_a), rope=rope)
        x = x + self.crossattn(self.norm2_1(x), self.norm2_2(z), rope)
        gamma_m, scale_m, shift_m = self.ada_lin_mlp(F.silu(tc)).chunk(3, dim=-1)
        return x + gamma_m * self.mlp(self.norm3.modulated(x, shift_m, scale_m))


class FinalLayer(nn.Module):
    """Weight-free RMSNorm, per-token ``(shift, scale)`` from ``SiLU(c + t)``, then ``Linear(W, out)``."""

    def __init__(self, dim: int, out_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.norm_final = RMSNorm(dim, eps=norm_eps, affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(tc).chunk(2, dim=-1)
        return self.linear(self.norm_final.modulated(x, shift, scale))


class FlowHeadTransformer(nn.Module):
    """Velocity predictor over the tokens of one square scale (official ``SimpleTransformerAdaLN``).

    Args:
        in_channels: token channels ``C`` (16 for the KL-16 latent).
        cond_dim: width ``D`` of the AR output ``z``.
        width: head width ``W``; depth: number of blocks; num_heads: heads (official: ``W // 64``).
        cross: ``False`` = spatial-adaLN blocks (FlowAR-S), ``True`` = cross-attention blocks (L/H).
        rope_grid: every scale's positions are stretched onto this grid (``arange(s) / s * grid``).
    """

    def __init__(self, in_channels: int, cond_dim: int, width: int, depth: int, num_heads: int,
                 cross: bool = False, mlp_ratio: float = 4.0, rope_grid: int = 16):
        super().__init__()
        self.in_channels, self.width, self.num_heads, self.cross = in_channels, width, num_heads, cross
        self.rope_grid = rope_grid
        self.time_embed = TimestepEmbedding(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(in_channels, width)
        if cross:
            self.res_blocks = nn.ModuleList(CrossHeadBlock(width, cond_dim, num_heads, mlp_ratio) for _ in range(depth))
        else:
            self.res_blocks = nn.ModuleList(
                AdaLNBlock(width, num_heads, mlp_ratio, qkv_bias=False, cond_dim=width) for _ in range(depth))
        self.final_layer = FinalLayer(width, in_channels)
        self._rope_cache: dict = {}

    def rope(self, side: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``[side^2, head_dim/2]`` of a ``side x side`` scale stretched onto the rope grid."""
        key = (side, str(device))
        if key not in self._rope_cache:
            rows, cols = grid_positions(side, stretch_to=self.rope_grid)
            cos, sin = rope_tables(rope_2d_angles(rows, cols, self.width // self.num_heads))
            self._rope_cache[key] = (cos.to(device), sin.to(device))
        return self._rope_cache[key]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Velocity.

        Args:
            x_t: ``[B, s*s, C]`` noisy tokens of one scale (row-major).
            t: ``[B]`` flow time in ``[0, 1]`` (quantised to ``(t * 1000).long()`` in float32).
            z: ``[B, s*s, D]`` AR transformer output at those positions.
        Returns:
            ``[B, s*s, C]`` velocity ``eps - x``.
        """
        B, N, _ = x_t.shape
        side = int(round(N ** 0.5))
        if side * side != N:
            raise ValueError(f"the flow head works on square scales; got {N} tokens")
        rope = self.rope(side, x_t.device)
        freqs = timestep_sinusoid(quantize_timestep(t).to(x_t.device), self.time_embed.freq_dim)
        t_emb = self.time_embed.mlp(freqs.to(x_t.dtype))  # [B, W]
        tc = t_emb[:, None] + self.cond_embed(z)  # [B, N, W]
        x = self.input_proj(x_t)
        for blk in self.res_blocks:
            x = blk(x, t_emb, tc, z, rope) if self.cross else blk(x, tc, rope=rope)
        return self.final_layer(x, tc)
