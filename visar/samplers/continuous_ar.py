"""Raster-order sampling of continuous tokens: a next-token model that emits head conditioning + a token head.

:class:`ContinuousARSampler` (registered ``"continuous_ar"``) drives a
:class:`~visar.generators.protocol.NextTokenModel` with ``emits == "condition"`` (the causal "AR" variant of
the MAR paper, :class:`~visar.generators.next_token.continuous.NextTokenContinuousGenerator`):
``model.start(cond, guided)`` prefills the class token and gives ``z`` of token 0; for each token ``i``
the head draws it from ``z`` (:func:`visar.samplers.heads.sample_head`), and ``model.step`` feeds it back
for the ``z`` of token ``i + 1``. ``use_cache=False`` is the reference path: the model's teacher-forced
``forward`` over the whole prefix for every token (same draws).

Guidance iff ``cfg_scale != 1`` (rows ``[cond; null]`` through the transformer, guidance on the head's
noise / velocity), ``constant`` or MAR's linear ramp ``1 + (cfg_scale - 1) (i + 1) / L`` at token ``i``.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from tqdm.auto import tqdm

from visar.conditions import Condition
from visar.generators.components.heads import MODEL_X0_CLIP, check_head_x0_clip, check_x0_clip
from visar.generators.protocol import NextTokenModel
from visar.nn.guidance import is_guided, scheduled
from visar.registry import register
from visar.samplers.base import Sampler
from visar.samplers.compiled import StepCompiler, head_network
from visar.samplers.heads import check_num_steps, sample_head

#: the options and their defaults (``NextTokenContinuousGenerator.sample`` before the sampler existed)
CONTINUOUS_AR_DEFAULTS = dict(cfg_scale=1.0, cfg_schedule="constant", temperature=1.0, num_steps=None,
                              final_noise=False, use_cache=True, progress=False, x0_clip=MODEL_X0_CLIP, compile=False)


def token_cfg(cfg_scale: float, schedule: str, index: int, num_tokens: int) -> float:
    """Guidance scale of image token ``index``: constant, or MAR's linear ramp ``1 + (s - 1)(i + 1) / L``.

    :func:`visar.nn.guidance.ramp` evaluates it as ``((s - 1)(i + 1)) / L``, the order of the earlier
    in-model loop, so samples stay bit for bit.
    """
    return scheduled(cfg_scale, schedule, index + 1, num_tokens)


@register("sampler", "continuous_ar")
class ContinuousARSampler(Sampler):
    """Raster-order continuous-token sampling with a static KV cache.

    Options (defaults reproduce ``NextTokenContinuousGenerator.sample`` before the sampler existed):
        cfg_scale: guidance scale ``>= 0`` (1 = none: no unconditional rows are run).
        cfg_schedule: ``"constant"`` or ``"linear"`` (``1 + (cfg_scale - 1)(i + 1) / L`` at token ``i``).
        temperature: ``> 0``, scales the head's noise.
        num_steps: head denoising steps per token (``None``: the head's ``num_sampling_steps``).
        final_noise: keep the head's last-step noise.
        use_cache: ``False`` recomputes the whole prefix every token (reference path, same draws).
        progress: tqdm bar by token.
        x0_clip: diffusion head's clamp of the predicted clean token: ``"model"`` (the model's setting),
            ``None`` (MAR's sampler) or a number > 0.
        compile: ``torch.compile`` the cached decode step (over the whole cache) and the token head's
            network (one graph each; :mod:`visar.samplers.compiled`); needs ``use_cache``.

    Returns latents ``[B, C, h, w]`` (``model.to_latents``). ``stats``: ``model_passes`` (prefill + one
    step per later token, or one full pass per token without the cache) and ``head_calls`` (one batched
    head chain per token); with ``compile``, ``compile_s`` and ``compiled_graphs``.
    """

    name, protocol, emits, defaults = "continuous_ar", NextTokenModel, "condition", CONTINUOUS_AR_DEFAULTS

    def validate(self, options: dict[str, Any]) -> None:
        check_num_steps(options["num_steps"])
        check_x0_clip(options["x0_clip"], allow_model=True)
        if options["compile"] and not options["use_cache"]:
            raise ValueError("compile=True compiles the cached decode step; it needs use_cache=True")

    @torch.no_grad()
    def run(self, model: Any, cond: Condition, generator: torch.Generator | None, *, cfg_scale: float,
            cfg_schedule: str, temperature: float, num_steps: int | None, final_noise: bool, use_cache: bool,
            progress: bool, x0_clip: Any, compile: bool) -> torch.Tensor:
        check_head_x0_clip(model.head, x0_clip)
        B, L = cond.batch_size, model.num_tokens
        guided = is_guided(cfg_scale)
        param = next(model.parameters())
        compiler = step = None
        if compile:
            if not hasattr(model, "decode_step"):
                raise TypeError(f"compile=True compiles the unchecked decode_step of cached next-token models "
                                f"(CachedTokenSteps); {type(model).__name__} has none: sample with compile=False")
            net = head_network(model.head)
            compiler = StepCompiler(param.device, progress)
            step = compiler.function(model, type(model).decode_step, "decode step")
        out = torch.zeros(B, L, model.token_dim, device=param.device, dtype=param.dtype)
        if use_cache:
            state, z = model.start(cond, guided=guided)  # z [R, D] conditions token 0
            pos = torch.zeros(state.rows, dtype=torch.long, device=z.device)  # reused by the compiled step
        else:
            labels = cond.labels.to(param.device)
            full = Condition.of(torch.cat([labels, torch.full_like(labels, model.num_classes)]) if guided else labels)
        with compiler.patch(net, "forward", "token head network") if compile else contextlib.nullcontext():
            for i in tqdm(range(L), disable=not progress, desc="AR"):
                if not use_cache:
                    prefix = out[:, : i + 1]
                    z = model(torch.cat([prefix, prefix]) if guided else prefix, full)[:, i]
                x = sample_head(model.head, z, num_steps, cfg=token_cfg(cfg_scale, cfg_schedule, i, L),
                                temperature=temperature, generator=generator, final_noise=final_noise, guided=guided,
                                x0_clip=x0_clip)
                out[:, i] = x
                if use_cache and i < L - 1:
                    if step is None:
                        z = model.step(state, x[:, None], i)[:, 0]
                    else:  # the checked step's work, unchecked: both CFG halves get the token
                        fed = x[:, None].repeat(state.rows // B, 1, 1)
                        pos.fill_(i)
                        z = step(state, fed, pos, None)[:, 0]
        self.stats = {"model_passes": L, "head_calls": L}
        if compiler is not None:
            self.stats.update(compiler.stats)
        return model.to_latents(out)


__all__ = ["ContinuousARSampler", "CONTINUOUS_AR_DEFAULTS", "token_cfg"]
