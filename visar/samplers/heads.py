"""Drive a token head's denoising chain: start noise, one head step at a time, the last step's Gaussian.

Token heads (:mod:`visar.generators.components.heads`) expose one step: :meth:`DiffusionHead.step_gaussian` (a reverse
step's Gaussian) and :meth:`FlowHead.solver_step` (one ODE step). This module owns the loop and every
random draw, in MAR's official order (``N`` tokens of ``C`` channels, ``R = 2N`` rows when guided):

1. the starting noise ``[N, C]`` (one row per token, shared by both guidance halves) is drawn first;
2. diffusion: one full-batch draw ``[R, C]`` per step, including the last one, where the official sampler
   multiplies it by zero (``final_noise=True`` keeps it); ``temperature`` scales the per-step noise only;
3. flow: the ODE is deterministic and ``temperature`` scales the starting noise; the last step's Gaussian
   ``N(endpoint, (final_std * temperature)^2)`` is drawn only with ``final_noise`` and ``final_std > 0``.

:func:`sample_head` is the whole chain. Continuous speculative decoding (``docs/design/samplers.md`` §2) needs
its pieces: :func:`head_start_noise` (shared start noise), :func:`run_chain` (the chain stopped before its
last draw: the state entering the last step and that step's Gaussian, a :class:`ChainTail`) and
:func:`finish_chain` (the last draw), with :class:`~visar.generators.components.heads.HeadNoise` to replay a trajectory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from visar.generators.components.heads import (MODEL_X0_CLIP, HeadNoise, HeadSample, check_head_x0_clip, randn_as,
                                    split_guided)


def check_num_steps(value: Any) -> int | None:
    """The ``num_steps`` sampling option: ``None`` (the head's default) or an integer >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"num_steps (denoising steps of the token head per token; formerly num_sampling_steps) "
                         f"must be an integer >= 1 or None for the head's default, got {value!r}")
    return value


@dataclass(frozen=True)
class ChainArgs:
    """Validated arguments of one chain: ``steps``, ``guided``, ``n`` tokens, the resolved ``x0_clip``."""

    steps: int
    guided: bool
    n: int
    x0_clip: float | None


@dataclass
class ChainTail:
    """A head chain stopped before its last random draw.

    Attributes:
        state: what the last step starts from: diffusion ``[R, C]``, the state at respaced index 0 (both
            guidance halves equal); flow ``[N, C]``, the ODE endpoint.
        mean: ``[R or N, C]`` mean of the last step's Gaussian.
        step_std: ``[R or N, C]`` its std before ``noise_scale``.
        noise_scale: the last draw is ``mean + keep * step_std * e * noise_scale`` (diffusion: the
            temperature; flow: 1, its temperature is inside ``step_std = final_std * temperature``).
        n: ``N``, the token rows (the first ``N`` rows of ``mean``).
        guided: rows are ``[cond; uncond]``.
        path_log_std: ``[R or N, C]`` sum of ``log`` of the un-tempered std of every step before the last
            (diffusion; zeros for flow), only when :func:`run_chain` ran with ``trace_std=True``, else
            ``None`` (the relaxed acceptance of continuous speculative decoding uses it).
    """

    state: torch.Tensor
    mean: torch.Tensor
    step_std: torch.Tensor
    noise_scale: float
    n: int
    guided: bool
    path_log_std: torch.Tensor | None = None

    @property
    def std(self) -> torch.Tensor:
        """``[R or N, C]`` std of the last step's Gaussian, temperature included."""
        return self.step_std * self.noise_scale

    def draw(self, e: torch.Tensor, keep: float = 1.0) -> torch.Tensor:
        """``mean + keep * step_std * e * noise_scale`` for noise ``e`` shaped like ``mean`` (all rows)."""
        return self.mean + keep * self.step_std * e * self.noise_scale

    def density(self, tokens: torch.Tensor) -> HeadSample:
        """:class:`HeadSample` of ``tokens [N, C]`` with the last step's Gaussian (token rows only)."""
        return HeadSample(tokens, self.mean[:self.n], self.std[:self.n])


def check_chain(head: Any, z: torch.Tensor, steps: int | None = None, temperature: float = 1.0,
                cfg: float | torch.Tensor = 1.0, guided: bool | None = None, x0_clip: Any = MODEL_X0_CLIP,
                noise: HeadNoise | None = None) -> ChainArgs:
    """Validate one chain's arguments (see :func:`sample_head`) before anything is drawn."""
    if head.kind not in ("diffusion", "flow"):
        raise TypeError(f"unknown token head kind {head.kind!r} of {type(head).__name__}; 'diffusion' or 'flow'")
    steps = head.resolve_steps(steps, temperature)
    check_head_x0_clip(head, x0_clip)
    clip = head.resolve_x0_clip(x0_clip) if head.kind == "diffusion" else None
    g, n = split_guided(z, cfg, guided)
    C = head.token_dim
    if noise is not None and head.kind == "diffusion" and (
            noise.start.shape != (n, C) or noise.steps.shape != (steps, n, C)):
        raise ValueError(f"noise must hold start [{n}, {C}] and steps [{steps}, {n}, {C}]; got "
                         f"{tuple(noise.start.shape)} and {tuple(noise.steps.shape)}")
    return ChainArgs(steps, g, n, clip)


def head_start_noise(head: Any, n: int, like: torch.Tensor, generator: torch.Generator | None = None,
                     noise: HeadNoise | None = None) -> torch.Tensor:
    """The chain's starting noise ``[n, C]`` (un-tempered, one row per token) on ``like``'s device and
    dtype: ``noise.start`` if given, else one draw from ``generator``."""
    if noise is not None:
        return noise.start.to(like)
    return randn_as((n, head.token_dim), like, generator)


def _step_noise(k: int, x: torch.Tensor, guided: bool, generator: torch.Generator | None,
                noise: HeadNoise | None) -> torch.Tensor:
    """Noise ``[R, C]`` of diffusion step ``k`` (0 = noisiest, -1 = last): ``noise.steps[k]`` for both
    halves, or a full-batch draw."""
    if noise is not None:
        e = noise.steps[k].to(x)
        return torch.cat([e, e], dim=0) if guided else e
    return randn_as(x.shape, x, generator)


def _run(head: Any, z: torch.Tensor, start: torch.Tensor, a: ChainArgs, cfg, temperature: float,
         generator: torch.Generator | None, noise: HeadNoise | None, trace_std: bool = False) -> ChainTail:
    if head.kind == "flow":
        x = start * temperature
        ts = head.time_grid(a.steps)
        for k in range(a.steps):
            x = head.solver_step(x, ts[k], ts[k + 1], z, cfg, a.guided)
        std = torch.full_like(x, head.final_std * temperature)
        return ChainTail(x, x, std, 1.0, a.n, a.guided, torch.zeros_like(x) if trace_std else None)
    x = torch.cat([start, start], dim=0) if a.guided else start
    path = torch.zeros_like(x) if trace_std else None
    sch = head.schedule(a.steps)  # arguments were checked once by check_chain
    for k, i in enumerate(range(a.steps - 1, 0, -1)):
        mean, std = head.reverse_gaussian(sch, x, i, z, cfg, a.guided, a.x0_clip)
        if trace_std:
            path = path + std.log()
        x = mean + 1.0 * std * _step_noise(k, x, a.guided, generator, noise) * temperature
    mean, std = head.reverse_gaussian(sch, x, 0, z, cfg, a.guided, a.x0_clip)
    return ChainTail(x, mean, std, temperature, a.n, a.guided, path)


@torch.no_grad()
def run_chain(head: Any, z: torch.Tensor, start: torch.Tensor, steps: int | None = None,
              cfg: float | torch.Tensor = 1.0, temperature: float = 1.0, generator: torch.Generator | None = None,
              noise: HeadNoise | None = None, guided: bool | None = None,
              x0_clip: Any = MODEL_X0_CLIP, trace_std: bool = False) -> ChainTail:
    """Run the chain from ``start [N, C]`` (:func:`head_start_noise`) up to its last random draw.

    Diffusion: every reverse step but the last (each with its noise draw), then the last step's Gaussian;
    flow: every ODE step, then the Gaussian ``N(endpoint, (final_std * temperature)^2)``. Arguments as
    :func:`sample_head`; ``cfg`` may also be a per-token ``[N, 1]`` tensor (a schedule evaluated at each
    token's own position); ``trace_std`` fills :attr:`ChainTail.path_log_std`. Returns a :class:`ChainTail`;
    :func:`finish_chain` makes the tokens.
    """
    a = check_chain(head, z, steps, temperature, cfg, guided, x0_clip, noise)
    return _run(head, z, start, a, cfg, temperature, generator, noise, trace_std)


@torch.no_grad()
def finish_chain(head: Any, tail: ChainTail, generator: torch.Generator | None = None, final_noise: bool = False,
                 noise: HeadNoise | None = None) -> torch.Tensor:
    """The last draw of a chain: tokens ``[N, C]``.

    Diffusion always draws the last step's noise (``[R, C]``, official stream) and keeps it only with
    ``final_noise``; flow draws only with ``final_noise`` and ``final_std > 0`` (else the endpoint).
    """
    if head.kind == "diffusion":
        e = _step_noise(-1, tail.state, tail.guided, generator, noise)  # the last step's noise
        return tail.draw(e, 1.0 if final_noise else 0.0)[:tail.n]
    if final_noise and head.final_std > 0:
        e = noise.steps[-1].to(tail.mean) if noise is not None else randn_as(tail.mean.shape, tail.mean, generator)
        return tail.draw(e)
    return tail.mean


@torch.no_grad()
def sample_head(head: Any, z: torch.Tensor, steps: int | None = None, cfg: float | torch.Tensor = 1.0,
                temperature: float = 1.0, generator: torch.Generator | None = None, final_noise: bool = False,
                return_density: bool = False, noise: HeadNoise | None = None, guided: bool | None = None,
                x0_clip: Any = MODEL_X0_CLIP) -> torch.Tensor | HeadSample:
    """Draw one token per conditioning row with a token head (the whole chain).

    Args:
        head: a :class:`~visar.generators.protocol.TokenHead` (``DiffusionHead`` or ``FlowHead``).
        z: ``[N, D]``, or ``[2N, D]`` = ``[cond; uncond]`` when guided.
        steps: head steps (default ``head.num_sampling_steps``; the diffusion head needs >= 2).
        cfg: guidance scale on the predicted noise / velocity (a float or a one-element tensor); 1 = none.
        temperature: > 0; scales the per-step noise (diffusion) or the starting noise (flow).
        generator: source of every random draw (order: module docstring).
        final_noise: keep the last step's noise (the official sampler drops it).
        return_density: return a :class:`HeadSample` with the last step's Gaussian.
        noise: explicit randomness (:class:`HeadNoise`: ``start [N, C]``, ``steps [S, N, C]``); ``generator``
            is then unused.
        guided: force the row layout (default: guided iff ``cfg != 1``).
        x0_clip: diffusion head: ``"model"`` (default, the head's setting), ``None`` (no clipping, the
            official sampler) or a number > 0 (clamp the predicted clean token); a flow head takes no number.

    Returns:
        tokens ``[N, C]`` (the conditional half under guidance), or a :class:`HeadSample`.
    """
    a = check_chain(head, z, steps, temperature, cfg, guided, x0_clip, noise)
    start = head_start_noise(head, a.n, z, generator, noise)
    tail = _run(head, z, start, a, cfg, temperature, generator, noise)
    tokens = finish_chain(head, tail, generator, final_noise, noise)
    return tail.density(tokens) if return_density else tokens


__all__ = ["sample_head", "run_chain", "finish_chain", "head_start_noise", "check_chain", "check_num_steps",
           "ChainArgs", "ChainTail"]
