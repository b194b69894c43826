"""Small-row linear layers on the CPU: ``x @ W^T`` computed as ``mm(W, x^T)^T`` where that is faster (opt-in).

With 2-7 rows (a batch-1 decode step with guidance has 2) the CPU GEMM that ``F.linear`` runs is far from the
memory-bandwidth bound, while the same product with the weight as the first operand streams the weight at
close to it. The two orders round differently (about 2e-6 relative), so the rule is **off by default** (the
parity fixtures are bit-exact) and turned on per block of code::

    with visar.ops.fast_small_linear():
        images = pipe(labels, seed=0)

Inside the block every ``F.linear`` call (``nn.Linear`` and anything else that calls it) is intercepted with a
``torch.overrides.TorchFunctionMode``; a call takes the ``mm(W, x^T)`` route when :func:`small_row_rule` says so
and ``x`` and ``W`` are float32 CPU tensors that need no gradient. Everything else runs ``F.linear`` unchanged.
The rule is fixed (measured on a 2-core AVX2 machine with one thread, see ``docs/kernels.md``), so a run's
results do not depend on timing.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_STATE = {"on": False}


def small_row_rule(rows: int, out_features: int, in_features: int) -> bool:
    """Whether ``mm(W, x^T)`` is used for ``rows`` rows and a weight ``[out_features, in_features]``.

    2-3 rows: always; 4-5 rows: when ``out_features >= in_features``; 6-7 rows: when
    ``out_features >= 3 in_features``; 1 row or 8 and more: never (``F.linear`` is as fast or faster there).
    """
    if rows in (2, 3):
        return True
    if rows in (4, 5):
        return out_features >= in_features
    if rows in (6, 7):
        return out_features >= 3 * in_features
    return False


def _applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.dim() != 2:
        return False
    if x.dim() < 1 or x.shape[-1] != weight.shape[1] or (bias is not None and bias.dtype != torch.float32):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    return small_row_rule(rows, weight.shape[0], weight.shape[1])


def small_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``(bias[:, None] + W x^T)^T`` (contiguous ``[..., out]``)."""
    x2 = x.reshape(-1, x.shape[-1])
    if bias is None:
        y = torch.mm(weight, x2.t())
    else:
        y = torch.addmm(bias.unsqueeze(1), weight, x2.t())
    return y.t().contiguous().view(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; inside :func:`fast_small_linear`, :func:`small_row_linear` where :func:`small_row_rule` says so."""
    if _STATE["on"] and _applies(x, weight, bias):
        return small_row_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class _SmallRowLinearMode(TorchFunctionMode):
    """Routes ``F.linear`` calls through :func:`linear` (other calls pass through)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and _STATE["on"]:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if _applies(x, weight, bias):
                return small_row_linear(x, weight, bias)
        return func(*args, **kwargs)


def fast_small_linear_enabled() -> bool:
    """Whether the small-row route is on (inside an enabled :func:`fast_small_linear` block)."""
    return _STATE["on"]


@contextlib.contextmanager
def fast_small_linear(enabled: bool = True) -> Iterator[None]:
    """Run a block with the small-row route on (``enabled=True``) or off; the previous state comes back after."""
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be True or False, got {enabled!r}")
    previous = _STATE["on"]
    _STATE["on"] = enabled
    try:
        if enabled:
            with _SmallRowLinearMode():
                yield
        else:
            yield
    finally:
        _STATE["on"] = previous


__all__ = ["fast_small_linear", "fast_small_linear_enabled", "linear", "small_row_linear", "small_row_rule"]
