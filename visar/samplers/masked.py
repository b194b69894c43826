"""MAR's masked random-order sampler (``sample_tokens`` of LTH14/mar), over the MaskedModel step protocol.

:class:`MaskedSampler` (registered ``"masked"``) drives any :class:`~visar.generators.protocol.MaskedModel`
(:class:`~visar.generators.masked.mar.MaskedGenerator`). With ``L`` tokens and ``num_iter`` iterations:

* one generation order per image: ``orders`` (``LongTensor [B, L]``), ``order_rng`` (numpy, the official
  stream: ``np.random.seed(0)`` is ``order_rng=0``) or ``torch.randperm`` rows from ``generator``, drawn
  before anything else; the *last* entries of an order are generated first;
* iteration ``s``: ``model.step`` gives ``z`` for every position; afterwards
  ``floor(L cos(pi/2 (s+1)/num_iter))`` tokens stay masked (clamped to ``[1, remaining - 1]``; the last
  iteration predicts every remaining token), and the token head draws the newly revealed ones
  (:func:`visar.samplers.heads.sample_head`, batched over the images);
* guidance iff ``cfg_scale != 1``: ``constant``, or ``linear`` ``1 + (cfg_scale - 1) (L - mask_len) / L``
  with the post-iteration ``mask_len``, in float32 tensor arithmetic as the official code (bit-exact).

With the same seeds on CPU this reproduces the official samples (``tests/test_mar_parity.py``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from visar.conditions import Condition
from visar.generators.components.heads import MODEL_X0_CLIP, check_head_x0_clip, check_x0_clip
from visar.generators.masked.mar import mask_by_order, numpy_orders
from visar.generators.protocol import MaskedModel
from visar.nn.guidance import is_guided
from visar.registry import register
from visar.samplers.base import Sampler
from visar.samplers.compiled import StepCompiler, head_network
from visar.samplers.heads import check_num_steps, sample_head
from visar.samplers.options import check_positive_int

#: the options and their defaults (``MaskedGenerator.sample`` before the sampler existed)
MASKED_DEFAULTS = dict(num_iter=64, cfg_scale=1.0, cfg_schedule="linear", temperature=1.0, num_steps=None,
                       orders=None, order_rng=None, final_noise=False, progress=False, x0_clip=MODEL_X0_CLIP,
                       compile=False)


def masked_count(step: int, num_iter: int, num_tokens: int, remaining: int) -> int:
    """Tokens still masked after iteration ``step``: MAR's cosine schedule, clamped to ``[1, remaining - 1]``."""
    mask_len = int(np.floor(num_tokens * np.cos(math.pi / 2.0 * (step + 1) / num_iter)))
    return max(1, min(remaining - 1, mask_len))


def most_tokens_per_iteration(num_iter: int, num_tokens: int) -> int:
    """The largest number of tokens one iteration of :class:`MaskedSampler` draws per image (the schedule of
    :func:`masked_count` does not depend on the orders)."""
    remaining, most = num_tokens, 0
    for step in range(num_iter):
        mask_len = masked_count(step, num_iter, num_tokens, remaining)
        most = max(most, remaining if step >= num_iter - 1 else remaining - mask_len)
        remaining = mask_len
    return most


def generation_orders(batch: int, num_tokens: int, orders: torch.Tensor | None, order_rng: Any,
                      generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``LongTensor [B, L]`` on ``device``: ``orders`` as given, numpy orders from ``order_rng``, or one
    ``torch.randperm`` per image from ``generator``."""
    if orders is None:
        if order_rng is not None:
            orders = numpy_orders(batch, num_tokens, order_rng)
        else:
            gen_device = generator.device if generator is not None else "cpu"
            orders = torch.stack([torch.randperm(num_tokens, generator=generator, device=gen_device)
                                  for _ in range(batch)])
    orders = orders.to(device)
    if orders.shape != (batch, num_tokens):
        raise ValueError(f"orders must be [B, {num_tokens}] = [{batch}, {num_tokens}], got {tuple(orders.shape)}")
    return orders


def step_cfg(scale: float, schedule: str, mask_len: int, num_tokens: int, device: torch.device) -> Any:
    """Guidance scale of a masked step: constant, or MAR's ramp ``1 + (s - 1)(L - mask_len) / L`` over the
    tokens known after the step, in float32 tensor arithmetic as the official code (bit-exact)."""
    if schedule == "linear":
        mlen = torch.tensor([float(mask_len)], device=device)
        return 1 + (scale - 1) * (num_tokens - mlen) / num_tokens
    return scale


@register("sampler", "masked")
class MaskedSampler(Sampler):
    """MAR's iterative masked sampler.

    Options (defaults reproduce the official ``sample_tokens`` apart from ``num_iter``, 64):
        num_iter: iterations, an integer in ``[1, L]``.
        cfg_scale: guidance scale ``>= 0`` on the head's noise / velocity (1 = none: no unconditional rows).
        cfg_schedule: ``"linear"`` (the official ramp over the masked fraction) or ``"constant"``.
        temperature: ``> 0``, scales the head's per-step noise.
        num_steps: head denoising steps per token (``None``: the head's ``num_sampling_steps``).
        orders: ``LongTensor [B, L]`` explicit generation orders (last entries first).
        order_rng: int seed / ``np.random.RandomState`` / ``np.random.Generator`` for the official orders.
        final_noise: keep the head's last-step noise (see :mod:`visar.samplers.heads`).
        progress: tqdm bar by iteration.
        x0_clip: diffusion head's clamp of the predicted clean token: ``"model"`` (the model's setting),
            ``None`` (the official sampler) or a number > 0.
        compile: ``torch.compile`` the diffusion head's network, its rows padded with zeros to the largest
            iteration of the schedule (one graph; :mod:`visar.samplers.compiled`). The transformer pass stays
            eager: its encoder sees only the visible tokens, a length that changes every iteration.

    Returns latents ``[B, C, h, w]``. ``stats``: ``rows_per_step`` (tokens drawn per iteration, all images),
    ``cfg_per_step`` (the guidance scale of each iteration), ``model_passes`` (transformer calls) and
    ``head_calls`` (batched head chains), both ``num_iter``; with ``compile``, ``compile_s`` and
    ``compiled_graphs``.
    """

    name = "masked"
    protocol = MaskedModel
    defaults = MASKED_DEFAULTS

    def head_tokens(self, head: Any, z: torch.Tensor, **head_options: Any) -> torch.Tensor:
        """The tokens ``[N, C]`` of one iteration from ``z [R, D]``: one batched head chain
        (:func:`~visar.samplers.heads.sample_head`); a subclass may change how the head is run."""
        return sample_head(head, z, **head_options)

    def validate(self, options: dict[str, Any]) -> None:
        check_positive_int("num_iter", options["num_iter"])
        check_num_steps(options["num_steps"])
        check_x0_clip(options["x0_clip"], allow_model=True)

    @torch.no_grad()
    def run(self, model: Any, cond: Condition, generator: torch.Generator | None, *, num_iter: int,
            cfg_scale: float, cfg_schedule: str, temperature: float, num_steps: int | None, orders, order_rng,
            final_noise: bool, progress: bool, x0_clip: Any, compile: bool) -> torch.Tensor:
        L = model.num_tokens
        check_positive_int("num_iter", num_iter, 1, L)
        check_head_x0_clip(model.head, x0_clip)
        guided = is_guided(cfg_scale)
        compiler = StepCompiler(next(model.parameters()).device, progress) if compile else None
        net = head_network(model.head) if compile else None
        state = model.start(cond, guided)
        B, dev = state.batch, state.device
        orders = generation_orders(B, L, orders, order_rng, generator, dev)
        mask = torch.ones(B, L, dtype=torch.bool, device=dev)
        tokens = torch.zeros(B, L, model.token_dim, device=dev, dtype=state.dtype)
        self.stats = {"rows_per_step": [], "cfg_per_step": [], "model_passes": 0, "head_calls": 0}
        # the head network sees every row of an iteration at once: [cond; uncond] when guided
        pad = most_tokens_per_iteration(num_iter, L) * B * (2 if guided else 1)
        with compiler.patch(net, "forward", "diffusion head network", pad_rows=pad) if compile else \
                contextlib.nullcontext():
            for step in tqdm(range(num_iter), disable=not progress, desc="MAR"):
                z = model.step(state, tokens, mask)  # [R, L, D]
                mask_len = masked_count(step, num_iter, L, int(mask[0].sum()))
                mask_next = mask_by_order(mask_len, orders)
                to_pred = mask if step >= num_iter - 1 else mask & ~mask_next
                mask = mask_next
                z = z[torch.cat([to_pred, to_pred], dim=0) if guided else to_pred]  # (half, image, position)
                cfg_iter = step_cfg(cfg_scale, cfg_schedule, mask_len, L, dev)
                new = self.head_tokens(model.head, z, steps=num_steps, cfg=cfg_iter, temperature=temperature,
                                       generator=generator, final_noise=final_noise, guided=guided, x0_clip=x0_clip)
                self.stats["rows_per_step"].append(int(z.shape[0]))
                self.stats["cfg_per_step"].append(float(cfg_iter))
                self.stats["model_passes"] += 1
                self.stats["head_calls"] += 1
                tokens = tokens.clone()
                tokens[to_pred] = new.to(tokens.dtype)
        if compiler is not None:
            self.stats.update(compiler.stats)
        return model.to_latents(tokens)


__all__ = ["MaskedSampler", "MASKED_DEFAULTS", "masked_count", "most_tokens_per_iteration", "generation_orders"]
