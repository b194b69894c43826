"""The elementwise part of one token-head step (MAR's diffusion head, the flow heads), guidance included.

* :func:`ddpm_step`: from the noise network's output, the Gaussian of one DDPM reverse step. Guided rows
  ``[cond; uncond]`` (``R = 2N``) mix the predicted noise ``eps_u + s (eps_c - eps_u)`` (given to both halves),
  the predicted clean token is ``x0 = a x - b eps`` (MAR: ``a = sqrt(1/abar)``, ``b = sqrt(1/abar - 1)``) or
  ``x0 = (x - b eps) / a`` (``a = sqrt(abar)``, ``b = sqrt(1 - abar)``), optionally clamped to
  ``[-x0_clip, x0_clip]``, the mean ``c1 x0 + c2 x`` and, with a learned variance (MAR), the std
  ``exp(0.5 (f log_beta + (1 - f) log_post_var))`` with ``f = (v + 1) / 2``.
* :func:`flow_step`: one Euler update ``x + dt v`` of the velocity (guided: ``v_u + s (v_c - v_u)``), or the
  Heun corrector ``x + dt (v_prev + v) / 2``.

Coefficients are float32 numbers (a Python float times a float32 tensor is a float32 product in torch, so the
reference equals the heads' former code bit for bit).
"""
from __future__ import annotations

import torch

from visar.ops.cfg import cfg_mix_reference
from visar.ops.dispatch import kernels, use_kernel


def ddpm_step_reference(x: torch.Tensor, out: torch.Tensor, cfg: float | torch.Tensor | None, x_coef: float,
                        eps_coef: float, c1: float, c2: float, x0_clip: float | None = None,
                        log_beta: float | None = None, log_post_var: float | None = None, divide: bool = False,
                        shared_x: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The PyTorch reference of :func:`ddpm_step`."""
    C = x.shape[1]
    eps = out[:, :C]
    if cfg is not None:
        n = out.shape[0] // 2
        half = cfg_mix_reference(eps[:n], eps[n:], cfg)
        eps = torch.cat([half, half], dim=0)
        if shared_x:
            x = torch.cat([x[:n], x[:n]], dim=0)
    if divide:
        x0 = (x - eps_coef * eps) / x_coef
    else:
        x0 = x_coef * x - eps_coef * eps
    if x0_clip is not None:
        x0 = x0.clamp(-x0_clip, x0_clip)
    mean = c1 * x0 + c2 * x
    if log_beta is None:
        return mean, None
    frac = (out[:, C:] + 1) / 2
    logvar = frac * log_beta + (1 - frac) * log_post_var
    return mean, torch.exp(0.5 * logvar)


def _check_cfg(cfg, n: int) -> None:
    if isinstance(cfg, torch.Tensor) and cfg.numel() != 1 and tuple(cfg.shape) != (n, 1):
        raise ValueError(f"a guidance scale tensor must hold one value or one per token ([{n}, 1]), got shape "
                         f"{tuple(cfg.shape)}")


def ddpm_step(x: torch.Tensor, out: torch.Tensor, cfg: float | torch.Tensor | None, x_coef: float, eps_coef: float,
              c1: float, c2: float, x0_clip: float | None = None, log_beta: float | None = None,
              log_post_var: float | None = None, divide: bool = False,
              shared_x: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The mean (and learned std) of one DDPM reverse step.

    Args:
        x: ``[R, C]`` current state (float32).
        out: ``[R, C]`` predicted noise, or ``[R, 2C]`` noise then the variance interpolation ``v`` in
            ``[-1, 1]`` (with ``log_beta``); guided rows are ``[cond; uncond]``.
        cfg: guidance scale (a number, a one-element tensor, or ``[R / 2, 1]`` per token), or ``None`` for
            unguided rows.
        x_coef, eps_coef: the predicted clean token ``x0 = x_coef x - eps_coef eps``, or with ``divide``
            ``(x - eps_coef eps) / x_coef``.
        c1, c2: posterior mean ``c1 x0 + c2 x``.
        x0_clip: clamp ``x0`` to ``[-x0_clip, x0_clip]`` (``None``: no clamp).
        log_beta, log_post_var: learned-range log variance ends (both or neither).
        shared_x: guided: the conditional half's ``x`` serves both halves (else each row's own ``x``).

    Returns:
        ``(mean [R, C], std [R, C] or None)``.
    """
    if x.dim() != 2 or out.dim() != 2 or out.shape[0] != x.shape[0]:
        raise ValueError(f"x must be [R, C] and out [R, C or 2C]; got {tuple(x.shape)} and {tuple(out.shape)}")
    learned = log_beta is not None
    if learned != (log_post_var is not None) or out.shape[1] != (2 if learned else 1) * x.shape[1]:
        raise ValueError(f"out must be [R, 2C] with log_beta and log_post_var (learned variance) or [R, C] without; "
                         f"got out {tuple(out.shape)} for C = {x.shape[1]}")
    if cfg is not None:
        if x.shape[0] % 2:
            raise ValueError(f"guided rows stack [cond; uncond]: an even row count is needed, got {x.shape[0]}")
        _check_cfg(cfg, x.shape[0] // 2)
    args = (x_coef, eps_coef, c1, c2, x0_clip, log_beta, log_post_var, divide, shared_x)
    if not use_kernel(x, out, cfg if isinstance(cfg, torch.Tensor) else None) or x.numel() == 0:
        return ddpm_step_reference(x, out, cfg, *args)
    return kernels("head_step").launch_ddpm(x.contiguous(), out.contiguous(), cfg, *args)


def flow_step_reference(x: torch.Tensor, v: torch.Tensor, dt: float, cfg: float | torch.Tensor | None = None,
                        v_prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch reference of :func:`flow_step`."""
    if cfg is not None:
        vc, vu = v.chunk(2, dim=0)
        v = cfg_mix_reference(vc, vu, cfg)
    if v_prev is not None:
        v = 0.5 * (v_prev + v)
    return x + dt * v, v


def flow_step(x: torch.Tensor, v: torch.Tensor, dt: float, cfg: float | torch.Tensor | None = None,
              v_prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One velocity update ``x + dt v`` of tokens ``x [N, C]``.

    Args:
        x: ``[N, C]``.
        v: the network's velocity, ``[N, C]``, or ``[2N, C]`` ``[cond; uncond]`` with ``cfg``.
        dt: the time step ``t1 - t0``.
        cfg: guidance scale (a number, a one-element tensor, or ``[N, 1]`` per token), ``None`` when unguided.
        v_prev: Heun's corrector: the predictor's (guided) velocity; the update uses ``(v_prev + v) / 2``.

    Returns:
        ``(x_next [N, C], v [N, C])`` with ``v`` the guided (Heun: averaged) velocity used.
    """
    rows = 2 * x.shape[0] if cfg is not None else x.shape[0]
    if x.dim() != 2 or v.shape != (rows, x.shape[1]):
        raise ValueError(f"x must be [N, C] and v [{'2N' if cfg is not None else 'N'}, C]; got {tuple(x.shape)} and "
                         f"{tuple(v.shape)}")
    if v_prev is not None and v_prev.shape != x.shape:
        raise ValueError(f"v_prev must be shaped like x {tuple(x.shape)}, got {tuple(v_prev.shape)}")
    if cfg is not None:
        _check_cfg(cfg, x.shape[0])
    if not use_kernel(x, v, v_prev, cfg if isinstance(cfg, torch.Tensor) else None) or x.numel() == 0:
        return flow_step_reference(x, v, dt, cfg, v_prev)
    return kernels("head_step").launch_flow(x.contiguous(), v.contiguous(), float(dt), cfg,
                                            v_prev.contiguous() if v_prev is not None else None)


__all__ = ["ddpm_step", "ddpm_step_reference", "flow_step", "flow_step_reference"]
