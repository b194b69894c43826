"""Condition embeddings: class labels (with a CFG null class) and diffusion/flow timesteps."""
from __future__ import annotations

import math

import torch
from torch import nn


class LabelEmbedding(nn.Module):
    """Class embedding table with ``num_classes + 1`` rows; row ``num_classes`` is the CFG null class.

    ``forward(labels, drop_prob)`` replaces each label by the null class with probability
    ``drop_prob`` (classifier-free-guidance training), drawing from ``generator``.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor, drop_prob: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        if drop_prob > 0:
            drop = torch.rand(labels.shape, generator=generator, device=labels.device) < drop_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """``[N] -> [N, dim]`` features ``[cos | sin]`` with frequencies ``exp(-ln(max_period) k / (dim/2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedding(nn.Module):
    """Sinusoid of an (integer) timestep followed by ``Linear - SiLU - Linear`` (``mlp.0`` / ``mlp.2``)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``[N]`` timesteps -> ``[N, dim]`` in the MLP's dtype (the sinusoid is computed in float32)."""
        return self.mlp(timestep_sinusoid(t, self.freq_dim).to(self.mlp[0].weight.dtype))


def quantize_timestep(t: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Integer timesteps ``trunc(float32(float32(t) * 1000))`` (FlowAR/xAR's ``(t * 1000).long()``).

    Args:
        t: flow time in ``[0, 1]``, any float dtype and shape.
    Returns:
        ``LongTensor`` of the same shape. The product is taken in **float32** on purpose: in float64
        some grid points land on the other side of an integer (0.68 -> 680 instead of 679).
    """
    return (t.float() * num_train_timesteps).long()
