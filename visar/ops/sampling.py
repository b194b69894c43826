"""The logit path of a discrete token draw: guidance, temperature, top-k, top-p, and the categorical draw.

Per row of logits ``[B, V]`` (LlamaGen's order and conventions):

1. guidance ``u + (c - u) * cfg_scale`` when unconditional logits are given (``cfg_scale == 1`` means no
   guidance: the callers then pass no unconditional rows);
2. ``/ max(temperature, 1e-5)``;
3. top-k: keep the logits ``>=`` the k-th largest (ties kept); ``top_k <= 0`` or ``>= V`` disables it;
4. top-p (nucleus, descending convention): sorted from the largest, a token is kept when the probability of
   the tokens before it is ``<= top_p`` (so the first token crossing ``top_p`` stays); ``top_p >= 1`` disables;
5. ``probs = softmax``, then the draw ``argmax(probs / q)`` with explicit noise ``q ~ Exp(1)`` ``[B, V]``.

The draw is ``torch.multinomial``'s own algorithm for one sample (exponential race): with
``q = torch.empty_like(probs).exponential_(generator=g)`` the reference returns exactly the tokens
``torch.multinomial(probs, 1, generator=g)`` returns, and consumes the generator the same way. The kernel finds
the top-k and top-p thresholds by bisection on the order-preserving integer image of the float32 logits (no
sort); it agrees with the reference token for token except when logits tie exactly at the top-p boundary (the
kernel keeps every tied entry) or two candidates' ``probs / q`` agree to the last bit.
"""
from __future__ import annotations

import torch

from visar.ops.dispatch import kernels, use_kernel

#: widest vocabulary the kernel takes (a program holds a row); wider rows run the reference
MAX_KERNEL_VOCAB = 1 << 17


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


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p (LlamaGen order). Returns filtered logits."""
    logits = apply_temperature(logits, temperature)
    logits = top_k_filter(logits, top_k)
    return top_p_filter(logits, top_p)


def exponential_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``Exp(1)`` draws shaped like ``like`` (its dtype and device), as ``torch.multinomial`` draws them."""
    return torch.empty_like(like).exponential_(generator=generator)


def check_sampling_args(logits: torch.Tensor, noise: torch.Tensor, uncond: torch.Tensor | None, temperature: float,
                        top_k: int, top_p: float) -> None:
    """Validate :func:`sample_logits`' arguments (raises ``ValueError`` naming the argument)."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got {tuple(logits.shape)}")
    if noise.shape != logits.shape:
        raise ValueError(f"noise must be Exp(1) draws shaped like logits {tuple(logits.shape)}, "
                         f"got {tuple(noise.shape)}")
    if uncond is not None and uncond.shape != logits.shape:
        raise ValueError(f"uncond must be shaped like logits {tuple(logits.shape)}, got {tuple(uncond.shape)}")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise ValueError(f"top_k must be an int (0 disables it), got {top_k!r}")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ValueError(f"{name} must be a number, got {value!r}")


def sample_logits_reference(logits: torch.Tensor, noise: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                            top_p: float = 1.0, uncond: torch.Tensor | None = None,
                            cfg_scale: float = 1.0) -> torch.Tensor:
    """The PyTorch reference of :func:`sample_logits` (LlamaGen's sequence of torch operations)."""
    if uncond is not None:
        logits = uncond + (logits - uncond) * cfg_scale
    probs = torch.softmax(process_logits(logits, temperature, top_k, top_p), dim=-1)
    return (probs / noise).argmax(-1)


def sample_logits(logits: torch.Tensor, noise: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, uncond: torch.Tensor | None = None, cfg_scale: float = 1.0) -> torch.Tensor:
    """One token per row: guidance, temperature, top-k, top-p, softmax and the draw (module docstring).

    Args:
        logits: ``[B, V]`` (conditional) logits, float32 or bfloat16.
        noise: ``[B, V]`` ``Exp(1)`` draws (:func:`exponential_noise`), float32.
        temperature: divides the logits (floored at 1e-5).
        top_k: keep the ``top_k`` largest (ties kept); 0 disables.
        top_p: nucleus mass in ``(0, 1]``; 1 disables.
        uncond: ``[B, V]`` unconditional logits, or ``None`` (no guidance).
        cfg_scale: guidance scale (used with ``uncond``).

    Returns:
        ``LongTensor [B]`` token ids in ``[0, V)``.
    """
    check_sampling_args(logits, noise, uncond, temperature, top_k, top_p)
    B, V = logits.shape
    if not use_kernel(logits, noise, uncond) or V > MAX_KERNEL_VOCAB or logits.numel() == 0:
        return sample_logits_reference(logits, noise, temperature, top_k, top_p, uncond, cfg_scale)
    k = top_k if 0 < top_k < V else 0
    return kernels("sampling").launch(logits.contiguous(), uncond.contiguous() if uncond is not None else None,
                                      noise.contiguous(), float(cfg_scale), float(max(temperature, 1e-5)), k,
                                      float(top_p))


__all__ = ["sample_logits", "sample_logits_reference", "exponential_noise", "apply_temperature", "top_k_filter",
           "top_p_filter", "process_logits", "check_sampling_args", "MAX_KERNEL_VOCAB"]
