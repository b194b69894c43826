"""xAR's sampler: entity by entity, an Euler-Maruyama SDE (official) or an Euler ODE of the velocity.

Per entity ``k`` of ``E`` (official ``xAR.sample``): ``x ~ N(0, I)`` (float32 draw on the generator's
device, float64 state); for each step of :func:`em_time_grid` a float64 noise ``e`` is drawn *before*
the model call, the model gives ``v`` for all ``R`` rows; score ``s = (-(1 - t) v - x) / t``, drift
``d = v - t s``; guidance ``d = d_u + cfg_k (d_c - d_u)`` with ``cfg_k = 1 + (cfg_scale - 1) k / (E - 1)``;
``x += d dt + sqrt(2 t) sqrt(|dt|) e``, and a last noise-free step to ``t = 0``. The entity's result is
then committed (the clean context of later entities). Entity 0 is never guided (``cfg_k = 1``); the
official sampler still runs its unconditional rows and keeps the conditional drift, here they are skipped
(``velocity(..., cond_only=True)``, 1/8 fewer model rows at 4 entities) unless a ``callback`` traces every row.

``method="ode"`` (not in the official code): Euler steps ``x += v_cfg dt`` of the probability-flow ODE
on ``linspace(1, 0, num_steps + 1)`` with the same guidance ramp on the velocity and the initial draw
as the only noise.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch

from visar.conditions import Condition
from visar.generators.protocol import NextXModel
from visar.nn.guidance import cfg_mix, is_guided, ramp
from visar.registry import register
from visar.samplers.base import Sampler
from visar.samplers.compiled import StepCompiler
from visar.samplers.options import check_choice


def em_time_grid(num_steps: int, t_min: float = 0.04) -> torch.Tensor:
    """xAR's Euler-Maruyama grid ``cat(linspace(1, t_min, n), [0])`` (float64, ``n + 1`` points).

    ``n - 1`` stochastic steps plus a final deterministic step from ``t_min`` to 0: ``n`` model calls
    per entity.
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    return torch.cat([torch.linspace(1, t_min, num_steps, dtype=torch.float64),
                      torch.zeros(1, dtype=torch.float64)])


def time_grid(num_steps: int, method: str) -> list[float]:
    """The flow times of one entity: :func:`em_time_grid` (``"sde"``) or ``linspace(1, 0, n + 1)`` (``"ode"``)."""
    grid = em_time_grid(num_steps).tolist()
    if method == "ode":
        grid = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    return grid


def drift(v: torch.Tensor, x: torch.Tensor, t: float, ode: bool) -> torch.Tensor:
    """float64 drift of ``x`` at flow time ``t`` given the velocity ``v`` (both ``[R, n, C]``): ``v`` itself
    for the ODE (``dx/dt = v = eps - x`` along ``x_t = (1 - t) x + t eps``), else ``v - t s`` with the
    score ``s = (-(1 - t) v - x) / t`` (``0.5 w s`` with ``w = 2 t``)."""
    if ode:
        return v
    score = (-(1 - t) * v - x) / t
    return v - t * score


@register("sampler", "next_x")
class NextXSampler(Sampler):
    """xAR's official sampler (bit for bit), driving a :class:`~visar.generators.protocol.NextXModel`.

    Options:
        num_steps: model calls per entity (integer >= 1; the official code needs >= 3 because of a
            cache bug that visar does not have).
        cfg_scale: guidance at the last entity (>= 0; 1 disables it and runs no unconditional rows).
        method: ``"sde"`` (Euler-Maruyama, official) or ``"ode"`` (Euler).
        use_cache: static KV cache (``False`` runs the whole prefix at every call; same result).
        callback: called after every model call with ``{"entity", "step", "x", "time", "labels", "out"}``
            (the call's input ``[R, n, C]``, flow time, row labels ``[R]``, velocity ``[R, n_k, C]``).
        progress: a tqdm bar over the model calls.
        compile: ``torch.compile`` the transformer call of ``model.velocity`` (two graphs per entity: its
            first call also writes the previous entity into the cache; :mod:`visar.samplers.compiled`).

    Returns ``[B, C, H, W]`` scaled latents in the model's dtype. ``stats``: ``model_passes``; with
    ``compile``, ``compile_s`` and ``compiled_graphs``.
    """

    name = "next_x"
    protocol = NextXModel
    defaults = dict(num_steps=40, cfg_scale=2.7, method="sde", use_cache=True, callback=None, progress=False,
                    compile=False)

    def validate(self, options: dict[str, Any]) -> None:
        check_choice("method", options["method"], ("sde", "ode"))
        em_time_grid(options["num_steps"])
        if options["callback"] is not None and not callable(options["callback"]):
            raise TypeError("callback must be callable or None")

    @torch.no_grad()
    def run(self, model: Any, cond: Condition, generator: torch.Generator | None, *, num_steps: int,
            cfg_scale: float, method: str, use_cache: bool, callback: Callable[[dict], None] | None,
            progress: bool, compile: bool) -> torch.Tensor:
        if compile and not callable(getattr(type(model), "transformer", None)):
            raise TypeError(f"compile=True compiles the transformer call of the velocity (xAR); "
                            f"{type(model).__name__} has no transformer method: sample with compile=False")
        compiler = StepCompiler(next(model.parameters()).device, progress) if compile else None
        with compiler.patch(model, "transformer", "transformer step") if compile else contextlib.nullcontext():
            out = self._sample(model, cond, generator, num_steps, cfg_scale, method, use_cache, callback, progress)
        if compiler is not None:
            self.stats.update(compiler.stats)
        return out

    def _sample(self, model: Any, cond: Condition, generator: torch.Generator | None, num_steps: int,
                cfg_scale: float, method: str, use_cache: bool, callback: Callable[[dict], None] | None,
                progress: bool) -> torch.Tensor:
        """The sampling loop of :meth:`run` (its options, validated)."""
        from tqdm.auto import tqdm

        grid, ode = time_grid(num_steps, method), method == "ode"
        guided = is_guided(cfg_scale)
        state = model.start(cond, guided, use_cache=use_cache)
        dev, B, C = state.device, state.batch, model.in_channels
        sizes = model.partition.sizes
        E = len(sizes)
        noise_dev = generator.device if generator is not None else dev
        self.stats = {"model_passes": 0}
        bar = tqdm(total=E * (len(grid) - 1), disable=not progress, desc="model calls", leave=False)
        finals = []
        for k, n_k in enumerate(sizes):
            x = torch.randn(B, n_k, C, generator=generator, device=noise_dev).to(dev).double()
            cfg_k = ramp(cfg_scale, k, max(E - 1, 1))
            # entity 0 is never guided (cfg_k = 1): the official sampler still runs its unconditional rows and
            # keeps the conditional drift; they are skipped here unless a callback traces every row
            cond_only = guided and k == 0 and callback is None and getattr(model, "velocity_cond_only", False)
            for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
                last = ode or i == len(grid) - 2  # no noise term
                if not last:
                    e = torch.randn(x.shape, generator=generator, device=noise_dev, dtype=torch.float64).to(dev)
                v = model.velocity(state, x, t_cur, k, i == 0, cond_only=True) if cond_only else \
                    model.velocity(state, x, t_cur, k, i == 0)
                self.stats["model_passes"] += 1
                bar.update()
                if callback is not None:
                    callback({"entity": k, "step": i, "x": state.inputs, "time": t_cur, "labels": state.labels,
                              "out": v})
                d = drift(v.double(), torch.cat([x, x]) if guided and not cond_only else x, t_cur, ode)  # float64
                if guided and not cond_only:
                    d_c, d_u = d.chunk(2)
                    d = cfg_mix(d_c, d_u, cfg_k)
                dt = t_next - t_cur
                x = x + d * dt if last else x + d * dt + math.sqrt(2 * t_cur) * math.sqrt(abs(dt)) * e
            model.commit(state, k, x)
            finals.append(x)
        bar.close()
        return model.to_latents(torch.cat(finals, dim=1))


__all__ = ["NextXSampler", "em_time_grid", "time_grid", "drift"]
