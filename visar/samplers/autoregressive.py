"""The plain autoregressive sampler over a static KV cache (LlamaGen), and an uncached reference loop.

:class:`AutoregressiveSampler` (registered ``"autoregressive"``) drives any
:class:`~visar.generators.protocol.NextTokenModel` that emits logits (LlamaGen; CTF's coarse stage):
``model.start(cond, guided)`` prefills the condition, then one ``model.decode_step`` per token.

Per token (LlamaGen, ``autoregressive/models/generate.py``): guidance on raw logits
``u + (c - u) * cfg_scale``, then ``/ max(temperature, 1e-5)``, top-k, top-p, softmax and one
``torch.multinomial`` for the whole batch from the given ``torch.Generator``. With the same seed on
CPU this reproduces the official samples token for token.

Guidance runs iff ``cfg_scale != 1`` (:func:`visar.nn.guidance.is_guided`): ``cfg_scale > 1`` is
LlamaGen's CFG, ``0 <= cfg_scale < 1`` weakens the condition (LlamaGen ran unguided there).

``cfg_interval`` (LlamaGen's exact rule): token 0 (from the prefill) is always guided; token ``t >= 1``
comes from decode step ``i = t - 1`` and uses the conditional logits alone when
``cfg_interval > -1 and i > cfg_interval`` (the unconditional half is still computed).
"""
from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from visar.conditions import Condition, cat_conditions
from visar.generators.protocol import NextTokenModel
from visar.nn.guidance import is_guided
from visar.registry import register
from visar.samplers.base import Sampler
from visar.samplers.compiled import StepCompiler
from visar.samplers.logits import cfg_mix, check_finite, draw_from_logits
from visar.samplers.options import check_common, check_option_names

#: the options of the loop and their defaults (LlamaGen's ``sample``)
AR_DEFAULTS = dict(cfg_scale=1.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0, num_tokens=None,
                   progress=False, compile=False)


def check_cfg_interval(value: Any) -> int:
    """``cfg_interval``: an int ``>= -1`` (-1 guides every token)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < -1:
        raise ValueError(f"cfg_interval must be an int >= -1 (-1 disables it), got {value!r}")
    return value


def check_num_tokens(model: Any, num_tokens: int | None) -> int:
    """Tokens to draw: ``num_tokens`` in ``[1, model.num_tokens]`` (``None``: the whole image)."""
    L = model.num_tokens if num_tokens is None else num_tokens
    if isinstance(L, bool) or not isinstance(L, int) or not 1 <= L <= model.num_tokens:
        raise ValueError(f"num_tokens must be an int in [1, {model.num_tokens}], got {num_tokens!r}")
    return L


def guided_logits(logits: torch.Tensor, batch: int, cfg_scale: float, token_index: int,
                  cfg_interval: int = -1) -> torch.Tensor:
    """Guided logits ``[B, ...]`` of image token ``token_index`` from raw rows ``[R, ...]``.

    ``R == B`` (no unconditional half) returns the rows unchanged; otherwise rows are ``[cond; uncond]``
    and guidance applies unless LlamaGen's ``cfg_interval`` switches it off for this token.
    """
    if logits.shape[0] == batch:
        return logits
    cond, uncond = logits[:batch], logits[batch:]
    if cfg_interval > -1 and token_index - 1 > cfg_interval:
        return cond
    return cfg_mix(cond, uncond, cfg_scale)


def draw(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
         generator: torch.Generator | None) -> torch.Tensor:
    """Process ``logits [B, V]`` (temperature, top-k, top-p), softmax, one multinomial: ``[B]``.

    One op (:func:`visar.samplers.logits.draw_from_logits`: the fused kernel on CUDA); on the CPU the tokens and
    the generator's state are those of ``sample_categorical(softmax(process_logits(...)))``."""
    check_finite(logits, "autoregressive sampling")
    return draw_from_logits(logits, temperature, top_k, top_p, generator)


@torch.no_grad()
def decode_tokens(model: Any, cond: Condition, generator: torch.Generator | None, cfg_scale: float,
                  cfg_interval: int, temperature: float, top_k: int, top_p: float, num_tokens: int,
                  progress: bool = False, compile: bool = False, stats: dict | None = None,
                  pick: Any = None) -> torch.Tensor:
    """The cached AR loop on validated options: ``LongTensor [B, num_tokens]`` in raster order.

    ``model`` is a logits-emitting :class:`NextTokenModel`. Models built on
    :class:`~visar.generators.components.token_cache_steps.CachedTokenSteps` run the unchecked ``decode_step``
    attending to the written prefix only, or with ``compile`` the same step compiled over the whole cache
    (static shapes, :mod:`visar.samplers.compiled`); any other implementation of the protocol runs its
    ``step``. ``stats`` (if given) receives ``model_passes`` (the prefill counts 1) and ``tokens`` (image
    tokens drawn per row), and with ``compile`` ``compile_s`` / ``compiled_graphs``.
    """
    L = num_tokens
    fast = hasattr(model, "decode_step")
    if compile and not fast:
        raise TypeError(f"compile=True compiles the unchecked decode_step of cached next-token models "
                        f"(CachedTokenSteps); {type(model).__name__} has none: sample with compile=False")
    compiler = StepCompiler(next(model.parameters()).device, progress) if compile else None
    state, logits = model.start(cond, guided=is_guided(cfg_scale))  # logits [R, V]
    B, R = state.batch, state.rows
    compiled = compiler.function(model, type(model).decode_step, "decode step") if compile else None

    def step(fed: torch.Tensor, t: int) -> torch.Tensor:  # feed token t - 1 of every row: [R, 1, V]
        if compiled is not None:  # the whole cache (static shapes)
            return compiled(state, fed, pos, None)
        if fast:  # only the written prefix
            return model.decode_step(state, fed, pos, state.cond_len + t)
        return model.step(state, fed, pos)

    device = logits.device
    out = torch.empty(B, L, dtype=torch.long, device=device)
    pos = torch.zeros(R, dtype=torch.long, device=device)  # reused buffer: image index of the fed token
    for t in tqdm(range(L), disable=not progress, desc="tokens", leave=False):
        if t > 0:
            fed = out[:, t - 1:t].repeat(R // B, 1)  # [R, 1]: both CFG halves get the same token
            pos.fill_(t - 1)
            logits = step(fed, t)[:, 0]
        guided = guided_logits(logits, B, cfg_scale, t, cfg_interval)
        out[:, t] = draw(guided, temperature, top_k, top_p, generator) if pick is None else pick(guided, t)
    if stats is not None:
        stats.update(model_passes=L, tokens=L)
        if compiler is not None:
            stats.update(compiler.stats)
    return out


@register("sampler", "autoregressive")
class AutoregressiveSampler(Sampler):
    """Raster-order next-token sampling with a static KV cache (LlamaGen's sampler).

    Options (defaults reproduce ``NextTokenGenerator.sample``):
        cfg_scale: guidance scale ``>= 0`` (1 = none: no unconditional rows are run).
        cfg_interval: LlamaGen's guidance interval (``-1``: guide every token).
        temperature: ``> 0``; top_k: ``>= 0`` (0 disables); top_p: in ``(0, 1]`` (1 disables).
        num_tokens: tokens to draw (``None``: the whole image).
        progress: tqdm bar by token.
        compile: run the decode step through ``torch.compile`` (static shapes: every step attends over the
            whole cache; :mod:`visar.samplers.compiled`).

    Returns ``LongTensor [B, grid, grid]`` for a whole image, ``[B, num_tokens]`` for a prefix.
    ``stats``: ``model_passes`` (prefill + one per later token) and ``tokens`` (drawn per row); with
    ``compile``, ``compile_s`` (seconds spent compiling in this call, 0 once the graph is cached) and
    ``compiled_graphs``.
    """

    name = "autoregressive"
    protocol = NextTokenModel
    emits = "logits"
    defaults = AR_DEFAULTS

    def validate(self, options: dict[str, Any]) -> None:
        check_cfg_interval(options["cfg_interval"])

    def run(self, model: Any, cond: Condition, generator: torch.Generator | None, **options: Any) -> torch.Tensor:
        options["num_tokens"] = check_num_tokens(model, options["num_tokens"])
        out = decode_tokens(model, cond, generator, stats=self.stats, **options)
        if out.shape[1] == model.num_tokens and hasattr(model, "grid_size"):
            return out.view(-1, model.grid_size, model.grid_size)
        return out


def sample_autoregressive(model: Any, cond: Condition, generator: torch.Generator | None = None,
                          **options: Any) -> torch.Tensor:
    """:class:`AutoregressiveSampler` with ``options``, returning ``LongTensor [B, num_tokens]`` (raster order)."""
    return AutoregressiveSampler()(model, cond, generator, **options).flatten(1)


@torch.no_grad()
def sample_autoregressive_naive(model: Any, cond: Condition, generator: torch.Generator | None = None,
                                **options: Any) -> torch.Tensor:
    """Reference loop without a cache: every step recomputes the full teacher-forced pass over the prefix
    (``model.forward``). Same draws as :func:`sample_autoregressive` (for tests and benchmarks); ``[B, L]``.

    Takes the sampler's options except ``progress``/``compile``.
    """
    accepted = {k: v for k, v in AR_DEFAULTS.items() if k not in ("progress", "compile")}
    check_option_names(options, accepted, "sample_autoregressive_naive")
    o = {**accepted, **options}
    check_common(o)
    check_cfg_interval(o["cfg_interval"])
    L = check_num_tokens(model, o["num_tokens"])
    B = cond.batch_size
    guided = is_guided(o["cfg_scale"])
    if getattr(model, "text_conditional", False):
        cond = model.padded_text(cond)
    full = cat_conditions(cond, model.null_condition(cond)) if guided else cond
    R = 2 * B if guided else B
    device = next(model.parameters()).device
    out = torch.zeros(B, L, dtype=torch.long, device=device)
    for t in range(L):
        prefix = torch.cat([out[:, :t], out.new_zeros(B, 1)], dim=1).repeat(R // B, 1)  # last id unused
        logits = model(prefix, full)[:, t]  # [R, V]
        out[:, t] = draw(guided_logits(logits, B, o["cfg_scale"], t, o["cfg_interval"]), o["temperature"],
                         o["top_k"], o["top_p"], generator)
    return out


__all__ = ["AutoregressiveSampler", "AR_DEFAULTS", "decode_tokens", "guided_logits", "draw",
           "sample_autoregressive", "sample_autoregressive_naive", "check_cfg_interval", "check_num_tokens"]
