"""Lossless speculative decoding of next-token discrete generators with a draft model.

:class:`SpeculativeSampler` (registered ``"speculative"``) draws exactly the law of the plain sampler
(``"autoregressive"``) with the same options: CFG on raw logits, temperature, top-k and top-p. Each
round (``docs/design/samplers.md`` 1.1-1.5, docs/speculative.md):

1. the draft proposes ``k' = min(k, L - n)`` tokens ``x_j ~ q_j`` (its processed laws, with its own
   options, guidance evaluated at each token's absolute position);
2. one target pass over ``[y_prev, x_1 .. x_k']`` gives ``p_1 .. p_{k'+1}`` (the previous round's
   correction ``y_prev`` is prepended, so it costs no pass of its own);
3. :func:`~visar.samplers.acceptance.accept_drafts`: accept while ``u q(x) < p(x)``; at the first
   rejection ``y ~ (p - q)+``, after ``k'`` acceptances the bonus ``y ~ p_{k'+1}`` (none once the image
   is complete);
4. both caches roll back by lowering the row's cached length (:class:`~visar.samplers.ragged_feed.RaggedFeeder`).

Rows are ragged: each keeps its own length, finished rows ride along as no-ops, and a batch runs as
many rounds as its slowest row. Any logits-emitting :class:`~visar.generators.protocol.NextTokenModel`
over the same vocabulary and token count works as the draft; only ``start`` and ``step`` are used.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from tqdm.auto import tqdm

from visar.conditions import Condition
from visar.generators.protocol import NextTokenModel
from visar.nn.guidance import is_guided
from visar.registry import register
from visar.samplers.acceptance import accept_drafts, processed_laws, residual
from visar.samplers.autoregressive import check_cfg_interval, check_num_tokens
from visar.samplers.base import Sampler
from visar.samplers.logits import sample_categorical
from visar.samplers.options import check_common, check_option_names, check_positive_int
from visar.samplers.ragged_feed import RaggedFeeder

#: the plain sampler's options that define the target law
LAW_OPTIONS = ("cfg_scale", "cfg_interval", "temperature", "top_k", "top_p")
TARGET_DEFAULTS = dict(cfg_scale=1.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0, num_tokens=None,
                       progress=False)


class VerifySampler(Sampler):
    """Shared part of the lossless draft-and-verify samplers: the target's options and processed law, the
    statistics and the output shape. Subclasses implement :meth:`run`.

    The protected methods (``_residual``, ``_rollback``; the speculative sampler's ``_ratio_law`` and
    ``_emitted``) are the rule's seams: tests plant bugs there to check that the law tests catch them.
    """

    protocol = NextTokenModel
    emits = "logits"

    def validate(self, options: dict[str, Any]) -> None:
        check_cfg_interval(options["cfg_interval"])

    @staticmethod
    def law(options: dict[str, Any]) -> dict[str, Any]:
        """The options that define a processed law (:data:`LAW_OPTIONS`)."""
        return {k: options[k] for k in LAW_OPTIONS}

    def _residual(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Correction weights after a rejection: :func:`visar.samplers.acceptance.residual`."""
        return residual(p, q)

    def _rollback(self, feeder: RaggedFeeder, position: torch.Tensor, target: bool) -> None:
        """Forget every cached token at or after ``position [B]`` (``target``: the verifying model)."""
        feeder.forget_from(position)

    def finish(self, model: Any, tokens: torch.Tensor, target: RaggedFeeder, rounds: torch.Tensor,
               accepted: torch.Tensor, proposed: torch.Tensor, **extra: Any) -> torch.Tensor:
        """Fill :attr:`stats` and shape ``tokens [B, L]`` like the plain sampler's output."""
        L = tokens.shape[1]
        self.stats = dict(
            acceptance_rate=float(accepted.sum()) / max(int(proposed.sum()), 1),
            tokens_per_target_pass=L / target.passes,
            target_passes=target.passes,
            rounds=int(rounds.max()),
            tokens=L,
            accepted=int(accepted.sum()),
            proposed=int(proposed.sum()),
            row_target_passes=(1 + rounds).cpu(),
            row_accepted=accepted.cpu(),
            **extra,
        )
        if L == model.num_tokens and hasattr(model, "grid_size"):
            return tokens.view(-1, model.grid_size, model.grid_size)
        return tokens


def model_device(model: Any) -> torch.device | None:
    """Device of a module's first parameter (``None`` for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return None


def check_draft(draft: Any) -> Any:
    """The draft model: a logits-emitting ``NextTokenModel``, or a folder holding ``generator.json`` and
    ``generator.safetensors`` (a pipeline folder or a saved generator), loaded on the CPU in eval mode."""
    if draft is None:
        raise TypeError("the speculative sampler needs a draft model: SpeculativeSampler(draft=model_or_folder, k=4)")
    if isinstance(draft, (str, os.PathLike)):
        from visar.generators.base import Generator

        draft = Generator.from_pretrained(draft, "generator").eval()
    if not isinstance(draft, NextTokenModel) or getattr(draft, "emits", None) != "logits":
        raise TypeError(f"draft must be a next-token generator that emits logits (a NextTokenModel with "
                        f"emits == 'logits', e.g. a LlamaGen model) or its folder; got {type(draft).__name__}"
                        + (f" emitting {draft.emits!r}" if hasattr(draft, "emits") else ""))
    return draft


def check_same_tokens(model: Any, draft: Any) -> None:
    """Raise a ``ValueError`` unless ``draft`` models the target's tokens: same ``num_tokens`` and, where
    both models say, the same ``vocab_size`` and ``grid_size``."""
    for attr in ("num_tokens", "vocab_size", "grid_size"):
        a, b = getattr(model, attr, None), getattr(draft, attr, None)
        if a is not None and b is not None and a != b:
            raise ValueError(f"the draft has {attr}={b} but the target has {attr}={a}: speculative decoding "
                             "needs a draft over the same tokenizer (vocabulary and token grid)")


def check_draft_options(value: Any) -> dict[str, Any]:
    """``draft_options``: ``None`` or a dict over :data:`LAW_OPTIONS` (the draft's processing)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"draft_options must be a dict over {', '.join(LAW_OPTIONS)} or None, got "
                        f"{type(value).__name__}")
    check_option_names(value, LAW_OPTIONS, "draft_options")
    check_common(value)
    if "cfg_interval" in value:
        check_cfg_interval(value["cfg_interval"])
    return dict(value)


@register("sampler", "speculative")
class SpeculativeSampler(VerifySampler):
    """Lossless speculative decoding with a draft model: the output law is the plain sampler's.

    ``SpeculativeSampler(draft=model_or_folder, k=4, **options)``; ``pipe(labels, sampler=sampler)``.

    Options:
        cfg_scale, cfg_interval, temperature, top_k, top_p, num_tokens, progress: the target's law and
            run, as for ``"autoregressive"``.
        draft: a logits-emitting ``NextTokenModel`` over the same vocabulary and token count, or a folder
            with ``generator.json`` / ``generator.safetensors`` (loaded once, moved to the target's device).
        k: draft tokens per round, an int ``>= 1``.
        draft_options: the draft's own ``cfg_scale`` / ``cfg_interval`` / ``temperature`` / ``top_k`` /
            ``top_p`` (each defaults to the target's); they change acceptance only, never the law.

    Returns ``LongTensor [B, grid, grid]`` for a whole image, ``[B, num_tokens]`` for a prefix.
    ``stats``: ``acceptance_rate`` (accepted / proposed drafts), ``tokens_per_target_pass`` (tokens per
    row / ``target_passes``), ``target_passes`` and ``draft_passes`` (model calls of the batch,
    ``start`` included), ``rounds``; also ``accepted``, ``proposed``, ``tokens`` and per row
    ``row_target_passes`` (``1 + `` the rounds the row ran) and ``row_accepted`` (CPU tensors ``[B]``).
    """

    name = "speculative"
    defaults = dict(TARGET_DEFAULTS, draft=None, k=4, draft_options=None)

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._loaded: dict = {}
        if "k" in options:
            check_positive_int("k", options["k"])
        if "draft_options" in options:
            check_draft_options(options["draft_options"])
        if options.get("draft") is not None:
            self.draft_model(options["draft"])

    def validate(self, options: dict[str, Any]) -> None:
        super().validate(options)
        check_positive_int("k", options["k"])
        check_draft_options(options["draft_options"])

    def __repr__(self) -> str:
        def show(k: str, v: Any) -> str:
            if k == "draft" and not isinstance(v, (str, os.PathLike)):
                return f"draft=<{type(v).__name__}>"
            return f"{k}={v!r}"

        return f"{type(self).__name__}({', '.join(show(k, v) for k, v in self.options.items())})"

    def draft_model(self, draft: Any, device: torch.device | None = None) -> Any:
        """The checked draft model; a folder is loaded once, then moved to ``device`` (the target's)."""
        if not isinstance(draft, (str, os.PathLike)):
            return check_draft(draft)
        key = os.fspath(draft)
        if key not in self._loaded:
            self._loaded[key] = check_draft(draft)
        model = self._loaded[key]
        if device is not None and model_device(model) != device:
            model.to(device)
        return model

    def _ratio_law(self, drawn: torch.Tensor, raw: torch.Tensor, token_index: torch.Tensor,
                   options: dict[str, Any]) -> torch.Tensor:
        """The draft law used in the acceptance test: the one each draft token was drawn from."""
        return drawn

    def _emitted(self, n: torch.Tensor, accepted: torch.Tensor, proposed: torch.Tensor, length: int) -> torch.Tensor:
        """Tokens a round commits per row: the accepted drafts plus the correction or bonus (none once
        the image is complete)."""
        return torch.where(n + accepted < length, accepted + 1, accepted)

    @torch.no_grad()
    def run(self, model: Any, cond: Condition, generator: torch.Generator | None, **o: Any) -> torch.Tensor:
        L = check_num_tokens(model, o["num_tokens"])
        draft = self.draft_model(o["draft"], model_device(model))
        check_same_tokens(model, draft)
        topts = self.law(o)
        dopts = {**topts, **check_draft_options(o["draft_options"])}
        k, B = o["k"], cond.batch_size
        target = RaggedFeeder(model, cond, is_guided(topts["cfg_scale"]), L)
        drafter = RaggedFeeder(draft, cond, is_guided(dopts["cfg_scale"]), L)
        V = target.first.shape[-1]
        if drafter.first.shape[-1] != V or drafter.device != target.device:
            raise ValueError(f"the draft emits {drafter.first.shape[-1]} logits on {drafter.device}, the target "
                             f"{V} on {target.device}: give a draft over the same vocabulary, on the same device")
        dev = target.device
        buf = torch.zeros(B, L, dtype=torch.long, device=dev)  # committed tokens, then this round's drafts
        n = torch.zeros(B, dtype=torch.long, device=dev)
        rounds, acc, prop = (torch.zeros(B, dtype=torch.long, device=dev) for _ in range(3))
        rows = torch.arange(B, device=dev)
        bar = tqdm(total=L, disable=not o["progress"], desc="tokens", leave=False)
        while bool((n < L).any()):
            active = n < L
            kk = (L - n).clamp(0, k)  # drafts that count; 0 for finished rows
            m = int(kk.max())
            # draft: feed what is committed but not cached (y; or x_k' and y), then one token at a time
            drafts = torch.zeros(B, m, dtype=torch.long, device=dev)
            Q = torch.zeros(B, m, V, device=dev)
            for j in range(m):
                drafter.feed(buf, torch.where(j < kk, n + j, drafter.cached))  # j = 0: the pending tokens
                t = (n + j)[:, None]
                raw = drafter.laws(t)
                drawn = processed_laws(raw, B, t, **dopts)
                x = sample_categorical(drawn[:, 0], generator)
                drafts[:, j] = x
                Q[:, j] = self._ratio_law(drawn, raw, t, dopts)[:, 0]
                live = j < kk
                buf[rows[live], (n + j)[live]] = x[live]
            # verify: one target pass over the pending correction and the drafts
            target.feed(buf, torch.where(active, torch.minimum(n + kk, torch.full_like(n, L - 1)), target.cached))
            t = n[:, None] + torch.arange(m + 1, device=dev)
            P = processed_laws(target.laws(t), B, t, **topts)
            accepted, y = accept_drafts(P, Q, drafts, kk, generator, self._residual)
            emitted = torch.where(active, self._emitted(n, accepted, kk, L), 0)
            fix = active & (emitted > accepted)
            buf[rows[fix], (n + accepted)[fix]] = y[fix]
            self._rollback(target, n + accepted, True)
            self._rollback(drafter, n + accepted, False)
            rounds += active.long()
            acc += torch.where(active, accepted, 0)
            prop += kk
            before = int(n.min())
            n = (n + emitted).clamp_max(L)
            bar.update(int(n.min()) - before)
        bar.close()
        return self.finish(model, buf, target, rounds, acc, prop, draft_passes=drafter.passes)


__all__ = ["SpeculativeSampler", "VerifySampler", "check_draft", "check_same_tokens", "check_draft_options",
           "LAW_OPTIONS", "TARGET_DEFAULTS"]
