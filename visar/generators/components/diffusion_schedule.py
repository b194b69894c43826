"""The Gaussian-diffusion tables of MAR's DiffLoss head (improved-DDPM conventions, float64).

* Cosine schedule (Nichol & Dhariwal 2021, eq. 17): ``abar(t) = cos((t + s) / (1 + s) * pi / 2)^2`` with
  ``s = 0.008``; ``beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999)``, ``T = 1000``.
* Respacing to ``S`` steps ("section counts" with one section): positions ``round(k * (T-1)/(S-1))``
  accumulated in floating point and rounded half-to-even (Python's ``round``); respaced
  ``beta_k = 1 - abar[t_k] / abar[t_{k-1}]``. ``timestep_map`` lists the kept original timesteps, which
  is what the network is fed.
* Posterior ``q(x_{t-1} | x_t, x_0)`` coefficients and the clipped log-variance
  (``log(append(post_var[1], post_var[1:]))``).

All tables are NumPy float64 (the official code computes them so); :meth:`DiffusionSchedule.at` extracts
a value as float32, as the official ``_extract_into_tensor`` does, which bit-exact parity needs.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

#: the tables one reverse step of the learned-variance head reads (:meth:`DiffusionSchedule.coefficients`)
STEP_TABLES = ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1",
               "posterior_mean_coef2", "log_betas", "posterior_log_variance_clipped")

TABLES = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_recip_alphas_cumprod",
          "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
          "posterior_mean_coef1", "posterior_mean_coef2")


def cosine_betas(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved-DDPM cosine betas ``[num_steps]`` (float64)."""
    def abar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    return np.array([min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), max_beta)
                     for i in range(num_steps)], dtype=np.float64)


def linear_betas(num_steps: int = 1000) -> np.ndarray:
    """DDPM's linear betas ``[num_steps]`` (float64): ``1e-4`` to ``0.02`` for 1000 steps, both ends scaled by
    ``1000 / num_steps`` (ADM's ``"linear"`` schedule)."""
    scale = 1000 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


#: base noise schedules of the diffusion head: ``"cosine"`` (MAR, the default) and ``"linear"`` (a visar option)
NOISE_SCHEDULES = ("cosine", "linear")


def check_noise_schedule(noise_schedule) -> str:
    """``noise_schedule`` must be one of :data:`NOISE_SCHEDULES`, else ``ValueError``."""
    if not isinstance(noise_schedule, str) or noise_schedule not in NOISE_SCHEDULES:
        raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES} ('cosine' is MAR's; 'linear' trains on a "
                         f"CPU budget, docs/continuous.md), got {noise_schedule!r}")
    return noise_schedule


def base_betas(noise_schedule: str = "cosine", num_steps: int = 1000) -> np.ndarray:
    """Betas ``[num_steps]`` (float64) of a named schedule (:data:`NOISE_SCHEDULES`).

    ``"cosine"`` clips its last beta at 0.999, so ``abar`` ends at 2.4e-9 (1000 steps) and the first reverse step
    of a respaced chain multiplies an error of the predicted noise by ``sqrt(abar_prev / abar_T)`` (1327 at 25
    steps, 316 at 100, 126 at 250); ``"linear"`` ends at 4.0e-5, a factor 1.5 / 1.1 / 1.04.
    """
    check_noise_schedule(noise_schedule)
    return cosine_betas(num_steps) if noise_schedule == "cosine" else linear_betas(num_steps)


def space_timesteps(num_steps: int, count: int) -> list[int]:
    """Kept timesteps (sorted) when respacing ``num_steps`` to ``count`` steps, official rounding."""
    if not 1 <= count <= num_steps:
        raise ValueError(f"the number of diffusion sampling steps must be in [1, {num_steps}], got {count}")
    stride = (num_steps - 1) / (count - 1) if count > 1 else 1
    cur, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken))


class DiffusionSchedule:
    """Tables of a (possibly respaced) cosine (or linear) diffusion.

    Args:
        num_train_steps: ``T`` of the base schedule (1000 in MAR).
        num_steps: respaced length ``S`` (``None`` = no respacing, the training schedule).
        noise_schedule: ``"cosine"`` (MAR) or ``"linear"`` (:func:`base_betas`).

    Attributes:
        timestep_map: ``LongTensor [S]`` original timestep of each respaced step.
        betas, alphas_cumprod, ...: ``np.ndarray [S]`` float64 (see :data:`TABLES`).
        log_betas: ``log(betas)``, the upper end of the learned-range variance.
    """

    def __init__(self, num_train_steps: int = 1000, num_steps: int | None = None, noise_schedule: str = "cosine"):
        base = base_betas(noise_schedule, num_train_steps)
        self.noise_schedule = noise_schedule
        keep = list(range(num_train_steps)) if num_steps is None else space_timesteps(num_train_steps, num_steps)
        base_abar = np.cumprod(1.0 - base, axis=0)
        # the official code respaces even the full schedule, which re-derives the betas from abar
        # (they differ from the base betas in the last bit)
        last, new = 1.0, []
        kept = set(keep)
        for i, a in enumerate(base_abar):
            if i in kept:
                new.append(1 - a / last)
                last = a
        betas = np.array(new, dtype=np.float64)
        self.num_train_steps = num_train_steps
        self.timestep_map = torch.tensor(keep, dtype=torch.long)
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if len(self.posterior_variance) > 1 else np.array([], dtype=np.float64))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)

    def __len__(self) -> int:
        return len(self.betas)

    def at(self, name: str, t: int | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """Table ``name`` at step(s) ``t`` as float32: a 0-dim tensor for an int, ``[N, 1]`` for ``t [N]``."""
        arr = torch.from_numpy(getattr(self, name))
        if isinstance(t, int):
            return arr[t].float().to(device)
        return arr.to(t.device)[t].float()[:, None]

    def coefficients(self, index: int) -> dict[str, float]:
        """The :data:`STEP_TABLES` at respaced step ``index`` as Python floats holding the float32 values :meth:`at`
        returns (a float32 tensor times such a float rounds exactly as times the 0-dim float32 tensor). Cached."""
        cache = self.__dict__.setdefault("_coefficients", {})
        if index not in cache:
            cache[index] = {k: float(np.float32(getattr(self, k)[index])) for k in STEP_TABLES}
        return cache[index]

    def tables(self) -> dict[str, torch.Tensor]:
        """Every table as a float64 tensor, plus ``timestep_map`` (for inspection and tests)."""
        out = {k: torch.from_numpy(np.asarray(getattr(self, k))) for k in TABLES}
        out["timestep_map"] = self.timestep_map
        return out


@lru_cache(maxsize=16)
def get_schedule(num_train_steps: int = 1000, num_steps: int | None = None,
                 noise_schedule: str = "cosine") -> DiffusionSchedule:
    """Cached :class:`DiffusionSchedule` (tables are immutable)."""
    return DiffusionSchedule(num_train_steps, num_steps, noise_schedule)
