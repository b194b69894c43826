"""The CTF auxiliary model: all fine labels in one bidirectional pass over the coarse sequence.

CTF (Guo et al., 2025, arXiv:2503.16194) splits a token into a coarse label (its codeword's k-means
cluster) and a fine label (the codeword id). Stage 2 of sampling is an auxiliary transformer that sees
the **whole** coarse sequence and the class and predicts every fine label at once,
``p(fine_i | coarse_1..N, class)``, independently per position. It is a LlamaGen-style stack
(RMSNorm, SwiGLU, 2D RoPE, class token in front) without the causal mask.

Fine labels are never inputs: the logits depend only on ``(coarse, class)``.
"""
from __future__ import annotations

import torch
from torch import nn

from visar.nn import Attention, LabelEmbedding, RMSNorm, SwiGLU, grid_positions, rope_2d_angles
from visar.nn.mlp import find_multiple


class AuxBlock(nn.Module):
    """Pre-norm transformer block ``x + attn(norm(x)); x + ffn(norm(x))`` with full (bidirectional) attention."""

    def __init__(self, dim: int, num_heads: int, hidden: int, norm_eps: float, dropout: float = 0.0):
        super().__init__()
        self.attention_norm = RMSNorm(dim, eps=norm_eps)
        self.attention = Attention(dim, num_heads, proj_dropout=dropout)
        self.ffn_norm = RMSNorm(dim, eps=norm_eps)
        self.feed_forward = SwiGLU(dim, hidden, dropout=dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope=rope)  # no mask: every position sees every other
        return x + self.feed_forward(self.ffn_norm(x))


class AuxiliaryModel(nn.Module):
    """Bidirectional transformer ``(coarse [B, N], labels [B]) -> fine logits [B, N, vocab_size]``.

    Args:
        num_clusters: coarse vocabulary ``M`` (input ids in ``[0, M)``).
        vocab_size: fine vocabulary ``V`` (the tokenizer's codebook size; output logits).
        num_classes: class count; id ``num_classes`` is the null class (CFG).
        grid_size: the token grid is ``grid_size x grid_size`` (``N = grid_size**2``), raster order.
        dim, depth, num_heads: width, number of blocks and heads (head dim divisible by 4 for 2D RoPE).
        ffn_hidden: SwiGLU hidden width; ``None`` gives LlamaGen's ``find_multiple(8 dim / 3, 256)``.
        class_dropout_prob: probability of replacing the class by the null class in training (CFG).
        norm_eps, rope_base, dropout: RMSNorm epsilon, RoPE base, residual dropout.
    """

    def __init__(self, num_clusters: int, vocab_size: int, num_classes: int, grid_size: int, dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, ffn_hidden: int | None = None,
                 class_dropout_prob: float = 0.1, norm_eps: float = 1e-5, rope_base: float = 10000.0,
                 dropout: float = 0.0):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 4:
            raise ValueError(f"dim {dim} / {num_heads} heads must give a head dim divisible by 4 (2D RoPE)")
        self.num_clusters, self.vocab_size, self.grid_size = num_clusters, vocab_size, grid_size
        self.class_dropout_prob = class_dropout_prob
        hidden = ffn_hidden or find_multiple(int(2 * 4 * dim / 3), 256)
        self.cls_embedding = LabelEmbedding(num_classes, dim)
        self.tok_embeddings = nn.Embedding(num_clusters, dim)
        self.layers = nn.ModuleList([AuxBlock(dim, num_heads, hidden, norm_eps, dropout) for _ in range(depth)])
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        rows, cols = grid_positions(grid_size)
        angles = rope_2d_angles(rows, cols, dim // num_heads, rope_base)  # [N, D/2]
        # the class token (position 0) is not rotated: cos = 1, sin = 0
        cos = torch.cat([torch.ones(1, angles.shape[1]), angles.cos()])
        sin = torch.cat([torch.zeros(1, angles.shape[1]), angles.sin()])
        self.register_buffer("rope_cos", cos, persistent=False)  # [1 + N, D/2]
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) linear and embedding weights, zero output head (LlamaGen's initialisation)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.output.weight)

    @property
    def seq_len(self) -> int:
        return self.grid_size * self.grid_size

    def forward(self, coarse: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None,
                drop_prob: float = 0.0) -> torch.Tensor:
        """Fine-label logits.

        Args:
            coarse: ``LongTensor [B, N]`` coarse labels in ``[0, num_clusters)``, raster order.
            labels: ``LongTensor [B]`` class ids in ``[0, num_classes]`` (``num_classes`` = null class).
            positions: optional ``LongTensor [P]`` of positions whose logits are wanted (all when ``None``).
            drop_prob: class-dropout probability (training only; replaces labels by the null class).
        Returns:
            ``[B, N, vocab_size]`` (or ``[B, P, vocab_size]``) unnormalised logits, float32.
        """
        B, N = coarse.shape
        if N != self.seq_len:
            raise ValueError(f"the auxiliary model expects {self.seq_len} coarse labels per image "
                             f"({self.grid_size}x{self.grid_size} grid), got {N}")
        cls = self.cls_embedding(labels, drop_prob)[:, None]  # [B, 1, C]
        x = torch.cat([cls, self.tok_embeddings(coarse)], dim=1)  # [B, 1 + N, C]
        rope = (self.rope_cos, self.rope_sin)
        for layer in self.layers:
            x = layer(x, rope)
        h = self.norm(x[:, 1:])  # [B, N, C]
        if positions is not None:
            h = h[:, positions]
        return self.output(h).float()
