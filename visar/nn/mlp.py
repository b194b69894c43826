"""Feed-forward blocks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visar.ops.activations import gated_activation, gelu


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of ``k`` that is ``>= n``."""
    return n if n % k == 0 else n + k - n % k


class SwiGLU(nn.Module):
    """Gated MLP ``w2(act(w1 x) * w3 x)``.

    ``w1`` is the gate, ``w3`` the up projection, ``w2`` the down projection (LlamaGen naming).
    ``act="silu"`` is LlamaGen's SwiGLU; ``act="gelu"`` is the GELU(erf)-gated variant of FlowAR/xAR. The
    elementwise ``act(a) * b`` is :func:`visar.ops.gated_activation` (one kernel on CUDA).
    """

    def __init__(self, dim: int, hidden: int, bias: bool = False, act: str = "silu", dropout: float = 0.0):
        super().__init__()
        if act not in ("silu", "gelu"):
            raise ValueError(f"act must be 'silu' or 'gelu', got {act!r}")
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w3 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, dim, bias=bias)
        self.act_name = act
        self.act = F.silu if act == "silu" else F.gelu
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w2(gated_activation(self.w1(x), self.w3(x), self.act_name)))


class GeluMlp(nn.Module):
    """``fc2(gelu(fc1 x))``; ``approximate="tanh"`` for VAR, ``"none"`` (exact erf) for timm/MAR (the GELU is
    :func:`visar.ops.gelu`, one kernel on CUDA)."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, bias: bool = True,
                 approximate: str = "none", dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, out_dim or dim, bias=bias)
        self.approximate = approximate
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(gelu(self.fc1(x), self.approximate))))
