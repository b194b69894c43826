"""FlowAR's sampler: scale by scale, the AR transformer gives ``z``, then an Euler ODE of the flow head.

Per scale ``k`` of ``K`` (official ``FlowAR.sample``):

1. ``z = model.step(state, k)`` for all ``R`` rows (``[cond; null]`` when guided);
2. noise ``[R, s_k^2, C]`` is drawn on the generator's device (a CPU generator also drives a CUDA
   model, as the official sampler does), then moved to the model;
3. Euler steps on :func:`euler_time_grid` from ``t = 1`` (noise) to ``t = 0``, float64 state, head
   calls in the model's dtype. Guidance ``cfg_k = 1 + (cfg_scale - 1) k / (K - 1)`` (a linear ramp over
   scales; ``cfg_schedule="constant"``, not in the official code, uses ``cfg_scale`` at every scale)
   applies while ``guidance_low <= t <= guidance_high``: the head then sees the conditional half twice
   (``[x_c; x_c]`` with the conditional and unconditional ``z``) and both halves move by
   ``d_u + cfg_k (d_c - d_u)``; outside the interval (and where ``cfg_k == 1``) each half moves on
   its own velocity;
4. the conditional half's result becomes the next scale's input (``model.set_next_input``).

Guidance runs iff ``cfg_scale != 1`` (the shared rule; the official code guides only for ``> 1`` and
fails at 1: identical for ``cfg_scale > 1``, and ``cfg_scale < 1`` now weakens the condition).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from visar.conditions import Condition
from visar.generators.protocol import NextScaleModel
from visar.nn.guidance import cfg_mix, is_guided, scheduled
from visar.registry import register
from visar.samplers.base import Sampler
from visar.samplers.compiled import StepCompiler


def euler_time_grid(num_steps: int) -> torch.Tensor:
    """FlowAR's Euler time grid (float64, from 1 = noise down to 0 = data).

    ``cat(linspace(1, 0.3, n // 2), linspace(0.25, 0, n // 2 + 1))`` -- for ``n = 25`` that is 25
    points, i.e. 24 Euler steps -- except ``n = 50``, which the official sampler special-cases to
    ``linspace(1, 0, 51)``.
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2 (FlowAR's grid has n//2 + n//2 + 1 points), "
                         f"got {num_steps!r}")
    if num_steps == 50:
        return torch.linspace(1, 0, 51, dtype=torch.float64)
    half = num_steps // 2
    return torch.cat([torch.linspace(1, 0.3, half, dtype=torch.float64),
                      torch.linspace(0.25, 0, half + 1, dtype=torch.float64)])


def euler_scale(model: Any, noise: torch.Tensor, z: torch.Tensor, grid: list[float], cfg: float, guided: bool,
                low: float, high: float, on_step: Callable[[], None] | None = None,
                velocity: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """Euler ODE of one scale from ``grid[0]`` to ``grid[-1]``; float64 state, head calls in ``z``'s dtype.

    Args:
        noise: ``[R, n, C]`` start (rows ``[cond; uncond]`` when ``guided``); z: ``[R, n, D]``.
        cfg: this scale's guidance; applied while ``low <= t <= high`` and ``cfg != 1``.
        on_step: called after every step (progress bars, counters).
        velocity: the head call ``(x, t, z) -> [R, n, C]`` (default ``model.head_velocity``; the compiled
            one with ``compile=True``).
    Returns:
        the float64 final state of all rows ``[R, n, C]``.
    """
    velocity = model.head_velocity if velocity is None else velocity
    x = noise.to(torch.float64)
    B = x.shape[0] // 2
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        in_interval = guided and is_guided(cfg) and low <= t_cur <= high
        # inside the interval the head sees the conditional half twice; the state keeps both halves
        x_model = torch.cat([x[:B], x[:B]]) if in_interval else x
        t = torch.full((x.shape[0],), t_cur, dtype=torch.float64, device=x.device).float()
        d = velocity(x_model, t, z).double()  # model in its dtype, the rest in float64
        if in_interval:
            d_c, d_u = d.chunk(2)
            d = cfg_mix(d_c, d_u, cfg)
            d = torch.cat([d, d])
        x = x + (t_next - t_cur) * d
        if on_step is not None:
            on_step()
    return x


@register("sampler", "next_scale_flow")
class NextScaleFlowSampler(Sampler):
    """FlowAR's official sampler (bit for bit), driving a :class:`~visar.generators.protocol.NextScaleModel`
    that emits ``z`` for a flow head (``start``, ``step``, ``head_velocity``, ``set_next_input``, ``to_latents``).

    Options:
        num_steps: Euler grid size (:func:`euler_time_grid`, integer >= 2; 25 gives 24 steps, 50 gives 50).
        cfg_scale: guidance at the finest scale (>= 0; 1 disables it and runs no unconditional rows).
        cfg_schedule: ``"linear"`` (official: ``cfg_k = 1 + (cfg_scale - 1) k / (K - 1)`` at scale ``k`` of
            ``K``, so the first scale is unguided) or ``"constant"`` (``cfg_scale`` at every scale).
        guidance_low, guidance_high: guidance applies while ``guidance_low <= t <= guidance_high``
            (``0 <= low <= high <= 1``).
        use_cache: static KV cache over scales (``False`` re-runs the whole prefix per scale; same result).
        callback: called after each scale with ``{"scale", "latents", "condition", "out", "cfg_scale"}``
            (noise ``[R, n, C]``, ``z [R, n, D]``, float64 final state of all rows, ``cfg_k``).
        progress: a tqdm bar over the Euler steps of all scales.
        compile: ``torch.compile`` the flow head's velocity (one graph per scale;
            :mod:`visar.samplers.compiled`).

    Returns ``[B, C, S, S]`` scaled latents in the model's dtype. ``stats``: ``model_passes`` (transformer
    calls, one per scale) and ``head_passes`` (flow-head calls); with ``compile``, ``compile_s`` and
    ``compiled_graphs``.
    """

    name = "next_scale_flow"
    protocol = NextScaleModel
    emits = "condition"
    defaults = dict(num_steps=25, cfg_scale=4.3, cfg_schedule="linear", guidance_high=0.9, guidance_low=0.0,
                    use_cache=True, callback=None, progress=False, compile=False)

    def validate(self, options: dict[str, Any]) -> None:
        euler_time_grid(options["num_steps"])
        low, high = options["guidance_low"], options["guidance_high"]
        if not (0.0 <= low <= high <= 1.0):
            raise ValueError(f"need 0 <= guidance_low <= guidance_high <= 1, got {low}, {high}")
        if options["callback"] is not None and not callable(options["callback"]):
            raise TypeError("callback must be callable or None")

    def check_model(self, model: Any) -> None:
        super().check_model(model)
        if not hasattr(model, "head_velocity"):
            raise TypeError(f"the {self.name!r} sampler drives next-scale models with a flow head (FlowAR); "
                            f"{type(model).__name__} emits {getattr(model, 'emits', '?')!r}")

    @torch.no_grad()
    def run(self, model: Any, cond: Condition, generator: torch.Generator | None, *, num_steps: int,
            cfg_scale: float, cfg_schedule: str, guidance_high: float, guidance_low: float, use_cache: bool,
            callback: Callable[[dict], None] | None, progress: bool, compile: bool) -> torch.Tensor:
        from tqdm.auto import tqdm

        grid = euler_time_grid(num_steps).tolist()
        guided = is_guided(cfg_scale)
        compiler = StepCompiler(next(model.parameters()).device, progress) if compile else None
        velocity = compiler.function(model, type(model).head_velocity, "flow head step") if compile else None
        state = model.start(cond, guided, use_cache=use_cache)
        dev, R, C, K = state.device, state.rows, model.in_channels, len(model.scales)
        noise_dev = generator.device if generator is not None else dev
        self.stats = {"model_passes": 0, "head_passes": 0}
        bar = tqdm(total=K * (len(grid) - 1), disable=not progress, desc="euler steps", leave=False)

        def on_step() -> None:
            self.stats["head_passes"] += 1
            bar.update()

        out_rows = None
        for k, s in enumerate(model.scales):
            z = model.step(state, k)
            self.stats["model_passes"] += 1
            noise = torch.randn(R, s * s, C, generator=generator, device=noise_dev).to(dev)
            cfg_k = scheduled(cfg_scale, cfg_schedule, k, max(K - 1, 1))
            out_rows = euler_scale(model, noise, z, grid, cfg_k, guided, guidance_low, guidance_high, on_step,
                                   velocity)
            if callback is not None:
                callback({"scale": k, "latents": noise, "condition": z, "out": out_rows, "cfg_scale": cfg_k})
            if k + 1 < K:
                model.set_next_input(state, k, out_rows[:state.batch])
        bar.close()
        if compiler is not None:
            self.stats.update(compiler.stats)
        return model.to_latents(out_rows[:state.batch])


__all__ = ["NextScaleFlowSampler", "euler_time_grid", "euler_scale"]
