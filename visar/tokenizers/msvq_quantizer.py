"""VAR's multi-scale residual vector quantizer (Tian et al. 2024, "Visual Autoregressive Modeling", Alg. 1-2).

A latent ``f [B, Cvae, h, w]`` is explained coarse to fine by ``S`` token maps of sizes
``scales = (pn_0 < ... < pn_{S-1} = h)``. At scale ``k``:

1. ``z = area_down(f_rest, pn_k)`` (PyTorch ``"area"`` = adaptive average pooling; the last scale uses
   ``f_rest`` itself);
2. ``idx = argmin_v |z|^2 + |e_v|^2 - 2 z.e_v`` (first index on ties);
3. ``r = phi_{j(k)}(bicubic_up(embedding(idx), h))`` with ``phi_j(r) = (1 - a) r + a conv3x3_j(r)``,
   ``a = 0.5`` (no up-sampling at the last scale);
4. ``f_hat += r``, ``f_rest -= r``.

Four residual convs are shared across scales: scale ``k`` uses ``j(k) = argmin_j |t_j - k/(S-1)|`` with
``t = linspace(1/12, 11/12, 4)`` evaluated in float64 like the official code, so float rounding breaks
the exact real-arithmetic ties (k/(S-1) = 2/9 and 7/9 for 10 scales) the same way
(``[0, 0, 1, 1, 1, 2, 2, 3, 3, 3]``).

State-dict names follow the official ``quantize.*`` layout: ``embedding.weight [V, Cvae]`` and
``quant_resi.qresi_ls.{j}.weight/bias``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visar.utils.dist import all_reduce_, broadcast_


def phi_index_table(num_scales: int, num_phi: int = 4) -> list[int]:
    """Residual-conv index of every scale, reproducing the official float64 ties.

    ``ticks = np.linspace(1/(3K), 1 - 1/(3K), K)``; scale ``k`` uses ``argmin |ticks - k/(S-1)|``.
    """
    if num_scales < 1 or num_phi < 1:
        raise ValueError(f"need >= 1 scale and >= 1 residual conv, got {num_scales} and {num_phi}")
    if num_phi == 1:
        return [0] * num_scales
    ticks = np.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi)
    denom = max(num_scales - 1, 1)
    return [int(np.argmin(np.abs(ticks - k / denom))) for k in range(num_scales)]


class Phi(nn.Conv2d):
    """``phi(r) = (1 - a) r + a conv3x3(r)`` on ``[B, Cvae, h, w]`` (VAR's residual refinement)."""

    def __init__(self, dim: int, ratio: float = 0.5):
        super().__init__(dim, dim, kernel_size=3, stride=1, padding=1)
        self.ratio = abs(ratio)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return r.mul(1 - self.ratio) + super().forward(r).mul_(self.ratio)


class PhiShared(nn.Module):
    """``num_phi`` residual convs (``qresi_ls``) shared across scales."""

    def __init__(self, dim: int, num_phi: int = 4, ratio: float = 0.5):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(dim, ratio) for _ in range(num_phi))


class MultiScaleResidualQuantizer(nn.Module):
    """Codebook ``[V, Cvae]`` + shared residual convs, for a fixed schedule ``scales``.

    Args:
        vocab_size: codebook size ``V``.
        dim: code dimension ``Cvae``.
        scales: increasing token-map sides ``pn_k``; the last one is the latent side.
        num_phi: number of shared residual convs (4 in VAR).
        phi_ratio: residual mixing ``a`` (0.5 in VAR).
        beta: commitment weight of the training loss (0.25 in VAR).
        restart_unused: training only: a code unused for this many consecutive training passes is
            re-initialised to a random residual vector of the current batch (0 = off, as in VAR; never
            while the codebook is frozen, ``requires_grad=False``).
            Under an initialised ``torch.distributed`` group of several processes the usage is
            all-reduced (a code counts as used when any process used it) and rank 0's codebook is
            broadcast after a restart, so the replicas stay identical. The ages live in the
            non-persistent buffer ``code_age`` (official files have no such entry), listed in
            :attr:`training_state_buffers` so that training checkpoints save and restore it.
    """

    #: non-persistent buffers that training updates and a resumed run needs (saved by the trainer's
    #: checkpoints, not by ``state_dict``: see :func:`visar.train.checkpoint.training_buffers`)
    training_state_buffers = ("code_age",)

    def __init__(self, vocab_size: int, dim: int, scales: Sequence[int], num_phi: int = 4,
                 phi_ratio: float = 0.5, beta: float = 0.25, restart_unused: int = 0):
        super().__init__()
        scales = [int(s) for s in scales]
        if not scales or any(s < 1 for s in scales) or any(a >= b for a, b in zip(scales, scales[1:])):
            raise ValueError(f"scales must be a strictly increasing list of positive sides, got {scales}")
        self.vocab_size, self.dim, self.scales, self.beta = vocab_size, dim, scales, beta
        self.phi_index = phi_index_table(len(scales), num_phi)
        self.embedding = nn.Embedding(vocab_size, dim)
        self.quant_resi = PhiShared(dim, num_phi, phi_ratio)
        if restart_unused < 0:
            raise ValueError(f"restart_unused must be >= 0 (0 disables dead-code restarts), got {restart_unused}")
        self.restart_unused = restart_unused
        # passes since each code was last used (not in state_dict: official files have no such buffer;
        # training checkpoints carry it through training_state_buffers)
        self.register_buffer("code_age", torch.zeros(vocab_size, dtype=torch.long), persistent=False)

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def latent_side(self) -> int:
        return self.scales[-1]

    # ---- building blocks ------------------------------------------------------------------------
    def phi(self, k: int, r: torch.Tensor) -> torch.Tensor:
        """Residual conv of scale ``k`` on ``r [B, Cvae, h, w]``."""
        return self.quant_resi.qresi_ls[self.phi_index[k]](r)

    def embed(self, idx: torch.Tensor, k: int) -> torch.Tensor:
        """Token ids of scale ``k`` (``[B, pn, pn]`` or ``[B, pn^2]``) -> codes ``[B, Cvae, pn, pn]``."""
        pn = self.scales[k]
        B = idx.shape[0]
        return self.embedding(idx.reshape(B, pn * pn)).transpose(1, 2).reshape(B, self.dim, pn, pn)

    def residual(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """``phi_k(bicubic_up(h))`` (no up-sampling at the last scale) for ``h [B, Cvae, pn_k, pn_k]``."""
        if k != self.num_scales - 1:
            h = F.interpolate(h, size=(self.latent_side, self.latent_side), mode="bicubic")
        return self.phi(k, h)

    def next_input(self, f_hat: torch.Tensor, k: int) -> torch.Tensor:
        """Teacher-forcing input after scale ``k``: ``area_down(f_hat, pn_{k+1})`` as ``[B, pn_{k+1}^2, Cvae]``."""
        pn = self.scales[k + 1]
        B = f_hat.shape[0]
        return F.interpolate(f_hat, size=(pn, pn), mode="area").reshape(B, self.dim, pn * pn).transpose(1, 2)

    def accumulate(self, f_hat: torch.Tensor, k: int, h: torch.Tensor) -> torch.Tensor | None:
        """Add scale ``k``'s codes ``h [B, Cvae, pn_k, pn_k]`` to ``f_hat [B, Cvae, h, w]`` in place.

        Returns the next scale's input ``[B, pn_{k+1}^2, Cvae]``, or ``None`` after the last scale.
        This is the step VAR's sampler runs after every scale.
        """
        f_hat.add_(self.residual(k, h))
        return None if k == self.num_scales - 1 else self.next_input(f_hat, k)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code ids of ``z [N, Cvae]`` by squared L2 distance (``|z|^2 + |e|^2 - 2 z.e``)."""
        w = self.embedding.weight
        d = z.square().sum(1, keepdim=True) + w.square().sum(1)  # [N, V]
        d = torch.addmm(d, z, w.t(), alpha=-2, beta=1)
        return d.argmin(1)

    # ---- whole-schedule operations ------------------------------------------------------------------
    def check_latent(self, f: torch.Tensor) -> None:
        if f.dim() != 4 or f.shape[1] != self.dim:
            raise ValueError(f"latent must be [B, {self.dim}, h, w], got {tuple(f.shape)}")
        if f.shape[-2:] != (self.latent_side, self.latent_side):
            raise ValueError(f"latent is {f.shape[-2]}x{f.shape[-1]} but the schedule {self.scales} ends at "
                             f"{self.latent_side}x{self.latent_side}: use images of "
                             f"{self.latent_side} x downsample pixels, or a schedule whose last scale is the latent side")

    def check_tokens(self, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Validate a list of per-scale ids; returns them as ``[B, pn_k, pn_k]`` views."""
        if not isinstance(tokens, (list, tuple)) or len(tokens) != self.num_scales:
            n = len(tokens) if isinstance(tokens, (list, tuple)) else type(tokens).__name__
            raise ValueError(f"multi-scale tokens must be a list of {self.num_scales} LongTensors "
                             f"(one per scale {self.scales}), got {n}")
        out = []
        for k, (t, pn) in enumerate(zip(tokens, self.scales)):
            if not isinstance(t, torch.Tensor) or t.is_floating_point():
                raise TypeError(f"tokens[{k}] must be an integer tensor")
            if t[0].numel() != pn * pn or t.shape[0] != tokens[0].shape[0]:
                raise ValueError(f"tokens[{k}] has shape {tuple(t.shape)}, expected [B, {pn}, {pn}] or [B, {pn * pn}]")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.vocab_size):
                raise ValueError(f"tokens[{k}] must lie in [0, {self.vocab_size}), got [{int(t.min())}, {int(t.max())}]")
            out.append(t.reshape(t.shape[0], pn, pn))
        return out

    @torch.no_grad()
    def quantize(self, f: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Latent ``f [B, Cvae, h, w]`` -> (ids ``[B, pn_k, pn_k]`` per scale, cumulative ``f_hat`` per scale)."""
        self.check_latent(f)
        B, C = f.shape[:2]
        f_rest, f_hat = f.clone(), torch.zeros_like(f)
        ids, fhats = [], []
        last = self.num_scales - 1
        for k, pn in enumerate(self.scales):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if k != last else f_rest
            idx = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn, pn)
            r = self.residual(k, self.embed(idx, k))
            f_hat.add_(r)
            f_rest.sub_(r)
            ids.append(idx)
            fhats.append(f_hat.clone())
        return ids, fhats

    def tokens_to_fhat(self, tokens: Sequence[torch.Tensor], upto: int | None = None) -> torch.Tensor:
        """Cumulative ``f_hat [B, Cvae, h, w]`` of the first ``upto`` scales (all by default)."""
        tokens = self.check_tokens(tokens) if upto is None else tokens
        n = self.num_scales if upto is None else upto
        B = tokens[0].shape[0]
        w = self.embedding.weight
        f_hat = w.new_zeros(B, self.dim, self.latent_side, self.latent_side)
        for k in range(n):
            f_hat = f_hat + self.residual(k, self.embed(tokens[k], k))
        return f_hat

    def teacher_forcing_inputs(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-scale ids -> VAR's transformer input ``[B, L - pn_0^2, Cvae]`` (scales 1..S-1, row-major)."""
        tokens = self.check_tokens(tokens)
        B = tokens[0].shape[0]
        w = self.embedding.weight
        f_hat = w.new_zeros(B, self.dim, self.latent_side, self.latent_side)
        inputs = [self.accumulate(f_hat, k, self.embed(tokens[k], k)) for k in range(self.num_scales - 1)]
        if not inputs:
            return w.new_zeros(B, 0, self.dim)
        return torch.cat(inputs, dim=1)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Training pass: returns (straight-through ``f_hat``, vq loss, ids per scale).

        Loss (VAR's ``VectorQuantizer2``): mean over scales of
        ``beta * mse(sg[f_hat_k], f) + mse(f_hat_k, sg[f])`` -- the first term commits the encoder,
        the second trains the codebook and the residual convs.
        """
        self.check_latent(f)
        B, C = f.shape[:2]
        f_sg = f.detach()
        f_rest, f_hat = f_sg.clone(), torch.zeros_like(f_sg)
        loss = f.new_zeros(())
        ids, zs = [], []
        last = self.num_scales - 1
        for k, pn in enumerate(self.scales):
            with torch.no_grad():
                z = F.interpolate(f_rest, size=(pn, pn), mode="area") if k != last else f_rest
                z = z.permute(0, 2, 3, 1).reshape(-1, C)
                zs.append(z)
                idx = self.nearest(z).view(B, pn, pn)
            r = self.residual(k, self.embed(idx, k))
            f_hat = f_hat + r
            f_rest = f_rest - r.detach()
            loss = loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_sg)
            ids.append(idx)
        f_st = (f_hat.detach() - f_sg) + f  # straight-through: value f_hat, gradient to f
        if self.training and self.restart_unused > 0 and self.embedding.weight.requires_grad:
            self.restart_dead_codes(ids, torch.cat(zs))  # a frozen codebook (decoder-only fine-tuning) keeps its codes
        return f_st, loss / self.num_scales, ids

    @torch.no_grad()
    def restart_dead_codes(self, ids: Sequence[torch.Tensor], candidates: torch.Tensor) -> int:
        """Age the codes, re-initialise those unused for ``restart_unused`` passes to random rows of
        ``candidates [N, Cvae]``; returns how many were restarted.

        With several processes (see ``restart_unused``) this is a collective: the usage is
        all-reduced, and after a restart (the same codes die on every rank, since the ages agree)
        rank 0's codebook, built from its own candidates and random stream, is broadcast."""
        used = torch.zeros(self.vocab_size, dtype=torch.long, device=candidates.device)
        for i in ids:
            used[i.reshape(-1)] = 1
        all_reduce_(used, "max")  # every rank sees the same ages (no-op in a single process)
        self.code_age.add_(1).masked_fill_(used.bool(), 0)
        dead = (self.code_age >= self.restart_unused).nonzero().flatten()
        if dead.numel() == 0:
            return 0
        pick = torch.randint(0, candidates.shape[0], (dead.numel(),), device=candidates.device)
        self.embedding.weight[dead] = candidates[pick].to(self.embedding.weight.dtype)
        broadcast_(self.embedding.weight.data, src=0)
        self.code_age[dead] = 0
        return int(dead.numel())
