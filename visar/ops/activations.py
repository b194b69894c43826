"""The elementwise part of the MLPs: the gated activation ``act(a) * b`` (SwiGLU) and GELU.

* ``gated_activation(a, b, "silu")``: LlamaGen's SwiGLU ``silu(w1 x) * w3 x``;
  ``"gelu"``: FlowAR/xAR's GELU(erf)-gated variant; ``"gelu_tanh"``: the tanh approximation.
* ``gelu(x, approximate)``: ``"none"`` (exact erf; timm/MAR) or ``"tanh"`` (VAR).

The matmuls stay in torch; the kernel replaces the activation and the product (one read of ``a`` and ``b``, one
write) instead of an intermediate tensor per operation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from visar.ops.dispatch import kernels, use_kernel

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
APPROXIMATE = ("none", "tanh")


def activation_reference(x: torch.Tensor, act: str) -> torch.Tensor:
    """``act(x)`` with torch: ``F.silu``, ``F.gelu`` (erf) or ``F.gelu(approximate="tanh")``."""
    if act == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if act == "gelu_tanh" else "none")


def gated_activation_reference(a: torch.Tensor, b: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """The PyTorch reference of :func:`gated_activation`: ``act(a) * b``."""
    return activation_reference(a, act) * b


def _check(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


def gated_activation(a: torch.Tensor, b: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """``act(a) * b`` elementwise.

    Args:
        a: gate pre-activation ``[..., H]`` (float32 or bfloat16).
        b: the up projection, broadcastable to ``a`` (the kernel runs when both have one shape and dtype).
        act: ``"silu"``, ``"gelu"`` (erf) or ``"gelu_tanh"``.

    Returns:
        ``[..., H]``.
    """
    _check(act)
    if (not use_kernel(a, b) or a.shape != b.shape or a.dtype != b.dtype or a.numel() == 0
            or not a.dtype.is_floating_point):
        return gated_activation_reference(a, b, act)
    out = kernels("activations").launch(a.contiguous(), b.contiguous(), act)
    return out.view(a.shape)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu(x, approximate=approximate)``: ``"none"`` (erf) or ``"tanh"``."""
    if approximate not in APPROXIMATE:
        raise ValueError(f"approximate must be one of {APPROXIMATE}, got {approximate!r}")
    if not use_kernel(x) or x.numel() == 0 or not x.dtype.is_floating_point:
        return F.gelu(x, approximate=approximate)
    act = "gelu_tanh" if approximate == "tanh" else "gelu"
    return kernels("activations").launch(x.contiguous(), None, act).view(x.shape)


__all__ = ["gated_activation", "gated_activation_reference", "gelu", "activation_reference", "ACTIVATIONS",
           "APPROXIMATE"]
