"""Logit processing: classifier-free guidance, temperature, top-k, top-p, and the categorical draw.

Randomness comes only from the ``torch.Generator`` passed in. The draw is ``torch.multinomial``,
one call per step for the whole batch, which is what the official LlamaGen and VAR samplers do
(on CPU it equals ``argmax(p / Exp(1))``), so seeded CPU runs match theirs token for token.

Temperature, top-k, top-p and the whole fused path live in :mod:`visar.ops.sampling` (re-exported here):
:func:`draw_from_logits` runs guidance, temperature, top-k, top-p and the draw as one op
(:func:`visar.ops.sample_logits`, a Triton kernel on CUDA) and equals, token for token and generator state for
generator state, ``sample_categorical(softmax(process_logits(cfg_mix(c, u, s), ...)))`` on the CPU.
"""
from __future__ import annotations

import torch

from visar.nn.guidance import cfg_mix  # noqa: F401  (re-exported: guidance mixing lives below the generators)
from visar.ops.sampling import (apply_temperature, exponential_noise, process_logits, sample_logits,  # noqa: F401
                                top_k_filter, top_p_filter)


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


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of ``probs [..., V]`` with ``torch.multinomial``; returns ``LongTensor [...]``."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def draw_from_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     generator: torch.Generator | None = None, uncond: torch.Tensor | None = None,
                     cfg_scale: float = 1.0) -> torch.Tensor:
    """One token per row of ``logits [B, V]``: guidance with ``uncond [B, V]`` (if given), temperature, top-k,
    top-p, softmax and the multinomial draw, as one op (:func:`visar.ops.sample_logits`).

    The draw's ``Exp(1)`` noise ``[B, V]`` comes from ``generator`` exactly as ``torch.multinomial`` draws it, so
    on the CPU the tokens and the generator's state equal those of ``sample_categorical(torch.softmax(
    process_logits(cfg_mix(logits, uncond, cfg_scale), temperature, top_k, top_p), -1), generator)``. Returns
    ``LongTensor [B]``.
    """
    dtype = logits.dtype if uncond is None else torch.promote_types(logits.dtype, uncond.dtype)
    noise = torch.empty(logits.shape, dtype=dtype, device=logits.device).exponential_(generator=generator)
    return sample_logits(logits, noise, temperature, top_k, top_p, uncond, cfg_scale)
