"""A diffusion token head built from any noise predictor ``eps(x_t, abar_t, cond)`` and a schedule.

:class:`EpsilonHead` speaks the ``"diffusion"`` :class:`~visar.generators.protocol.TokenHead` protocol
(:meth:`EpsilonHead.step_gaussian`), so :func:`visar.samplers.heads.sample_head` and every sampler that
drives a token head (``continuous_ar``, ``masked``, ``cspd``) can run a model whose head is a plain
function: an exact denoiser of a known law (:func:`gaussian_mixture_eps`), another library's network, or a
test double. DDPM reverse steps (Ho et al. 2020, eq. 11-12; Nichol & Dhariwal 2021, eq. 10-11):

* forward process ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) e``; ``abar`` comes from a base table of
  ``T`` steps (MAR's cosine schedule by default), respaced to ``S`` sampling steps with the rounding of
  :func:`~visar.generators.components.diffusion_schedule.space_timesteps`;
* step ``i`` (``S - 1`` down to 0): ``x0 = (x - sqrt(1 - abar_i) eps) / sqrt(abar_i)`` (optionally
  clamped), mean ``c1_i x0 + c2_i x`` (the posterior ``q(x_{i-1} | x_i, x0)``), std ``sqrt(posterior
  variance)`` (``variance="posterior"``, clipped at step 0 to step 1's value as ADM does) or ``sqrt(beta_i)``
  (``variance="beta"``); ``final_std`` replaces the std of the last step (0 makes it noise-free, which
  continuous speculative decoding refuses);
* guidance on the noise prediction: ``eps_u + s (eps_c - eps_u)``, the conditional half's ``x`` for both
  halves (MAR's convention), ``s`` a float or a per-token ``[N, 1]`` tensor.
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from torch import nn

from visar.generators.components.diffusion_schedule import cosine_betas, space_timesteps
from visar.generators.components.heads import MODEL_X0_CLIP, ReverseStepHead, check_x0_clip
from visar.ops.head_step import ddpm_step

#: ``eps(x_t [N, C], abar_t [N, 1], cond [N, D]) -> [N, C]``
EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RespacedTables:
    """Float64 tables of ``S`` respaced steps of a base ``abar`` table (index 0 = the last, least noisy step).

    Attributes:
        abar, abar_prev, betas, posterior_variance, coef1, coef2: ``np.ndarray [S]``.
    """

    def __init__(self, base_abar: np.ndarray, steps: int):
        keep = space_timesteps(len(base_abar), steps)
        self.abar = base_abar[keep]
        self.abar_prev = np.append(1.0, self.abar[:-1])
        self.betas = 1.0 - self.abar / self.abar_prev
        self.posterior_variance = self.betas * (1.0 - self.abar_prev) / (1.0 - self.abar)
        self.coef1 = self.betas * np.sqrt(self.abar_prev) / (1.0 - self.abar)
        self.coef2 = (1.0 - self.abar_prev) * np.sqrt(1.0 - self.betas) / (1.0 - self.abar)


class EpsilonHead(ReverseStepHead, nn.Module):
    """A ``"diffusion"`` token head from a noise predictor (see the module docstring for the maths).

    Args:
        eps: ``eps(x_t [N, C], abar_t [N, 1], cond [N, D]) -> [N, C]``, the predicted noise (an
            ``nn.Module`` becomes a submodule); called once per reverse step, on ``2N`` rows
            ``[cond; uncond]`` when guided.
        token_dim: ``C``.
        num_sampling_steps: default respaced step count ``S >= 2``.
        alphas_cumprod: base table ``abar_t`` of ``T`` training steps, decreasing in ``(0, 1)``; ``None``:
            MAR's cosine schedule with ``num_train_steps`` steps.
        num_train_steps: ``T`` of the cosine schedule (ignored with ``alphas_cumprod``).
        variance: ``"posterior"`` (DDPM's small variance) or ``"beta"`` (``sigma_t^2 = beta_t``).
        final_std: std of the last reverse step instead of the schedule's (``None``); must be ``>= 0``.
        x0_clip: default clamp of the predicted clean token (``None`` = none), as ``DiffusionHead``.
    """

    kind: ClassVar[str] = "diffusion"

    def __init__(self, eps: EpsFn, token_dim: int, num_sampling_steps: int = 20,
                 alphas_cumprod: Sequence[float] | torch.Tensor | np.ndarray | None = None,
                 num_train_steps: int = 1000, variance: str = "posterior", final_std: float | None = None,
                 x0_clip: float | None = None):
        super().__init__()
        if not callable(eps):
            raise TypeError(f"eps must be a callable eps(x_t, abar_t, cond) -> noise, got {type(eps).__name__}")
        if variance not in ("posterior", "beta"):
            raise ValueError(f"variance must be 'posterior' or 'beta', got {variance!r}")
        if final_std is not None and not (isinstance(final_std, (int, float)) and math.isfinite(final_std)
                                          and final_std >= 0):
            raise ValueError(f"final_std must be a finite number >= 0 or None (the schedule's), got {final_std!r}")
        if alphas_cumprod is None:
            base = np.cumprod(1.0 - cosine_betas(num_train_steps))
        else:
            base = np.asarray(torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu(), dtype=np.float64)
            if base.ndim != 1 or len(base) < 2 or not ((base > 0) & (base < 1)).all() or (np.diff(base) >= 0).any():
                raise ValueError("alphas_cumprod must be a 1-D table of at least 2 values in (0, 1), strictly "
                                 "decreasing (abar_t of the forward process)")
        check_x0_clip(x0_clip)
        self.eps = eps
        self.base_abar = base
        self.token_dim, self.num_train_steps = int(token_dim), len(base)
        self.variance, self.x0_clip = variance, None if x0_clip is None else float(x0_clip)
        self.final_std = None if final_std is None else float(final_std)
        self.num_sampling_steps = self.resolve_steps(num_sampling_steps)
        self._tables: dict[int, RespacedTables] = {}

    def resolve_steps(self, steps: int | None = None, temperature: float = 1.0) -> int:
        """The respaced step count (``None``: ``num_sampling_steps``): an integer in ``[2, T]``; ``temperature > 0``."""
        steps = getattr(self, "num_sampling_steps", None) if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= self.num_train_steps:
            raise ValueError(f"the number of head sampling steps must be an integer in [2, {self.num_train_steps}], "
                             f"got {steps!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        return steps

    def resolve_x0_clip(self, x0_clip: Any = MODEL_X0_CLIP) -> float | None:
        """``"model"`` -> the head's ``x0_clip``; ``None`` or a number > 0 as given."""
        check_x0_clip(x0_clip, allow_model=True)
        if isinstance(x0_clip, str):
            return self.x0_clip
        return None if x0_clip is None else float(x0_clip)

    def tables(self, steps: int) -> RespacedTables:
        """The respaced tables of ``steps`` sampling steps (cached)."""
        if steps not in self._tables:
            self._tables[steps] = RespacedTables(self.base_abar, steps)
        return self._tables[steps]

    def step_std(self, index: int, steps: int) -> float:
        """Un-tempered std of respaced step ``index`` (0 = the last step)."""
        t = self.tables(steps)
        if index == 0 and self.final_std is not None:
            return self.final_std
        if self.variance == "beta":
            return math.sqrt(t.betas[index])
        return math.sqrt(t.posterior_variance[max(index, 1)])  # ADM's clip: step 0 takes step 1's variance

    @torch.no_grad()
    def schedule(self, steps: int) -> RespacedTables:
        """The respaced tables of ``steps`` sampling steps (the head chain resolves them once)."""
        return self.tables(steps)

    def reverse_gaussian(self, t: RespacedTables, x: torch.Tensor, index: int, z: torch.Tensor, cfg, g: bool,
                         clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`step_gaussian` on resolved arguments, unchecked (the chain's hot loop). The guidance mix and the
        posterior mean are :func:`visar.ops.ddpm_step` (one kernel on CUDA)."""
        n = x.shape[0] // 2 if g else x.shape[0]
        abar = float(t.abar[index])
        if g:
            half = x[:n]
            e = self.eps(torch.cat([half, half]), torch.full((2 * n, 1), abar, dtype=x.dtype, device=x.device), z)
        else:
            e = self.eps(x, torch.full((x.shape[0], 1), abar, dtype=x.dtype, device=x.device), z)
        if e.shape != x.shape:
            raise ValueError(f"eps returned {tuple(e.shape)} for x_t {tuple(x.shape)}; it must predict one noise "
                             f"vector per row")
        # x0 = (x - sqrt(1 - abar) e) / sqrt(abar), clamped; mean = coef1 x0 + coef2 x (guided: x = [half; half])
        mean, _ = ddpm_step(x, e, cfg if g else None, math.sqrt(abar), math.sqrt(1.0 - abar), float(t.coef1[index]),
                            float(t.coef2[index]), clip, divide=True, shared_x=True)
        return mean, torch.full_like(mean, self.step_std(index, len(t.abar)))


def gaussian_mixture_eps(x_t: torch.Tensor, abar_t: torch.Tensor | float, logits: torch.Tensor, means: torch.Tensor,
                         stds: torch.Tensor) -> torch.Tensor:
    """The exact noise prediction ``E[e | x_t]`` of a Gaussian mixture under the DDPM forward process.

    With ``x_0 ~ sum_k w_k N(mu_k, s_k^2 I)``, ``x_t`` is the mixture ``sum_k w_k N(sqrt(a) mu_k, v_k I)``,
    ``v_k = a s_k^2 + 1 - a``, and ``E[e | x_t] = -sqrt(1 - a) grad log p_t(x_t) = sqrt(1 - a) sum_k r_k(x_t)
    (x_t - sqrt(a) mu_k) / v_k`` with responsibilities ``r_k`` (computed in log space, float64).

    Args:
        x_t: ``[N, C]``.
        abar_t: ``[N, 1]`` (or a float) in ``(0, 1]``.
        logits: ``[N, K]`` unnormalised log-weights of the components.
        means: ``[N, K, C]``.
        stds: ``[N, K]`` isotropic component stds ``> 0``.

    Returns:
        ``[N, C]`` in ``x_t``'s dtype.
    """
    x = x_t.double()[:, None, :]  # [N, 1, C]
    a = torch.as_tensor(abar_t, dtype=torch.float64, device=x_t.device).reshape(-1, 1, 1)
    mu = torch.sqrt(a) * means.double()  # [N, K, C]
    v = a[..., 0] * stds.double() ** 2 + 1.0 - a[..., 0]  # [N, K]
    d = x - mu
    logp = torch.log_softmax(logits.double(), -1) - 0.5 * (d ** 2).sum(-1) / v - 0.5 * x_t.shape[1] * torch.log(v)
    r = torch.softmax(logp, -1)  # [N, K]
    e = torch.sqrt(1.0 - a[..., 0]) * ((r / v)[..., None] * d).sum(1)
    return e.to(x_t.dtype)


__all__ = ["EpsilonHead", "RespacedTables", "gaussian_mixture_eps", "EpsFn"]
