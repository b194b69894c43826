"""Random draws of a training loss given explicitly (replaying another implementation's step).

Every generator's ``loss`` draws its randomness (dropped labels, orders, masks, timesteps, noise) from
its ``generator`` argument; each draw can instead be passed as a keyword argument, which is how the
official training steps recorded in ``../shared/fixtures/<family>/train_loss.safetensors`` are replayed
(``tests/test_train_loss_parity.py``). :func:`given_or_drawn` validates such an argument early (name,
shape, kind, range) or makes the draw when it is absent, so a loss without explicit draws consumes its
generator exactly as before.
"""
from __future__ import annotations

from typing import Callable

import torch

#: what a draw holds: ``mask`` (bool, or 0/1 of any dtype), ``index`` (integers), ``real`` (floats)
KINDS = ("mask", "index", "real")


def check_draw(name: str, value, shape: tuple[int, ...], kind: str, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None, low: float | None = None, high: float | None = None) -> torch.Tensor:
    """``value`` as a tensor of ``shape`` on ``device``, or a ``ValueError``/``TypeError`` naming ``name``.

    Args:
        name: the loss's keyword argument (used in the error message).
        value: the explicit draw.
        shape: the exact shape it must have.
        kind: ``"mask"`` -> ``BoolTensor`` (bool, or 0/1 values); ``"index"`` -> ``LongTensor`` of integers in
            ``[low, high)``; ``"real"`` -> a float tensor (cast to ``dtype`` if given) in ``[low, high]``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {list(shape)}, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(value.shape)}")
    value = value.detach().to(device) if device is not None else value.detach()
    if kind == "mask":
        if value.dtype != torch.bool:
            if value.numel() and not bool(((value == 0) | (value == 1)).all()):
                raise ValueError(f"{name} is a mask: give a bool tensor or 0/1 values")
            value = value != 0
        return value
    if kind == "index":
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers (a LongTensor), got {value.dtype}")
        value = value.long()
    else:
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {value.dtype}")
        if dtype is not None:
            value = value.to(dtype)
        if value.numel() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} holds NaN or infinite values")
    if value.numel():
        lo, hi = (float(v) for v in torch.aminmax(value))
        too_high = high is not None and (hi >= high if kind == "index" else hi > high)
        if (low is not None and lo < low) or too_high:
            span = f"[{low}, {high})" if kind == "index" else f"[{low}, {high}]"
            raise ValueError(f"{name} must lie in {span}, got values in [{lo:g}, {hi:g}]")
    return value


def given_or_drawn(name: str, value, draw: Callable[[], torch.Tensor], shape: tuple[int, ...], kind: str,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                   low: float | None = None, high: float | None = None) -> torch.Tensor:
    """The explicit draw ``value`` checked by :func:`check_draw`, or ``draw()`` when ``value`` is ``None``
    (so the generator is consumed only for the draws not given)."""
    if value is None:
        return draw()
    return check_draw(name, value, shape, kind, device, dtype, low, high)


def drop_labels(labels: torch.Tensor, drop, prob: float, training: bool, null_class: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Class-dropout for guidance training: ``labels [B]`` with the dropped rows set to ``null_class``.

    ``drop`` (``[B]`` mask) replays a recorded draw; otherwise rows are dropped with probability ``prob``
    (one ``torch.rand`` draw of ``[B]`` from ``generator``) in training mode only.
    """
    B, dev = labels.shape[0], labels.device
    if drop is not None:
        drop = check_draw("drop", drop, (B,), "mask", dev)
    elif training and prob > 0:
        drop = torch.rand(labels.shape, generator=generator, device=dev) < prob
    if drop is None:
        return labels
    return torch.where(drop, torch.full_like(labels, null_class), labels)
