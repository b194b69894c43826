"""Continuous token heads: a small network that turns a transformer's conditioning vector into a token.

Two heads share one interface (``N`` tokens of ``C`` channels, conditioning width ``D``):

* ``loss(target [N, C], z [N, D], mask=None, generator=None, *, t=None, noise=None) -> scalar`` (explicit
  draws replace those from ``generator``);
* ``kind`` (``"diffusion"`` or ``"flow"``), ``token_dim``, ``num_sampling_steps`` (default step count),
  ``resolve_steps(steps, temperature)`` (validated step count);
* **one** denoising step: :meth:`DiffusionHead.step_gaussian` (a reverse step's Gaussian) and
  :meth:`FlowHead.solver_step` (one Euler / Heun step of the velocity ODE).

The chain (start noise, the loop over steps, the noise draws, the last step's density) is driven by
:mod:`visar.samplers.heads` (``sample_head(head, z, ...)``), so samplers can share a trajectory between
two heads or stop before the last step (continuous speculative decoding, ``docs/design/samplers.md`` §2).

With guidance ``z`` stacks ``[cond; uncond]`` (``2N`` rows) and ``N`` tokens come back, the convention
of MAR (guidance is applied to the noise / velocity prediction only).

:class:`DiffusionHead` is MAR's DiffLoss (``SimpleMLPAdaLN`` + improved-DDPM, eps prediction, learned-range
variance, cosine schedule, respaced sampling). :class:`HeadSample` (tokens and the last step's Gaussian)
and :class:`HeadNoise` (explicit trajectory noise) are the data the chain driver exchanges.

``x0_clip`` (:class:`DiffusionHead`, a visar option, off by default): clamp the predicted clean token to
``[-x0_clip, x0_clip]`` before the posterior mean of every reverse step (ADM's ``clip_denoised`` with a
latent-sized range instead of the pixel range ``[-1, 1]``). See :class:`DiffusionHead` for why a head
trained from scratch needs it.

:class:`FlowHead` is a flow-matching velocity MLP on the same trunk (straight path
``x_t = t x_1 + (1 - t) x_0``, Euler or Heun); its last step is deterministic unless ``final_std > 0``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from visar.generators.components.diffusion_schedule import check_noise_schedule, get_schedule
from visar.generators.components.draws import given_or_drawn
from visar.nn.adaln import norm_modulate
from visar.nn.embeddings import TimestepEmbedding
from visar.nn.guidance import cfg_mix
from visar.ops.head_step import ddpm_step, flow_step


@dataclass
class HeadSample:
    """Tokens and the Gaussian of the last denoising step they were drawn from.

    Attributes:
        tokens: ``[N, C]``.
        mean, std: ``[N, C]``: the last step draws ``tokens = mean + std * e`` (``std`` includes the
            temperature; with ``final_noise=False`` the tokens equal ``mean``).
    """

    tokens: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


@dataclass
class HeadNoise:
    """Explicit randomness of one head chain (replaces the generator's draws).

    Attributes:
        start: ``[N, C]`` starting noise (per token, shared by both guidance halves).
        steps: ``[S, N, C]`` per-step noise of the conditional rows, step order (first = noisiest).
    """

    start: torch.Tensor
    steps: torch.Tensor


#: per-call ``x0_clip`` value meaning "the head's own setting" (its constructor argument)
MODEL_X0_CLIP = "model"


def check_x0_clip(x0_clip, allow_model: bool = False) -> None:
    """``x0_clip`` must be ``None`` (no clipping) or a finite number > 0 (or ``"model"`` per call)."""
    if x0_clip is None or (allow_model and isinstance(x0_clip, str) and x0_clip == MODEL_X0_CLIP):
        return
    if (isinstance(x0_clip, bool) or not isinstance(x0_clip, (int, float)) or not math.isfinite(x0_clip)
            or x0_clip <= 0):
        extra = f", or {MODEL_X0_CLIP!r} for the model's own setting" if allow_model else ""
        raise ValueError(f"x0_clip must be a finite number > 0 (clamp the predicted clean token to "
                         f"[-x0_clip, x0_clip], e.g. 5.0 for unit-std latents) or None (no clipping, the "
                         f"official MAR sampler){extra}; got {x0_clip!r}")


def check_x0_clip_for_head(head: str, x0_clip) -> None:
    """Constructor ``x0_clip`` of a generator with a ``head`` kind: valid, and ``None`` unless ``"diffusion"``."""
    check_x0_clip(x0_clip)
    if x0_clip is not None and head != "diffusion":
        raise ValueError(f"x0_clip applies to the diffusion head only; leave it None with head={head!r}")


def check_noise_schedule_for_head(head: str, noise_schedule) -> None:
    """Constructor ``noise_schedule`` of a generator with a ``head`` kind: valid, and ``"cosine"`` (the default)
    unless ``"diffusion"`` (a flow head has no noise schedule)."""
    check_noise_schedule(noise_schedule)
    if noise_schedule != "cosine" and head != "diffusion":
        raise ValueError(f"noise_schedule applies to the diffusion head only; leave it 'cosine' with head={head!r}")


def check_head_x0_clip(head: nn.Module, x0_clip=MODEL_X0_CLIP) -> None:
    """Validate a per-call ``x0_clip`` for ``head``: a :class:`DiffusionHead` takes ``"model"``, ``None`` or
    a number > 0; any other head only ``"model"`` or ``None`` (a number raises ``ValueError``)."""
    check_x0_clip(x0_clip, allow_model=True)
    if getattr(head, "kind", None) != "diffusion" and not (isinstance(x0_clip, str) or x0_clip is None):
        raise ValueError(f"x0_clip applies to the diffusion head only; this model has a {type(head).__name__}")


def check_head_args(steps: int, temperature: float, max_steps: int, min_steps: int = 1) -> None:
    """``steps`` an integer in ``[min_steps, max_steps]`` and ``temperature > 0``, else ``ValueError``."""
    if not isinstance(steps, int) or not 1 <= steps <= max_steps:
        raise ValueError(f"the number of head sampling steps must be an integer in [1, {max_steps}], got {steps!r}")
    if steps < min_steps:
        raise ValueError(f"the diffusion head needs at least {min_steps} sampling steps (its clipped posterior "
                         f"variance is undefined for a 1-step schedule), got {steps}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


# ---------------------------------------------------------------------------------------------- network
class ResBlock(nn.Module):
    """AdaLN residual MLP block: ``x + gate * MLP(LN(x) * (1 + scale) + shift)``, ``(shift, scale, gate)`` order."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        ln = self.in_ln  # modulate(ln(x), shift, scale) as one op (a fused kernel on CUDA)
        return x + gate * self.mlp(norm_modulate(x, shift, scale, "layer", ln.eps, ln.weight, ln.bias))


class FinalLayer(nn.Module):
    """LayerNorm without affine, ``(shift, scale)`` modulation, linear projection."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(norm_modulate(x, shift, scale, "layer", self.norm_final.eps))


class SimpleMLPAdaLN(nn.Module):
    """MAR's head network ``(x_t [N, C], t [N], c [N, D]) -> [N, out_channels]``.

    ``y = time_embed(t) + cond_embed(c)`` (256-dim [cos | sin] sinusoid of ``t``, then Linear-SiLU-Linear);
    ``x = input_proj(x_t)``; ``depth`` :class:`ResBlock` s; :class:`FinalLayer`. Parameter names are the
    official ones (``time_embed.mlp.0``, ``res_blocks.{i}.adaLN_modulation.1``, ...).
    """

    def __init__(self, in_channels: int, width: int, out_channels: int, cond_dim: int, depth: int,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.grad_checkpointing = grad_checkpointing
        self.time_embed = TimestepEmbedding(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAR's init: xavier-uniform linears, N(0, 0.02) timestep MLP, zeroed modulations and output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for blk in self.res_blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(p.weight)
            nn.init.zeros_(p.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        dt = self.input_proj.weight.dtype  # the chain keeps x in float32; a bf16 network takes bf16 inputs
        x = self.input_proj(x.to(dt))  # [N, W]
        y = self.time_embed(t) + self.cond_embed(c.to(dt))  # [N, W]
        for blk in self.res_blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, y, use_reentrant=False)
            else:
                x = blk(x, y)
        return self.final_layer(x, y)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor,
                         cfg_scale: float | torch.Tensor) -> torch.Tensor:
        """Guided call on ``[cond; uncond]`` rows: the conditional half's ``x`` is used for both halves,
        ``eps = eps_u + cfg * (eps_c - eps_u)`` goes to both halves, the extra (variance) channels are
        not guided."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, c)
        eps, rest = out[:, :self.in_channels], out[:, self.in_channels:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = cfg_mix(cond_eps, uncond_eps, cfg_scale)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


# ---------------------------------------------------------------------------------------------- shared
def split_guided(z: torch.Tensor, cfg, guided: bool | None) -> tuple[bool, int]:
    """``(guided, N)`` of head conditioning ``z [R, D]``: guided iff ``guided`` (default ``cfg != 1``),
    then ``R = 2N`` rows ``[cond; uncond]`` (an odd ``R`` raises), else ``N = R``."""
    if z.dim() != 2:
        raise ValueError(f"head conditioning z must be [N, D], got {tuple(z.shape)}")
    g = (not bool(cfg == 1.0)) if guided is None else guided
    if g and z.shape[0] % 2:
        raise ValueError(f"with guidance z stacks [cond; uncond] rows, so its row count must be even; got {z.shape[0]}")
    return g, (z.shape[0] // 2 if g else z.shape[0])


def randn_as(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal draws of ``shape`` on ``like``'s device and dtype, from ``generator``."""
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


# ---------------------------------------------------------------------------------------------- diffusion
def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """Log-likelihood of ``x`` under a Gaussian discretised to 256 bins on ``[-1, 1]`` (ADM's decoder term)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))


class ReverseStepHead:
    """What a diffusion token head shares: the checked one-step API :meth:`step_gaussian` built on the
    head's ``resolve_steps``, ``resolve_x0_clip``, ``schedule`` and unchecked ``reverse_gaussian``."""

    def step_gaussian(self, x: torch.Tensor, index: int, z: torch.Tensor, steps: int | None = None,
                      cfg: float | torch.Tensor = 1.0, guided: bool | None = None,
                      x0_clip: float | None | str = MODEL_X0_CLIP) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian of one reverse step (the chain is driven by :func:`visar.samplers.heads.sample_head`).

        Args:
            x: ``[R, C]`` current state (``R = 2N`` rows ``[cond; uncond]`` when guided; the conditional
                half's state is used for both halves).
            index: respaced step ``i`` in ``[0, steps)``, run from ``steps - 1`` down to 0 (0 = last step).
            z: ``[R, D]`` conditioning, ``[cond; uncond]`` when guided.
            steps: respaced step count (default ``num_sampling_steps``), in ``[2, num_train_steps]``.
            cfg: guidance scale on the predicted noise (a float or a one-element tensor); 1 = none.
            guided: force the row layout (default: guided iff ``cfg != 1``).
            x0_clip: ``"model"`` (default: the head's own), ``None`` (no clipping, the official sampler) or
                a finite number > 0 (clamp the predicted clean token to ``[-x0_clip, x0_clip]``).

        Returns:
            ``(mean, std)`` each ``[R, C]``, un-tempered: ``x_next = mean + std * noise * temperature``.
        """
        steps = self.resolve_steps(steps)
        if not 0 <= index < steps:
            raise ValueError(f"index must be in [0, {steps}), got {index}")
        clip = self.resolve_x0_clip(x0_clip)
        g, _ = split_guided(z, cfg, guided)
        return self.reverse_gaussian(self.schedule(steps), x, index, z, cfg, g, clip)


class DiffusionHead(ReverseStepHead, nn.Module):
    """MAR's DiffLoss: a diffusion model of one token given its conditioning vector.

    Args:
        token_dim: token channels ``C`` (16 for kl16 with ``patch_size=1``).
        cond_dim: conditioning width ``D``.
        width, depth: MLP width and number of residual blocks (MAR-B: 1024 x 6).
        num_sampling_steps: default respaced step count (100 in every released evaluation).
        num_train_steps: base schedule length (1000).
        grad_checkpointing: recompute blocks in the backward pass.
        x0_clip: default clamp of the predicted clean token, ``None`` (the official sampler, bit-identical
            to MAR) or a finite number > 0; ``sample_head`` and :meth:`step_gaussian` can override it per call.
        noise_schedule: ``"cosine"`` (MAR, bit-exact with the official head) or ``"linear"`` (DDPM's betas, a
            visar option: no eps-error blow-up at the first reverse step, so a briefly trained head samples its
            data without ``x0_clip``; ``docs/continuous.md``, "Training the diffusion head on a CPU budget").

    Why ``x0_clip``: every reverse step predicts the clean token
    ``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` and forms the posterior mean from it. The cosine
    schedule clips ``beta`` at 0.999, so at ``t = 999`` (the first sampling step) ``sqrt(abar) ~ 5e-5``
    and an error of 0.03 in the predicted noise becomes an ``x0`` error of ~600 (a factor ~2e4). MAR's
    sampler does not clip (``clip_denoised=False``), which is fine for its converged ImageNet heads but
    not for a head trained briefly from scratch: on a toy (4-dim tokens, 3 Gaussian classes of std 0.1,
    2000 AdamW steps) the training loss is fine yet the samples miss the class means by ~430 on
    average; with ``x0_clip=4`` the same head gives an error of 0.085 and per-dimension std 0.10-0.11
    (true 0.1). The clamp only acts where ``|x0| > x0_clip``, so pick a range a few times the token
    std (5.0 for latents scaled to ~unit std). Training (:meth:`loss`) never clips.
    """

    kind: ClassVar[str] = "diffusion"

    def __init__(self, token_dim: int, cond_dim: int, width: int = 1024, depth: int = 6,
                 num_sampling_steps: int = 100, num_train_steps: int = 1000, grad_checkpointing: bool = False,
                 x0_clip: float | None = None, noise_schedule: str = "cosine"):
        super().__init__()
        check_head_args(num_sampling_steps, 1.0, num_train_steps, min_steps=2)
        check_x0_clip(x0_clip)
        self.noise_schedule = check_noise_schedule(noise_schedule)
        self.token_dim, self.num_train_steps, self.num_sampling_steps = token_dim, num_train_steps, num_sampling_steps
        self.x0_clip = None if x0_clip is None else float(x0_clip)
        self.net = SimpleMLPAdaLN(token_dim, width, 2 * token_dim, cond_dim, depth, grad_checkpointing)

    def resolve_steps(self, steps: int | None = None, temperature: float = 1.0) -> int:
        """The respaced step count of a chain (``None``: ``num_sampling_steps``), validated: an integer in
        ``[2, num_train_steps]``; ``temperature`` must be > 0."""
        steps = self.num_sampling_steps if steps is None else steps
        check_head_args(steps, float(temperature), self.num_train_steps, min_steps=2)
        return steps

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Raw network output ``[N, 2C]``: predicted noise and the variance interpolation ``v``."""
        return self.net(x_t, t, z)

    # ------------------------------------------------------------------ training
    def loss(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None, *, t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """ADM hybrid loss (eps MSE + variational bound with the mean frozen), averaged over ``mask``.

        Args:
            target: ``[N, C]`` clean tokens.
            z: ``[N, D]`` conditioning.
            mask: ``[N]`` weights (MAR: 1 on masked positions); ``None`` = all rows.
            generator: source of the draws not given below (``t`` first, then ``noise``).
            t: ``LongTensor [N]`` training timesteps in ``[0, num_train_steps)`` (default: uniform draws).
            noise: ``[N, C]`` standard-normal ``eps`` (default: drawn).
        """
        if target.dim() != 2 or target.shape[1] != self.token_dim or z.shape[0] != target.shape[0]:
            raise ValueError(f"target must be [N, {self.token_dim}] with one z row per token; got target "
                             f"{tuple(target.shape)}, z {tuple(z.shape)}")
        sch = get_schedule(self.num_train_steps, None, self.noise_schedule)
        n = target.shape[0]
        T, dev = self.num_train_steps, target.device
        t = given_or_drawn("t", t, lambda: torch.randint(0, T, (n,), generator=generator, device=dev),
                           (n,), "index", dev, low=0, high=T)
        noise = given_or_drawn("noise", noise, lambda: randn_as(target.shape, target, generator),
                               tuple(target.shape), "real", dev, target.dtype)
        x_t = sch.at("sqrt_alphas_cumprod", t) * target + sch.at("sqrt_one_minus_alphas_cumprod", t) * noise
        out = self.net(x_t, t, z)
        eps, v = out[:, :self.token_dim], out[:, self.token_dim:]
        mse = ((noise - eps) ** 2).mean(dim=1)
        # variational bound term: only the variance gets its gradient (eps is frozen), ADM eq. 16
        true_mean = sch.at("posterior_mean_coef1", t) * target + sch.at("posterior_mean_coef2", t) * x_t
        true_logvar = sch.at("posterior_log_variance_clipped", t)
        mean, logvar = self._mean_logvar(sch, x_t, eps.detach(), v, t)
        kl = normal_kl(true_mean, true_logvar, mean, logvar).mean(dim=1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(target, mean, 0.5 * logvar).mean(dim=1) / math.log(2.0)
        loss = mse + torch.where(t == 0, nll, kl)
        if mask is not None:
            loss = (loss * mask).sum() / mask.sum()
        return loss.mean()

    @staticmethod
    def _mean_logvar(sch, x, eps, v, idx, x0_clip: float | None = None):
        """Posterior mean and learned-range log-variance of one step; ``idx`` int or ``[N]``; the predicted
        ``x0`` is clamped to ``[-x0_clip, x0_clip]`` unless ``x0_clip`` is ``None``."""
        frac = (v + 1) / 2
        logvar = frac * sch.at("log_betas", idx, x.device) + (1 - frac) * sch.at("posterior_log_variance_clipped", idx,
                                                                                  x.device)
        x0 = sch.at("sqrt_recip_alphas_cumprod", idx, x.device) * x - sch.at("sqrt_recipm1_alphas_cumprod", idx,
                                                                              x.device) * eps
        if x0_clip is not None:
            x0 = x0.clamp(-x0_clip, x0_clip)
        mean = sch.at("posterior_mean_coef1", idx, x.device) * x0 + sch.at("posterior_mean_coef2", idx, x.device) * x
        return mean, logvar

    # ------------------------------------------------------------------ sampling
    def _reverse_step(self, sch, x: torch.Tensor, i: int, z: torch.Tensor, cfg, g: bool,
                      x0_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` of respaced step ``i``: the network once, then :func:`visar.ops.ddpm_step` (guidance on
        the noise, the posterior mean, the learned std; one kernel on CUDA). Equal, bit for bit, to
        ``forward_with_cfg`` followed by :meth:`_mean_logvar` and ``exp(0.5 logvar)``."""
        t = sch.timestep_map.to(z.device)[i].expand(x.shape[0])  # original timestep of respaced step i
        if g:
            half = x[: len(x) // 2]
            out = self.net(torch.cat([half, half], dim=0), t, z)
        else:
            out = self.net(x, t, z)
        c = sch.coefficients(i)
        return ddpm_step(x, out, cfg if g else None, c["sqrt_recip_alphas_cumprod"], c["sqrt_recipm1_alphas_cumprod"],
                         c["posterior_mean_coef1"], c["posterior_mean_coef2"], x0_clip, c["log_betas"],
                         c["posterior_log_variance_clipped"])

    def resolve_x0_clip(self, x0_clip=MODEL_X0_CLIP) -> float | None:
        """The clamp a call uses: ``"model"`` -> the head's ``x0_clip``; ``None`` or a number > 0 as given."""
        check_x0_clip(x0_clip, allow_model=True)
        if isinstance(x0_clip, str):
            return self.x0_clip
        return None if x0_clip is None else float(x0_clip)

    @torch.no_grad()
    def schedule(self, steps: int):
        """The respaced schedule of ``steps`` sampling steps (cached)."""
        return get_schedule(self.num_train_steps, steps, self.noise_schedule)

    def reverse_gaussian(self, schedule, x: torch.Tensor, index: int, z: torch.Tensor, cfg, guided: bool,
                         x0_clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`step_gaussian` on resolved arguments, unchecked (the head chain's hot loop): ``schedule``
        from :meth:`schedule`, ``guided`` a bool, ``x0_clip`` ``None`` or a number. Returns ``(mean, std)``."""
        return self._reverse_step(schedule, x, index, z, cfg, guided, x0_clip)


# ---------------------------------------------------------------------------------------------- flow matching
class FlowHead(nn.Module):
    """Flow-matching token head: a velocity MLP (same trunk as :class:`SimpleMLPAdaLN`).

    Straight path ``x_t = t x_1 + (1 - t) x_0`` with ``x_0 ~ N(0, I)``, target velocity ``x_1 - x_0``;
    the network sees ``1000 t``. Sampling integrates ``dx/dt = v`` from ``t = 0`` to ``1`` (Euler or
    Heun on a uniform grid), guidance ``v_u + cfg (v_c - v_u)``, temperature scales the starting noise.

    Args:
        token_dim, cond_dim, width, depth: as :class:`DiffusionHead`.
        num_sampling_steps: default ODE steps.
        solver: ``"euler"`` or ``"heun"``.
        final_std: std of the Gaussian put on the last step (0 = deterministic endpoint); what continuous
            speculative decoding needs when it pairs flow heads.
    """

    kind: ClassVar[str] = "flow"

    def __init__(self, token_dim: int, cond_dim: int, width: int = 1024, depth: int = 6,
                 num_sampling_steps: int = 50, solver: str = "euler", final_std: float = 0.0,
                 grad_checkpointing: bool = False):
        super().__init__()
        if solver not in ("euler", "heun"):
            raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")
        if not final_std >= 0:
            raise ValueError(f"final_std must be >= 0, got {final_std}")
        check_head_args(num_sampling_steps, 1.0, 10 ** 6)
        self.token_dim, self.num_sampling_steps, self.solver, self.final_std = (
            token_dim, num_sampling_steps, solver, final_std)
        self.net = SimpleMLPAdaLN(token_dim, width, token_dim, cond_dim, depth, grad_checkpointing)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Velocity ``[N, C]`` at times ``t [N]`` in ``[0, 1]``."""
        return self.net(x_t, t * 1000.0, z)

    def loss(self, target: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None, *, t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity MSE averaged over ``mask`` (``[N]`` weights, ``None`` = all rows).

        ``t`` (``[N]`` times in ``[0, 1]``, 1 = data) and ``noise`` (``[N, C]``, the path's start ``x_0``) replace
        the draws from ``generator`` (made in that order when not given).
        """
        if target.dim() != 2 or target.shape[1] != self.token_dim or z.shape[0] != target.shape[0]:
            raise ValueError(f"target must be [N, {self.token_dim}] with one z row per token; got target "
                             f"{tuple(target.shape)}, z {tuple(z.shape)}")
        n, dev = target.shape[0], target.device
        t = given_or_drawn("t", t, lambda: torch.rand(n, generator=generator, device=dev, dtype=target.dtype),
                           (n,), "real", dev, target.dtype, low=0.0, high=1.0)
        x0 = given_or_drawn("noise", noise, lambda: randn_as(target.shape, target, generator),
                            tuple(target.shape), "real", dev, target.dtype)
        x_t = t[:, None] * target + (1 - t[:, None]) * x0
        loss = ((self(x_t, t, z) - (target - x0)) ** 2).mean(dim=1)
        if mask is not None:
            return (loss * mask).sum() / mask.sum()
        return loss.mean()

    def resolve_steps(self, steps: int | None = None, temperature: float = 1.0) -> int:
        """ODE step count of a chain (``None``: ``num_sampling_steps``), validated (an integer >= 1);
        ``temperature`` must be > 0."""
        steps = self.num_sampling_steps if steps is None else steps
        check_head_args(steps, float(temperature), 10 ** 6)
        return steps

    @staticmethod
    def time_grid(steps: int) -> list[float]:
        """The uniform grid ``t_0 = 0 < ... < t_steps = 1`` the solver steps between (``steps + 1`` floats)."""
        return [float(t) for t in np.linspace(0.0, 1.0, steps + 1)]

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, t: float, z: torch.Tensor, cfg: float | torch.Tensor = 1.0,
                 guided: bool = False) -> torch.Tensor:
        """Velocity ``[N, C]`` of tokens ``x [N, C]`` at time ``t``; guided: ``z [2N, D]`` = ``[cond; uncond]``
        and ``v_u + cfg (v_c - v_u)`` (the tokens are shared by both halves)."""
        tt = torch.full((z.shape[0],), t, device=z.device, dtype=x.dtype)
        if not guided:
            return self(x, tt, z)
        v = self(torch.cat([x, x], dim=0), tt, z)
        vc, vu = v.chunk(2, dim=0)
        return cfg_mix(vc, vu, cfg)

    @torch.no_grad()
    def solver_step(self, x: torch.Tensor, t0: float, t1: float, z: torch.Tensor, cfg: float | torch.Tensor = 1.0,
                    guided: bool = False) -> torch.Tensor:
        """One Euler (or Heun) step of ``dx/dt = v`` from ``t0`` to ``t1``: ``x [N, C] -> [N, C]`` (``z`` and
        guidance as :meth:`velocity`); the guidance mix and the update are :func:`visar.ops.flow_step`."""
        x1, v = flow_step(x, self._raw_velocity(x, t0, z, guided), t1 - t0, cfg if guided else None)
        if self.solver == "heun":
            x1, _ = flow_step(x, self._raw_velocity(x1, t1, z, guided), t1 - t0, cfg if guided else None, v_prev=v)
        return x1

    def _raw_velocity(self, x: torch.Tensor, t: float, z: torch.Tensor, guided: bool) -> torch.Tensor:
        """The network's velocity at time ``t``: ``[N, C]``, or ``[2N, C]`` (``[cond; uncond]``, tokens shared)."""
        tt = torch.full((z.shape[0],), t, device=z.device, dtype=x.dtype)
        return self(torch.cat([x, x], dim=0) if guided else x, tt, z)


HEADS = {"diffusion": DiffusionHead, "flow": FlowHead}


def build_head(kind: str, **kwargs) -> nn.Module:
    """``"diffusion"`` -> :class:`DiffusionHead`, ``"flow"`` -> :class:`FlowHead`."""
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; choose one of {sorted(HEADS)}")
    return HEADS[kind](**kwargs)


__all__ = ["DiffusionHead", "FlowHead", "HeadSample", "HeadNoise", "SimpleMLPAdaLN", "build_head",
           "check_x0_clip", "check_x0_clip_for_head", "check_head_x0_clip", "check_head_args", "split_guided",
           "randn_as", "MODEL_X0_CLIP", "normal_kl", "discretized_gaussian_log_likelihood"]
