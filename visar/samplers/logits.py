"""Logit processing: classifier-free guidance, temperature, top-k, top-p, and the categorical draw.

Randomness comes only from the ``torch.Generator`` passed in. The draw is ``torch.multinomial``,
one call per step for the whole batch, which is what the official LlamaGen and VAR samplers do
(on CPU it equals ``argmax(p / Exp(1))``), so seeded CPU runs match theirs token for token.
"""
from __future__ import annotations

import torch

from visar.nn.guidance import cfg_mix  # noqa: F401  (re-exported: guidance mixing lives below the generators)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / max(temperature, 1e-5)`` (LlamaGen)."""
    return logits / max(temperature, 1e-5)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep logits ``>=`` the k-th largest along the last axis (ties kept); others become ``-inf``.

    ``k <= 0`` or ``k >= V`` disables the filter.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter, LlamaGen/HF convention: sort descending, drop tokens whose cumulative
    probability exceeds ``p`` but keep the first one that crosses it. ``p >= 1`` disables it."""
    if p >= 1.0:
        return logits
    sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove = cum > p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    return logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))


def top_p_filter_ascending(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter, VAR convention: sort ascending, remove entries whose cumulative probability is
    ``<= 1 - p`` except the largest. ``p <= 0`` or ``p >= 1`` disables it."""
    if p <= 0.0 or p >= 1.0:
        return logits
    sorted_logits, idx = torch.sort(logits, descending=False, dim=-1)
    remove = sorted_logits.softmax(-1).cumsum(-1) <= (1 - p)
    remove[..., -1:] = False
    return logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))


def check_finite(logits: torch.Tensor, where: str = "sampling") -> None:
    """Raise if logits contain NaN (a diverged model or bad weights), naming where."""
    if torch.isnan(logits).any():
        raise FloatingPointError(f"NaN logits during {where}: the model weights or inputs are broken "
                                 "(check the checkpoint, the dtype, and inputs for NaN)")


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p (LlamaGen order). Returns filtered logits."""
    logits = apply_temperature(logits, temperature)
    logits = top_k_filter(logits, top_k)
    return top_p_filter(logits, top_p)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of ``probs [..., V]`` with ``torch.multinomial``; returns ``LongTensor [...]``."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
