"""Classifier-free guidance mixing, one rule for every family.

Guidance combines the conditional and unconditional predictions of the same quantity (logits,
predicted noise, velocity, drift) as ``u + s (c - u)`` with scale ``s`` (Ho & Salimans 2022):

* ``s == 1`` is **no guidance**: samplers then run no unconditional rows at all;
* ``s > 1`` strengthens the condition, ``0 <= s < 1`` weakens it (``s = 0`` is unconditional).

Schedules change ``s`` along the sample: a linear ramp ``1 + (s - 1) f`` over the fraction ``f`` of
the image done (VAR per scale, FlowAR per scale, xAR per entity, MAR per masked fraction).
"""
from __future__ import annotations

import torch

from visar.ops.cfg import cfg_mix as _cfg_mix


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``uncond + (cond - uncond) * scale`` (LlamaGen's form; VAR's ``(1+t) c - t u`` is ``scale = 1 + t``).

    ``scale`` is a number or a tensor broadcasting over ``cond``; :func:`visar.ops.cfg_mix` runs it (one kernel on
    CUDA, these torch operations elsewhere)."""
    return _cfg_mix(cond, uncond, scale)


def is_guided(cfg_scale: float) -> bool:
    """Whether a scale asks for guidance (and so for unconditional rows): ``cfg_scale != 1``."""
    return float(cfg_scale) != 1.0


def ramp(cfg_scale: float, done: int | float, total: int | float) -> float:
    """Linear schedule ``1 + (cfg_scale - 1) * done / total`` (``done`` of ``total`` units finished).

    Evaluated left to right, ``((cfg_scale - 1) * done) / total``: the operation order of the official
    FlowAR, xAR and MAR-AR samplers, so the scale is bit-identical to theirs.
    """
    return 1.0 + (cfg_scale - 1.0) * done / total


def scheduled(cfg_scale: float, schedule: str, done: int | float, total: int | float) -> float:
    """The guidance scale under a ``cfg_schedule`` option: ``cfg_scale`` for ``"constant"``, else (``"linear"``)
    :func:`ramp` ``(cfg_scale, done, total)``. Each sampler says what ``done`` of ``total`` counts (tokens
    placed, scales finished); the option's value is validated by the samplers' shared checks."""
    return cfg_scale if schedule == "constant" else ramp(cfg_scale, done, total)


__all__ = ["cfg_mix", "is_guided", "ramp", "scheduled"]
