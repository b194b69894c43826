"""The token-head side of continuous speculative decoding: two heads on shared noise, the test, the residual.

:class:`HeadPair` holds the draft's and the target's token heads and everything one sample needs to
compare them (``docs/design/samplers.md`` §2.2-2.3):

* :meth:`HeadPair.noise` draws the trajectory noise ``Z = (x_T, e_T .. e_2)`` of ``n`` tokens once;
  :meth:`HeadPair.last_step` runs one head's chain on it (:func:`visar.samplers.heads.run_chain`) and
  returns the last step's Gaussian :class:`LastStep`. Given ``Z`` both chains are deterministic, so the
  two last steps are explicit Gaussians ``q(x | Z)`` and ``p(x | Z)``.
* :meth:`HeadPair.accept` is the speculative test ``log u < log p(x) - log q(x)`` (exact) or the public
  code's relaxed exponent (lossy); :meth:`HeadPair.residual` draws ``max(0, p - q)`` by rejection under
  ``p``; :meth:`HeadPair.draw` draws a last step.

Both chains use the same temperature; guidance is on each head's noise prediction, with the scale the
caller evaluates at the token's own position and step (a float or a per-token ``[n, 1]`` tensor). Counts
go into the sampler's ``stats`` dict.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from visar.generators.components.heads import MODEL_X0_CLIP, HeadNoise
from visar.samplers import gaussian as G
from visar.samplers.heads import run_chain


@dataclass
class LastStep:
    """The last denoising step of ``n`` tokens: ``N(mean, diag std^2)``.

    Attributes:
        mean, std: ``[n, C]`` (``std`` includes the temperature, ``> 0``).
        path: ``[n, C]`` summed log-std of the earlier steps (relaxed mode only), else ``None``.
    """

    mean: torch.Tensor
    std: torch.Tensor
    path: torch.Tensor | None = None

    def __getitem__(self, idx: Any) -> "LastStep":
        return LastStep(self.mean[idx], self.std[idx], None if self.path is None else self.path[idx])

    @staticmethod
    def cat(parts: list["LastStep"]) -> "LastStep":
        path = None if parts[0].path is None else torch.cat([p.path for p in parts])
        return LastStep(torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts]), path)


def final_step_is_noise_free(head: Any) -> bool:
    """Whether a head is configured with a deterministic last step (``final_std == 0``, e.g. a flow head by
    default or an ``EpsilonHead(final_std=0)``); such a head cannot take part in the exact test."""
    std = getattr(head, "final_std", None)
    return std is not None and float(std) == 0.0


def pair_steps(target_head: Any, draft_head: Any, num_steps: int | None, draft_num_steps: int | None,
               temperature: float) -> tuple[int, int]:
    """The chain lengths ``(target, draft)``: ``num_steps`` (``None``: the target head's default); the draft
    takes ``draft_num_steps``, else the target's count when both heads are of one kind (aligned
    trajectories), else its own default."""
    s_p = target_head.resolve_steps(num_steps, temperature)
    if draft_num_steps is None and draft_head.kind == target_head.kind:
        draft_num_steps = s_p
    return s_p, draft_head.resolve_steps(draft_num_steps, temperature)


class HeadPair:
    """Draft and target token heads on shared trajectory noise.

    Args:
        target_head, draft_head: :class:`~visar.generators.protocol.TokenHead` s of equal ``token_dim``.
        steps, draft_steps: chain lengths (:func:`pair_steps`).
        temperature: ``> 0``, for both heads.
        guided, draft_guided: whether each head's conditioning stacks ``[cond; uncond]``.
        x0_clip: the target head's clamp (the draft uses its own setting).
        relaxation: ``None`` (exact) or ``lambda > 0`` (the lossy public rule).
        residual_cap: most residual proposals per token; on_cap: ``"fallback"`` or ``"raise"``.
        generator: every draw.
        stats: the sampler's dict; counters are added to it.
    """

    def __init__(self, target_head: Any, draft_head: Any, steps: int, draft_steps: int, temperature: float,
                 guided: bool, draft_guided: bool, x0_clip: Any, relaxation: float | None, residual_cap: int,
                 on_cap: str, generator: torch.Generator | None, stats: dict):
        self.heads = {"target": target_head, "draft": draft_head}
        self.steps = {"target": steps, "draft": draft_steps}
        self.guided = {"target": guided, "draft": draft_guided}
        self.clip = {"target": x0_clip, "draft": MODEL_X0_CLIP}
        self.temperature, self.relaxation = temperature, relaxation
        self.residual_cap, self.on_cap = residual_cap, on_cap
        self.generator, self.stats = generator, stats
        self.noise_steps = max([s for side, s in self.steps.items() if self.heads[side].kind == "diffusion"],
                               default=0)
        self.token_dim = target_head.token_dim
        for key in ("head_calls_target", "head_calls_draft", "drafted", "accepted", "rejected", "residual_draws",
                    "residual_proposals", "residual_cap_hits"):
            stats.setdefault(key, 0)

    # ------------------------------------------------------------------ chains
    def noise(self, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Trajectory noise of ``n`` tokens on ``like``'s device and dtype: ``start [n, C]`` and ``steps
        [S, n, C]`` (``S`` = the longer diffusion chain; a chain of ``s`` steps uses ``steps[:s]``)."""
        C = self.token_dim
        start = torch.randn((n, C), generator=self.generator, device=like.device, dtype=like.dtype)
        steps = torch.randn((self.noise_steps, n, C), generator=self.generator, device=like.device, dtype=like.dtype)
        return start, steps

    def last_step(self, side: str, z_cond: torch.Tensor, z_uncond: torch.Tensor | None,
                  cfg: float | torch.Tensor, start: torch.Tensor, steps: torch.Tensor) -> LastStep:
        """Run ``side``'s (``"target"`` or ``"draft"``) chain for ``n`` tokens up to its last step.

        Args:
            z_cond: ``[n, D]`` conditioning; z_uncond: ``[n, D]`` null-condition rows when that side is guided.
            cfg: guidance scale, a float or ``[n, 1]``.
            start, steps: from :meth:`noise` (rows of the same tokens).
        """
        head, S, guided = self.heads[side], self.steps[side], self.guided[side]
        n = z_cond.shape[0]
        if n == 0:
            empty = start.new_zeros((0, self.token_dim))
            return LastStep(empty, empty.clone(), empty.clone() if self.relaxation is not None else None)
        z = torch.cat([z_cond, z_uncond]) if guided else z_cond
        noise = HeadNoise(start, steps[:S]) if head.kind == "diffusion" else None
        tail = run_chain(head, z, start, S, cfg, self.temperature, None, noise, guided, self.clip[side],
                         trace_std=self.relaxation is not None)
        self.stats[f"head_calls_{side}"] += 1
        std = tail.std[:n]
        if not bool(torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError(f"the {side} head's last denoising step has std {float(std.min()):.3g}: continuous "
                             "speculative decoding needs a real Gaussian last step (std > 0). Give the head a "
                             "final-step noise (e.g. final_std > 0)")
        return LastStep(tail.mean[:n], std, None if tail.path_log_std is None else tail.path_log_std[:n])

    # ------------------------------------------------------------------ draws and tests
    def draw(self, step: LastStep) -> torch.Tensor:
        """Tokens ``[n, C]`` from the last step's Gaussian."""
        return G.gaussian_draw(step.mean, step.std, self.generator)

    def accept(self, x: torch.Tensor, p: LastStep, q: LastStep) -> torch.Tensor:
        """Bool ``[n]``: the speculative test of drafted tokens ``x [n, C]`` (drawn from ``q``) against ``p``."""
        if self.relaxation is None:
            log_r = G.log_ratio(x, p.mean, p.std, q.mean, q.std)
        else:
            log_r = G.relaxed_log_ratio(x, p.mean, p.std, q.mean, q.std, self.relaxation, p.path, q.path)
        return G.accept_draft(log_r, self.generator)

    def residual(self, p: LastStep, q: LastStep) -> torch.Tensor:
        """Tokens ``[n, C]`` from ``max(0, p - q)`` (after a rejection), counted in ``stats``; a cap hit
        raises (``on_cap="raise"``) or keeps a draw from ``p`` with a warning and ``stats["exact"] = False``."""
        n = p.mean.shape[0]
        if n == 0:
            return p.mean.clone()
        res = G.residual_sample(p.mean, p.std, q.mean, q.std, self.generator, self.residual_cap)
        hits = int(res.capped.sum())
        self.stats["residual_draws"] += n
        self.stats["residual_proposals"] += int(res.proposals.sum())
        self.stats["residual_cap_hits"] += hits
        if hits:
            msg = (f"{hits} residual draw(s) hit residual_cap={self.residual_cap} proposals without acceptance "
                   "(target and draft last steps almost equal)")
            if self.on_cap == "raise":
                raise RuntimeError(msg + "; raise residual_cap or use on_residual_cap='fallback'")
            self.stats["exact"] = False
            warnings.warn(msg + ": those tokens were drawn from the target's last step instead (biased; counted "
                          "in stats['residual_cap_hits'], stats['exact'] is False)", RuntimeWarning, stacklevel=3)
        return res.tokens


__all__ = ["HeadPair", "LastStep", "final_step_is_noise_free", "pair_steps"]
