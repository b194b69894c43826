"""VAR's next-scale sampler: one transformer step per scale over a static KV cache.

Drives a :class:`~visar.generators.protocol.NextScaleModel` that emits logits (VAR,
:class:`~visar.generators.next_scale.var.NextScaleGenerator`). Per scale ``k = 0..S-1`` (VAR's
``autoregressive_infer_cfg``):

1. ``model.step(state, k)`` gives logits ``[R, n_k, V]``; when guided, rows ``0:B`` are conditional and
   ``B:2B`` the null class, both fed the same tokens;
2. guidance ramps linearly with the scale. visar's ``cfg_scale`` is ``s`` in ``u + s (c - u)`` (1 = no
   guidance); **VAR's ``cfg=c`` is ``cfg_scale=1+c``**. With ``t = (cfg_scale - 1) k/(S-1)`` the logits are
   VAR's ``(1 + t) l_c - t l_u`` (``s_k = 1 + t``; the official float expression, so seeded runs match);
3. top-k (ties kept), then top-p with VAR's ascending convention (:func:`top_p_filter_ascending`);
4. one ``torch.multinomial`` draw per token for the whole batch from the seeded ``torch.Generator``;
5. ``more_smooth``: the draw above still happens (it consumes the generator) but the codes are
   replaced by a Gumbel-softmax mixture ``softmax((l (1 + k/(S-1)) + G) / tau) @ codebook`` with
   ``tau = max(0.27 (1 - 0.95 k/(S-1)), 0.005)`` (visualisation only; FID uses ``more_smooth=False``);
6. the codes are accumulated into ``f_hat`` by the tokenizer's quantizer (``model.quantizer``), whose
   ``area_down(f_hat, pn_{k+1})`` becomes the next scale's input (``model.set_next_input``).

Random labels (``cond=None``, ``batch=N``) are drawn first, from the same generator. Zero-shot editing
(in-painting, out-painting, class-conditional editing; VAR paper Sec. 6 and its demo) forces the
tokens of a given image wherever ``mask`` is 1 (:func:`edit`).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from visar.conditions import Condition
from visar.generators.protocol import NextScaleModel
from visar.nn.guidance import is_guided
from visar.registry import register
from visar.samplers.base import Sampler
from visar.samplers.compiled import StepCompiler
from visar.samplers.logits import check_finite, top_k_filter, top_p_filter_ascending
from visar.samplers.options import check_positive_int

Labels = Condition | torch.Tensor | Sequence[int] | int | None


def guide(logits: torch.Tensor, batch: int, cfg_scale: float, ratio: float) -> torch.Tensor:
    """VAR's ramped guidance of rows ``[cond; null]`` (``[2B, n, V]``) -> ``[B, n, V]``.

    ``t = (cfg_scale - 1) * ratio`` (``ratio = k/(S-1)``), ``(1 + t) l_c - t l_u``: the scale of
    ``u + s (c - u)`` is ``s = 1 + t``, ramping from 1 (no guidance) at scale 0 to ``cfg_scale``.
    """
    t = (cfg_scale - 1) * ratio
    return (1 + t) * logits[:batch] - t * logits[batch:]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """VAR's top-k (0 disables) then ascending top-p (in ``(0, 1]``, 1 disables); removed entries become ``-inf``."""
    if top_k > 0:
        logits = top_k_filter(logits, top_k)
    if top_p < 1:
        logits = top_p_filter_ascending(logits, top_p)
    return logits


def draw(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of ``logits [B, n, V]`` (``torch.multinomial`` with replacement, like VAR) -> ``[B, n]``."""
    B, n, V = logits.shape
    probs = logits.softmax(-1).reshape(B * n, V)
    return torch.multinomial(probs, 1, replacement=True, generator=generator).view(B, n)


def smooth_codes(logits: torch.Tensor, codebook: torch.Tensor, ratio: float, pn: int,
                 generator: torch.Generator | None) -> torch.Tensor:
    """VAR's ``more_smooth`` codes: Gumbel-softmax mixture of ``codebook [V, Cvae]`` -> ``[B, Cvae, pn, pn]``."""
    B = logits.shape[0]
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    gumbel = -torch.empty_like(logits).exponential_(generator=generator).log()
    soft = ((logits * (1 + ratio) + gumbel) / tau).softmax(-1)  # [B, n, V]
    return (soft @ codebook).transpose(1, 2).reshape(B, codebook.shape[1], pn, pn)


def random_labels(num_classes: int, batch: int | None, generator: torch.Generator | None,
                  device: torch.device | str) -> torch.Tensor:
    """``batch`` uniform class ids ``[batch]`` drawn from ``generator`` (VAR's first use of the RNG)."""
    if batch is None or batch < 1:
        raise ValueError("without class ids, pass batch=N to draw N random labels")
    uniform = torch.full((1, num_classes), 1.0 / num_classes, device=device)
    return torch.multinomial(uniform, batch, replacement=True, generator=generator).reshape(batch)


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


@register("sampler", "next_scale")
class NextScaleSampler(Sampler):
    """VAR's sampler (see the module docstring); ``sampler(model, cond, generator, **options)``.

    Args (options, defaults in :attr:`defaults`, the official FID setting is ``cfg_scale=2.5`` (VAR's cfg 1.5),
    ``top_k=900``, ``top_p=0.96``):
        cond: class ids ``[B]`` (Condition, tensor, list, or an int for ``batch`` images of that class);
            ``None`` draws ``batch`` random labels first.
        cfg_scale: ``>= 0``, guidance at the last scale (ramp from 1 at the first); 1 runs no null-class rows.
        top_k: ``>= 0`` (0 disables); top_p: in ``(0, 1]`` (1 disables), VAR's ascending filter.
        more_smooth: Gumbel-softmax soft codes (visualisation only).
        batch: image count when ``cond`` is ``None`` or an int.
        return_fhat: also return the final ``f_hat [B, Cvae, h, w]`` (needed to decode ``more_smooth`` runs).
        record: if a dict, filled with ``labels`` and per-scale ``raw_logits`` ``[R, n_k, V]`` /
            ``cfg_logits`` / ``filtered_logits`` ``[B, n_k, V]``.
        edit_tokens, edit_mask: zero-shot editing, see :func:`edit`.
        compile: ``torch.compile`` the cached per-scale step (one graph per scale, cached per model;
            :mod:`visar.samplers.compiled`).
        use_cache: ``False`` runs the naive baseline that recomputes the whole prefix at every scale.
        progress: tqdm bar by scale.

    Returns:
        list of ``LongTensor [B, pn_k, pn_k]`` (and ``f_hat`` if ``return_fhat``). ``stats``: ``model_passes``
        (transformer calls, one per scale; each serves both CFG halves); with ``compile``, ``compile_s`` and
        ``compiled_graphs``.
    """

    name = "next_scale"
    protocol = NextScaleModel
    emits = "logits"
    defaults = dict(cfg_scale=2.5, top_k=0, top_p=1.0, more_smooth=False, batch=None, return_fhat=False, record=None,
                    edit_tokens=None, edit_mask=None, compile=False, use_cache=True, progress=False)

    def validate(self, options: dict[str, Any]) -> None:
        for name in ("more_smooth", "return_fhat", "compile", "use_cache", "progress"):
            if not isinstance(options[name], bool):
                raise TypeError(f"{name} must be True or False, got {options[name]!r}")
        if options["batch"] is not None:
            check_positive_int("batch", options["batch"])
        if options["record"] is not None and not isinstance(options["record"], dict):
            raise TypeError(f"record must be a dict (filled with logits) or None, "
                            f"got {type(options['record']).__name__}")
        if options["edit_mask"] is not None and options["edit_tokens"] is None:
            raise ValueError("edit_mask needs edit_tokens (tokenizer.encode(image))")
        if options["compile"] and not options["use_cache"]:
            raise ValueError("compile=True compiles the cached per-scale step; it needs use_cache=True")

    def __call__(self, model: Any, cond: Labels, generator: torch.Generator | None = None, **options: Any) -> Any:
        if cond is None or (isinstance(cond, int) and not isinstance(cond, bool)):
            self.check_model(model)
            batch = self.resolve(options)["batch"]
            if cond is None:  # drawn before anything else uses the generator, as VAR does
                cond = random_labels(model.num_classes, batch, generator, next(model.parameters()).device)
            else:
                cond = [cond] * (batch or 1)
        return super().__call__(model, cond, generator, **options)

    @torch.no_grad()
    def run(self, model: Any, cond: Condition, generator: torch.Generator | None, *, cfg_scale: float, top_k: int,
            top_p: float, more_smooth: bool, batch: int | None, return_fhat: bool, record: dict | None,
            edit_tokens: Sequence[torch.Tensor] | None, edit_mask: torch.Tensor | None, compile: bool,
            use_cache: bool, progress: bool) -> Any:
        from tqdm.auto import tqdm

        q = model.quantizer
        labels = model.labels_of(cond, allow_null=False)
        B, S = labels.shape[0], len(model.scales)
        if record is not None:
            record["labels"] = labels.clone()
        if edit_tokens is not None:
            edit_tokens = q.check_tokens(edit_tokens)
            if edit_tokens[0].shape[0] != B:
                raise ValueError(f"edit_tokens hold {edit_tokens[0].shape[0]} images for {B} labels")
            edit_mask = check_edit_mask(edit_mask, B, q.latent_side, labels.device)
        compiler = StepCompiler(labels.device, progress) if compile else None
        state = model.start(labels, guided=is_guided(cfg_scale) and S > 1, use_cache=use_cache)
        if compiler is not None:
            if not (hasattr(model, "forward_scale") and hasattr(state, "forward")):
                raise TypeError(f"compile=True compiles VAR's cached per-scale step (forward_scale); "
                                f"{type(model).__name__} has none: sample with compile=False")
            state.forward = compiler.function(model, type(model).forward_scale, "scale step")
        f_hat = q.embedding.weight.new_zeros(B, q.dim, q.latent_side, q.latent_side)
        self.stats["model_passes"] = 0
        out = []
        for k in tqdm(range(S), disable=not progress, desc="scales", leave=False):
            pn = model.scales[k]
            ratio = k / (S - 1) if S > 1 else 0.0
            logits = model.step(state, k)  # [R, n, V]
            self.stats["model_passes"] += 1
            check_finite(logits, f"VAR sampling at scale {k}")
            if record is not None:
                record.setdefault("raw_logits", []).append(logits.clone())
            if state.guided:
                logits = guide(logits, B, cfg_scale, ratio)
            if record is not None:
                record.setdefault("cfg_logits", []).append(logits.clone())
            logits = filter_logits(logits, top_k, top_p)
            if record is not None:
                record.setdefault("filtered_logits", []).append(logits.clone())
            idx = self.pick(logits, k, generator)  # [B, n]
            h = smooth_codes(logits, q.embedding.weight, ratio, pn, generator) if more_smooth else q.embed(idx, k)
            if edit_tokens is not None:
                keep = edit_mask_at(edit_mask, pn).bool()  # [B, 1, pn, pn]
                gt = edit_tokens[k].reshape(B, 1, pn, pn)
                idx = torch.where(keep[:, 0], gt[:, 0], idx.view(B, pn, pn)).reshape(B, pn * pn)
                h = torch.where(keep, q.embed(gt, k), h)
            out.append(idx.view(B, pn, pn))
            nxt = q.accumulate(f_hat, k, h)  # [B, pn_{k+1}^2, Cvae] or None after the last scale
            if nxt is not None:
                model.set_next_input(state, k + 1, nxt)
        if compiler is not None:
            self.stats.update(compiler.stats)
        return (out, f_hat) if return_fhat else out


    def pick(self, logits: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
        """Token ids ``[B, n]`` of scale ``k`` from its guided, filtered logits ``[B, n, V]`` (one multinomial
        draw per token, as VAR; subclasses such as the flow-map sampler replace the draw)."""
        return draw(logits, generator)


def sample(model: Any, cond: Labels, generator: torch.Generator | None = None, **options: Any) -> Any:
    """``NextScaleSampler()(model, cond, generator, **options)``: per-scale ids ``[B, pn_k, pn_k]``."""
    return NextScaleSampler()(model, cond, generator, **options)


def edit(model: Any, tokens: Sequence[torch.Tensor], mask: torch.Tensor, cond: Labels,
         generator: torch.Generator | None = None, **options: Any) -> list[torch.Tensor]:
    """Zero-shot editing (VAR Sec. 6): keep ``tokens`` where ``mask`` is 1, generate the rest.

    * in-painting: ``mask`` 0 inside the region to repaint;
    * out-painting: ``mask`` 1 inside the known region, 0 outside;
    * class-conditional editing: in-painting with the new class in ``cond`` (an int edits every image).

    Args:
        tokens: the image's per-scale ids (``tokenizer.encode(image)``), ``B`` images.
        mask: ``[h, w]`` or ``[B, h, w]`` on the latent grid (size of the last scale); at each scale
            it is resized bilinearly and thresholded at 0.5; the first scales (<= 3 tokens) are kept.
        options: as :class:`NextScaleSampler` (``cfg_scale``, ``top_k``, ``top_p``, ``more_smooth``, ...).
    """
    if isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], torch.Tensor):
        options.setdefault("batch", tokens[0].shape[0])  # an int class edits every image to that class
    return sample(model, cond, generator=generator, edit_tokens=tokens, edit_mask=mask, **options)


__all__ = ["NextScaleSampler", "sample", "edit", "guide", "filter_logits", "draw", "smooth_codes", "random_labels",
           "check_edit_mask", "edit_mask_at"]
