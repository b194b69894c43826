"""Distilled Decoding's teacher map: a deterministic, law-preserving map from Gaussian noise to a token.

Distilled Decoding (Liu et al. 2024, "Distilled Decoding 1: One-step Sampling of Image Auto-regressive
Models with Flow Matching", arXiv 2412.17153, Sec. 3.1). At one AR step the teacher gives a categorical
``p`` over codebook vectors ``c_1..c_V`` in ``R^C``. On the straight path ``x_t = t x_1 + (1 - t) x_0``
from ``x_0 ~ N(0, I)`` to ``x_1 ~ sum_k p_k delta(c_k)`` the marginal velocity has a closed form:

    v(x, t) = (xhat_1(x, t) - x) / (1 - t),   xhat_1 = sum_k w_k c_k,
    w_k ∝ p_k exp(-|x - t c_k|^2 / (2 (1 - t)^2)).

Integrating ``dx/dt = v`` from ``t = 0`` to ``1`` and snapping the end point to the nearest codebook vector
(of the support of ``p``) maps noise to a token; in continuous time the noise region that ends at ``c_k``
has Gaussian mass exactly ``p_k``. The solver is part of the definition: Heun on a uniform grid of
``steps`` intervals (16 by default), whose last interval is an Euler step (the velocity is singular at
``t = 1``; that Euler step lands exactly on ``xhat_1``). Coarse Euler over-selects likely tokens (it
acts like a lower temperature): ``solver="euler"`` exists to measure that, not to sample with.

``p`` is the *processed* distribution (guidance, temperature, top-k, top-p), so the map reproduces the
sampler's law. Arithmetic is float64.
"""
from __future__ import annotations

from typing import Any

import torch

from visar.conditions import Condition
from visar.generators.protocol import NextTokenModel
from visar.registry import register
from visar.samplers.autoregressive import AR_DEFAULTS, AutoregressiveSampler, check_num_tokens, decode_tokens
from visar.samplers.logits import check_finite, process_logits
from visar.samplers.next_scale import NextScaleSampler

SOLVERS = ("heun", "euler")


def _check(noise: torch.Tensor, probs: torch.Tensor, codebook: torch.Tensor, steps: int, solver: str) -> None:
    if noise.dim() != 2 or probs.dim() != 2 or codebook.dim() != 2:
        raise ValueError(f"noise [N, C], probs [N, V] and codebook [V, C] must be 2-D; got {tuple(noise.shape)}, "
                         f"{tuple(probs.shape)}, {tuple(codebook.shape)}")
    if noise.shape[0] != probs.shape[0] or probs.shape[1] != codebook.shape[0] or noise.shape[1] != codebook.shape[1]:
        raise ValueError(f"shapes disagree: noise {tuple(noise.shape)} (N, C), probs {tuple(probs.shape)} (N, V), "
                         f"codebook {tuple(codebook.shape)} (V, C)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (16 with Heun is the default teacher), got {steps!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")


def x1_prediction(x: torch.Tensor, t: float, log_p: torch.Tensor, codebook: torch.Tensor,
                  code_sq: torch.Tensor) -> torch.Tensor:
    """``xhat_1 = sum_k w_k c_k`` at ``x [N, C]``, time ``t < 1``; ``log_p [N, V]`` (``-inf`` off the support)."""
    s = 1.0 - t
    # |x - t c|^2 = |x|^2 - 2 t x.c + t^2 |c|^2; the |x|^2 term is the same for every k and cancels
    logits = log_p + (2.0 * t * (x @ codebook.T) - (t * t) * code_sq) / (2.0 * s * s)  # [N, V]
    return torch.softmax(logits, dim=-1) @ codebook


def flow_map(noise: torch.Tensor, probs: torch.Tensor, codebook: torch.Tensor, steps: int = 16,
             solver: str = "heun", return_endpoint: bool = False):
    """Map noise to tokens through the teacher flow.

    Args:
        noise: ``[N, C]`` standard normal noise, one row per token.
        probs: ``[N, V]`` processed token distributions (rows sum to 1; zeros are off the support).
        codebook: ``[V, C]`` codebook vectors (l2-normalised where the tokenizer normalises).
        steps: uniform time intervals; solver: ``"heun"`` (default teacher) or ``"euler"``.
        return_endpoint: also return the ODE end point ``[N, C]`` before snapping.
    Returns:
        ``LongTensor [N]`` token ids (nearest support vector to the end point), and the end point.
    """
    _check(noise, probs, codebook, steps, solver)
    cb = codebook.to(torch.float64)
    p = probs.to(torch.float64)
    if (p < 0).any() or not torch.allclose(p.sum(-1), torch.ones_like(p[:, 0]), atol=1e-6):
        raise ValueError("probs must be non-negative rows summing to 1 (softmax of the processed logits)")
    log_p = torch.log(p)  # -inf off the support
    code_sq = (cb * cb).sum(-1)  # [V]
    x = noise.to(torch.float64)
    h = 1.0 / steps
    for i in range(steps):
        t0 = i * h
        v0 = (x1_prediction(x, t0, log_p, cb, code_sq) - x) / (1.0 - t0)
        if solver == "euler" or i == steps - 1:  # the last interval ends at the singular t = 1
            x = x + h * v0
        else:
            t1 = (i + 1) * h
            xp = x + h * v0
            v1 = (x1_prediction(xp, t1, log_p, cb, code_sq) - xp) / (1.0 - t1)
            x = x + 0.5 * h * (v0 + v1)
    dist = (x * x).sum(-1, keepdim=True) - 2.0 * x @ cb.T + code_sq  # [N, V]
    dist = dist.masked_fill(p <= 0, float("inf"))
    tokens = dist.argmin(-1)
    return (tokens, x) if return_endpoint else tokens


def codebook_of(source) -> torch.Tensor:
    """Codebook ``[V, C]`` from a tensor, a tokenizer with ``codebook()`` (LlamaGen VQ: l2-normalised) or a
    multi-scale tokenizer/quantizer with ``embedding.weight`` (VAR: not normalised)."""
    if isinstance(source, torch.Tensor):
        cb = source
    elif callable(getattr(source, "codebook", None)):
        cb = source.codebook()
    else:
        q = getattr(source, "quantizer", getattr(source, "quantize", source))
        emb = getattr(q, "embedding", None)
        if emb is None:
            raise TypeError(f"cannot read a codebook from {type(source).__name__}: give a [V, C] tensor or a VQ "
                            "tokenizer")
        cb = emb.weight
    if cb.dim() != 2:
        raise ValueError(f"a codebook is [V, C], got shape {tuple(cb.shape)}")
    return cb.detach()




# ---------------------------------------------------------------------------------------------- the sampler

@register("sampler", "flow_map")
class FlowMapSampler(AutoregressiveSampler):
    """Next-token sampling through the teacher flow map: the same noise gives the same image.

    Every token is ``flow_map(noise[:, t], p_t, codebook)`` where ``p_t`` is the processed distribution
    the plain :class:`~visar.samplers.autoregressive.AutoregressiveSampler` would draw from (same guidance,
    temperature, top-k, top-p), so the token law equals the plain sampler's (up to the ODE solver error of
    ``num_flow_steps`` Heun steps). The noise is the only randomness: ``noise [B, L, C]`` given, or drawn
    from ``generator`` as one ``[B, L, C]`` standard normal tensor before the first token.

    Options: those of the autoregressive sampler (without ``compile``) plus
        codebook: ``[V, C]`` tensor or the pipeline's VQ tokenizer (required; ``C`` is the code dimension).
        noise: ``[B, L, C]`` float noise or ``None``; num_flow_steps: 16; solver: ``"heun"``.

    ``stats``: ``model_passes``, ``tokens``, ``flow_evaluations`` (velocity evaluations per token).
    """

    name = "flow_map"
    protocol = NextTokenModel
    emits = "logits"
    defaults = {**{k: v for k, v in AR_DEFAULTS.items() if k != "compile"},
                "codebook": None, "noise": None, "num_flow_steps": 16, "solver": "heun"}

    def validate(self, options: dict[str, Any]) -> None:
        super().validate(options)
        if options["codebook"] is None:
            raise ValueError("FlowMapSampler needs codebook=: the VQ tokenizer of the pipeline (or its [V, C] codebook)")
        check_flow_options(options)

    @torch.no_grad()
    def run(self, model: Any, cond: Condition, generator: torch.Generator | None, **options: Any) -> torch.Tensor:
        L = check_num_tokens(model, options["num_tokens"])
        codebook = codebook_of(options["codebook"])
        V = getattr(model, "vocab_size", codebook.shape[0])
        if codebook.shape[0] != V:
            raise ValueError(f"the codebook has {codebook.shape[0]} vectors but the model draws from {V} tokens: "
                             "give the codebook of the tokenizer this generator was trained on")
        B, C = cond.batch_size, codebook.shape[1]
        noise = options["noise"]
        if noise is None:
            dev = generator.device if generator is not None else codebook.device
            noise = torch.randn(B, L, C, generator=generator, device=dev)
        elif not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (B, L, C) or not noise.is_floating_point():
            raise ValueError(f"noise must be a float tensor [B, L, C] = [{B}, {L}, {C}] (one codebook-dimension "
                             f"vector per token), got {getattr(noise, 'shape', type(noise).__name__)}")
        temperature, top_k, top_p = options["temperature"], options["top_k"], options["top_p"]
        steps, solver = options["num_flow_steps"], options["solver"]

        def pick(guided: torch.Tensor, t: int) -> torch.Tensor:
            check_finite(guided, "flow-map sampling")
            probs = torch.softmax(process_logits(guided.float(), temperature, top_k, top_p), dim=-1)
            return flow_map(noise[:, t].to(probs.device), probs, codebook.to(probs.device), steps, solver)

        out = decode_tokens(model, cond, None, options["cfg_scale"], options["cfg_interval"], temperature, top_k,
                            top_p, L, progress=options["progress"], stats=self.stats, pick=pick)
        self.stats["flow_evaluations"] = 2 * steps - 1 if solver == "heun" else steps
        if L == model.num_tokens and hasattr(model, "grid_size"):
            return out.view(-1, model.grid_size, model.grid_size)
        return out


def check_flow_options(options: dict[str, Any]) -> None:
    if options["solver"] not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {options['solver']!r}")
    steps = options["num_flow_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_flow_steps must be an integer >= 1, got {steps!r}")


@register("sampler", "flow_map_scale")
class NextScaleFlowMapSampler(NextScaleSampler):
    """VAR sampling through the teacher flow map (Distilled Decoding, next-scale form).

    Within a scale the tokens are independent given the coarser scales, so token ``j`` of scale ``k`` is
    ``flow_map(noise[:, off_k + j], p_{k, j}, codebook)`` with ``p`` the distribution VAR's sampler draws
    from (guidance ramp, top-k, top-p) and the codebook the quantizer's ``embedding.weight`` (not
    normalised in VAR). Same noise, same image; the token law is VAR's (up to the solver error).

    Options: :class:`~visar.samplers.next_scale.NextScaleSampler`'s plus ``noise`` (``[B, L, C]`` over all
    ``L = sum(pn_k^2)`` tokens, ``C`` the code dimension; ``None``: drawn from ``generator`` after any
    random labels), ``num_flow_steps`` (16) and ``solver`` (``"heun"``).
    """

    name = "flow_map_scale"
    defaults = {**NextScaleSampler.defaults, "noise": None, "num_flow_steps": 16, "solver": "heun"}

    def validate(self, options: dict[str, Any]) -> None:
        super().validate(options)
        check_flow_options(options)
        if options["more_smooth"]:
            raise ValueError("more_smooth replaces the drawn codes by Gumbel-softmax mixtures; it has no flow-map form")

    @torch.no_grad()
    def run(self, model: Any, cond: Condition, generator: torch.Generator | None, *, noise: Any,
            num_flow_steps: int, solver: str, **options: Any) -> Any:
        codebook = model.quantizer.embedding.weight.detach()
        B, C = cond.batch_size, codebook.shape[1]
        sizes = [pn * pn for pn in model.scales]
        L = sum(sizes)
        if noise is None:
            noise = torch.randn(B, L, C, generator=generator, device=generator.device if generator is not None
                                else codebook.device)
        elif not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (B, L, C) or not noise.is_floating_point():
            raise ValueError(f"noise must be a float tensor [B, L, C] = [{B}, {L}, {C}] (all scales' tokens), got "
                             f"{getattr(noise, 'shape', type(noise).__name__)}")
        offsets = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
        self._flow = (noise, offsets, codebook, num_flow_steps, solver)
        try:
            out = super().run(model, cond, generator, **options)
        finally:
            del self._flow
        self.stats["flow_evaluations"] = 2 * num_flow_steps - 1 if solver == "heun" else num_flow_steps
        return out

    def pick(self, logits: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
        noise, off, codebook, steps, solver = self._flow
        B, n, V = logits.shape
        probs = torch.softmax(logits.float(), dim=-1).reshape(B * n, V)
        eps = noise[:, off[k]:off[k + 1]].reshape(B * n, -1).to(probs.device)
        return flow_map(eps, probs, codebook.to(probs.device), steps, solver).view(B, n)


__all__ = ["SOLVERS", "flow_map", "x1_prediction", "codebook_of", "FlowMapSampler", "NextScaleFlowMapSampler"]
