"""Self-speculative Jacobi decoding (SJD): lossless parallel decoding of a next-token model, no draft model.

Teng et al. 2024, "Accelerating Auto-regressive Text-to-Image Generation with Training-free Speculative
Jacobi Decoding". Every row keeps a window of ``W`` draft tokens after its committed prefix, each with
the law ``q`` it was drawn from. One iteration is one target pass over ``[y_prev, window]``, giving the
target's processed laws ``p`` at every window position (conditioned on the drafts before it); then the
speculative rule (:func:`~visar.samplers.acceptance.accept_drafts`): accept while ``u q(x) < p(x)``, at
the first rejection ``y ~ (p - q)+``, after the whole window the bonus ``y ~ p``. The next window's
drafts are drawn from this iteration's ``p`` at their positions (their ``q``), and positions never
predicted yet are drawn uniformly (``q = 1 / V``). Each draft token is drawn from a law fixed before the
iteration that tests it, so the output law is exactly the plain sampler's (``"autoregressive"``).
"""
from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from visar.conditions import Condition
from visar.nn.guidance import is_guided
from visar.registry import register
from visar.samplers.acceptance import accept_drafts, processed_laws
from visar.samplers.autoregressive import check_num_tokens
from visar.samplers.logits import sample_categorical
from visar.samplers.options import check_positive_int
from visar.samplers.ragged_feed import RaggedFeeder
from visar.samplers.speculative import TARGET_DEFAULTS, VerifySampler


@register("sampler", "jacobi")
class JacobiSampler(VerifySampler):
    """Speculative Jacobi decoding: the model drafts for itself from its previous iteration's laws.

    ``JacobiSampler(window=16, **options)``; ``pipe(labels, sampler="jacobi", window=16)``.

    Options:
        cfg_scale, cfg_interval, temperature, top_k, top_p, num_tokens, progress: the law and the run, as
            for ``"autoregressive"``.
        window: draft tokens verified per iteration, an int ``>= 1`` (a pass feeds ``window + 1`` tokens).

    Returns ``LongTensor [B, grid, grid]`` for a whole image, ``[B, num_tokens]`` for a prefix.
    ``stats``: ``acceptance_rate`` (accepted / proposed drafts), ``tokens_per_target_pass``,
    ``target_passes`` (model calls, ``start`` included), ``draft_passes`` (0), ``rounds`` and
    ``iterations`` (Jacobi iterations of the batch, one target pass each), plus ``accepted``,
    ``proposed``, ``tokens``, ``row_target_passes`` and ``row_accepted`` (CPU tensors ``[B]``).
    """

    name = "jacobi"
    defaults = dict(TARGET_DEFAULTS, window=16)

    def __init__(self, **options: Any):
        super().__init__(**options)
        if "window" in options:
            check_positive_int("window", options["window"])

    def validate(self, options: dict[str, Any]) -> None:
        super().validate(options)
        check_positive_int("window", options["window"])

    @torch.no_grad()
    def run(self, model: Any, cond: Condition, generator: torch.Generator | None, **o: Any) -> torch.Tensor:
        L = check_num_tokens(model, o["num_tokens"])
        topts = self.law(o)
        B, W = cond.batch_size, min(o["window"], L)
        target = RaggedFeeder(model, cond, is_guided(topts["cfg_scale"]), L)
        V, dev = target.first.shape[-1], target.device
        rows = torch.arange(B, device=dev)
        offsets = torch.arange(W, device=dev)
        uniform = torch.full((B, W, V), 1.0 / V, device=dev)
        # buf: committed tokens, then the window's drafts; Q[:, i]: the law draft n + i was drawn from
        buf = torch.zeros(B, L, dtype=torch.long, device=dev)
        Q = uniform.clone()
        buf[:, :W] = sample_categorical(Q, generator)
        n = torch.zeros(B, dtype=torch.long, device=dev)
        rounds, acc, prop = (torch.zeros(B, dtype=torch.long, device=dev) for _ in range(3))
        bar = tqdm(total=L, disable=not o["progress"], desc="tokens", leave=False)
        while bool((n < L).any()):
            active = n < L
            kk = (L - n).clamp(0, W)
            target.feed(buf, torch.where(active, torch.minimum(n + kk, torch.full_like(n, L - 1)), target.cached))
            t = n[:, None] + torch.arange(W + 1, device=dev)
            P = processed_laws(target.laws(t), B, t, **topts)  # [B, W + 1, V]: law of token n + i
            drafts = buf.gather(1, (n[:, None] + offsets).clamp_max(L - 1))
            accepted, y = accept_drafts(P, Q, drafts, kk, generator, self._residual)
            emitted = torch.where(active & (n + accepted < L), accepted + 1, accepted)
            fix = active & (emitted > accepted)
            buf[rows[fix], (n + accepted)[fix]] = y[fix]
            self._rollback(target, n + accepted, True)
            rounds += active.long()
            acc += torch.where(active, accepted, 0)
            prop += kk
            # the next window: positions predicted in this pass redraw from p there, later ones uniformly
            ahead = emitted[:, None] + offsets  # [B, W]: index into P of the new window's positions
            seen = ahead <= kk[:, None]
            Q = torch.where(seen[..., None], P.gather(1, ahead.clamp_max(W)[..., None].expand(-1, -1, V)), uniform)
            x = sample_categorical(Q, generator)
            before = int(n.min())
            n = n + emitted
            pos = n[:, None] + offsets
            inside = pos < L
            buf[rows[:, None].expand(-1, W)[inside], pos[inside]] = x[inside]
            bar.update(int(n.min()) - before)
        bar.close()
        iterations = int(rounds.max())
        return self.finish(model, buf, target, rounds, acc, prop, draft_passes=0, iterations=iterations)


__all__ = ["JacobiSampler"]
