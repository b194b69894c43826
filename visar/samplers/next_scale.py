"""VAR's next-scale sampler: one transformer step per scale over a static KV cache.

Per scale ``k = 0..S-1`` (VAR's ``autoregressive_infer_cfg``):

1. the batch is doubled, rows ``0:B`` conditional and ``B:2B`` the null class, both fed the same tokens;
2. guidance ramps linearly with the scale: ``t = cfg * k / (S-1)``, ``logits = (1+t) l_c - t l_u``
   (``t = 0`` at the first scale);
3. top-k (ties kept), then top-p with VAR's ascending convention (:func:`top_p_filter_ascending`);
4. one ``torch.multinomial`` draw per token for the whole batch from the seeded ``torch.Generator``;
5. ``more_smooth``: the draw above still happens (it consumes the generator) but the codes are
   replaced by a Gumbel-softmax mixture ``softmax((l (1 + k/(S-1)) + G) / tau) @ codebook`` with
   ``tau = max(0.27 (1 - 0.95 k/(S-1)), 0.005)`` (visualisation only; FID uses ``more_smooth=False``);
6. the codes are accumulated into ``f_hat`` by the tokenizer's quantizer, which also gives the next
   scale's input ``area_down(f_hat, pn_{k+1})``.

Random labels (``labels=None``) are drawn first, from the same generator. Zero-shot editing
(in-painting, out-painting, class-conditional editing; VAR paper Sec. 6 and its demo) forces the
tokens of a given image wherever ``mask`` is 1 (:func:`edit`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from visar.conditions import Condition
from visar.samplers.logits import check_finite, top_k_filter, top_p_filter_ascending


def check_options(cfg_scale: float, top_k: int, top_p: float) -> None:
    if not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0 (VAR's ramp: t = cfg * k/(S-1); 0 disables guidance), got {cfg_scale}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k}")
    if not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be in [0, 1] (0 or 1 disables it; VAR's FID setting is 0.96), got {top_p}")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """VAR's top-k then ascending top-p; removed entries become ``-inf``."""
    if top_k > 0:
        logits = top_k_filter(logits, top_k)
    if top_p > 0:
        logits = top_p_filter_ascending(logits, top_p)
    return logits


def draw(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of ``logits [B, n, V]`` (``torch.multinomial`` with replacement, like VAR) -> ``[B, n]``."""
    B, n, V = logits.shape
    probs = logits.softmax(-1).reshape(B * n, V)
    return torch.multinomial(probs, 1, replacement=True, generator=generator).view(B, n)


def resolve_labels(model, cond: Condition | torch.Tensor | Sequence[int] | int | None, batch: int | None,
                   generator: torch.Generator | None) -> torch.Tensor:
    """Class ids ``[B]``; ``None`` draws ``batch`` uniform labels from ``generator`` (first RNG use, as VAR)."""
    device = model.pos_1LC.device
    if cond is None:
        if batch is None or batch < 1:
            raise ValueError("without class ids, pass batch=N to draw N random labels")
        uniform = torch.full((1, model.num_classes), 1.0 / model.num_classes, device=device)
        return torch.multinomial(uniform, batch, replacement=True, generator=generator).reshape(batch)
    if isinstance(cond, int):
        cond = [cond] * (batch or 1)
    return model.labels_of(cond, allow_null=False)


def _uncached_step(model) -> Callable:
    """Naive step: keep the embedded prefix and re-run the whole transformer on it (block-causal mask)."""
    prefix: list[torch.Tensor] = []

    def step(cache, x, mods, cond_emb, pos):
        prefix.append(x)
        h = torch.cat(prefix, 1)  # [rows, pos + n, C]
        end = h.shape[1]
        mask = model.attn_mask[:end, :end]
        for b, m in zip(model.blocks, mods):
            h = b(h, m, mask=mask)
        return model.head_logits(h[:, pos:], cond_emb)

    return step


def _step_fn(model, compile: bool) -> Callable:
    if not compile:
        return model.step
    cached = getattr(model, "_compiled_step", None)
    if cached is None:
        cached = torch.compile(model.step, dynamic=False)
        object.__setattr__(model, "_compiled_step", cached)
    return cached


@torch.no_grad()
def sample(model, cond: Condition | torch.Tensor | Sequence[int] | int | None, generator: torch.Generator | None = None,
           cfg_scale: float = 1.5, top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False,
           batch: int | None = None, return_fhat: bool = False, record: dict | None = None,
           edit_tokens: Sequence[torch.Tensor] | None = None, edit_mask: torch.Tensor | None = None,
           compile: bool = False, use_cache: bool = True) -> Any:
    """Draw per-scale token maps with VAR's sampler.

    Args:
        model: a :class:`~visar.generators.next_scale.NextScaleGenerator` with a bound tokenizer.
        cond: class ids ``[B]`` (Condition, tensor, list or int); ``None`` draws ``batch`` random labels.
        generator: seeded ``torch.Generator`` (the global RNG when ``None``).
        cfg_scale: guidance at the last scale (linear ramp from 0 at the first scale).
        top_k, top_p: filters (0 disables); VAR's FID setting is ``top_k=900, top_p=0.96``.
        more_smooth: Gumbel-softmax soft codes (visualisation only).
        return_fhat: also return the final ``f_hat [B, Cvae, h, w]`` (needed to decode ``more_smooth`` runs).
        record: if a dict, filled with ``labels`` and per-scale ``raw_logits`` / ``cfg_logits`` / ``filtered_logits``.
        edit_tokens, edit_mask: see :func:`edit`.
        compile: ``torch.compile`` the per-scale step (one graph per scale).
        use_cache: ``False`` runs the naive baseline that recomputes the whole prefix at every scale
            (same tokens; for tests and benchmarks).

    Returns:
        list of ``LongTensor [B, pn_k, pn_k]`` (and ``f_hat`` if ``return_fhat``).
    """
    check_options(cfg_scale, top_k, top_p)
    q = model.quantizer
    labels = resolve_labels(model, cond, batch, generator)
    B = labels.shape[0]
    S = len(model.scales)
    use_cfg = cfg_scale != 0 and S > 1
    rows = 2 * B if use_cfg else B
    if record is not None:
        record["labels"] = labels.clone()
    if edit_tokens is not None:
        edit_tokens = q.check_tokens(edit_tokens)
        if edit_tokens[0].shape[0] != B:
            raise ValueError(f"edit_tokens hold {edit_tokens[0].shape[0]} images for {B} labels")
        edit_mask = check_edit_mask(edit_mask, B, q.latent_side, labels.device)
    elif edit_mask is not None:
        raise ValueError("edit_mask needs edit_tokens (tokenizer.encode(image))")

    all_labels = torch.cat([labels, torch.full_like(labels, model.num_classes)]) if use_cfg else labels
    cond_emb = model.class_emb(all_labels)  # [rows, C]
    mods = model.condition_mods(cond_emb)
    lvl_pos = model.lvl_embed(model.lvl_1L) + model.pos_1LC  # [1, L, C]
    x = cond_emb[:, None] + model.pos_start + lvl_pos[:, :model.first_len]  # [rows, pn0^2, C]
    cache = model.start(rows, dtype=x.dtype) if use_cache else None
    step = _step_fn(model, compile) if use_cache else _uncached_step(model)
    f_hat = q.embedding.weight.new_zeros(B, q.dim, q.latent_side, q.latent_side)
    out, pos = [], 0
    for k, pn in enumerate(model.scales):
        ratio = k / (S - 1) if S > 1 else 0.0
        n = pn * pn
        logits = step(cache, x, mods, cond_emb, pos)  # [rows, n, V]
        check_finite(logits, f"VAR sampling at scale {k}")
        if record is not None:
            record.setdefault("raw_logits", []).append(logits.clone())
        if use_cfg:
            t = cfg_scale * ratio
            logits = (1 + t) * logits[:B] - t * logits[B:]
        if record is not None:
            record.setdefault("cfg_logits", []).append(logits.clone())
        logits = filter_logits(logits, top_k, top_p)
        if record is not None:
            record.setdefault("filtered_logits", []).append(logits.clone())
        idx = draw(logits, generator)  # [B, n]
        if more_smooth:
            tau = max(0.27 * (1 - ratio * 0.95), 0.005)
            gumbel = -torch.empty_like(logits).exponential_(generator=generator).log()
            soft = ((logits * (1 + ratio) + gumbel) / tau).softmax(-1)  # [B, n, V]
            h = (soft @ q.embedding.weight).transpose(1, 2).reshape(B, q.dim, pn, pn)
        else:
            h = q.embed(idx, k)  # [B, Cvae, pn, pn]
        if edit_tokens is not None:
            keep = edit_mask_at(edit_mask, pn)  # [B, 1, pn, pn]
            gt = edit_tokens[k].reshape(B, 1, pn, pn)
            idx = torch.where(keep[:, 0].bool(), gt[:, 0], idx.view(B, pn, pn)).reshape(B, n)
            h = torch.where(keep.bool(), q.embed(gt, k), h)
        out.append(idx.view(B, pn, pn))
        nxt = q.accumulate(f_hat, k, h)
        pos += n
        if nxt is not None:
            nxt = model.word_embed(nxt.to(x.dtype)) + lvl_pos[:, pos:pos + model.scales[k + 1] ** 2]
            x = nxt.repeat(2, 1, 1) if use_cfg else nxt
    return (out, f_hat) if return_fhat else out


def check_edit_mask(mask: torch.Tensor | None, batch: int, side: int, device) -> torch.Tensor:
    """``mask`` ``[h, w]`` or ``[B, h, w]`` at the latent size (1 = keep the given image's tokens) -> ``[B, 1, h, w]``."""
    if mask is None:
        raise ValueError("editing needs edit_mask: [h, w] or [B, h, w] at the latent size, 1 where tokens are kept")
    mask = torch.as_tensor(mask, device=device)
    if mask.dim() == 2:
        mask = mask[None].expand(batch, -1, -1)
    if mask.dim() != 3 or mask.shape[-2:] != (side, side) or mask.shape[0] != batch:
        raise ValueError(f"edit_mask must be [{side}, {side}] or [{batch}, {side}, {side}] (the latent grid, the last "
                         f"scale of the schedule), got {tuple(mask.shape)}; down-sample an image-sized mask by the "
                         f"tokenizer's factor first")
    return mask.float()[:, None]


def edit_mask_at(mask: torch.Tensor, pn: int) -> torch.Tensor:
    """Latent mask ``[B, 1, h, w]`` at scale side ``pn``: bilinear resize, ``> 0.5``; scales with <= 3 tokens keep all."""
    if pn * pn <= 3:
        return torch.ones(mask.shape[0], 1, pn, pn, device=mask.device)
    return (F.interpolate(mask, size=(pn, pn), mode="bilinear", align_corners=False) > 0.5).float()


def edit(model, tokens: Sequence[torch.Tensor], mask: torch.Tensor, cond: Condition | torch.Tensor | Sequence[int] | int,
         generator: torch.Generator | None = None, **options: Any) -> list[torch.Tensor]:
    """Zero-shot editing (VAR Sec. 6): keep ``tokens`` where ``mask`` is 1, generate the rest.

    * in-painting: ``mask`` 0 inside the region to repaint;
    * out-painting: ``mask`` 1 inside the known region, 0 outside;
    * class-conditional editing: in-painting with the new class in ``cond``.

    Args:
        tokens: the image's per-scale ids (``tokenizer.encode(image)``).
        mask: ``[h, w]`` or ``[B, h, w]`` on the latent grid (size of the last scale); at each scale
            it is resized bilinearly and thresholded at 0.5; the first scales (<= 3 tokens) are kept.
        options: as :func:`sample` (``cfg_scale``, ``top_k``, ``top_p``, ``more_smooth``).
    """
    if isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], torch.Tensor):
        options.setdefault("batch", tokens[0].shape[0])  # an int class edits every image to that class
    return sample(model, cond, generator=generator, edit_tokens=tokens, edit_mask=mask, **options)
