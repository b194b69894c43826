"""FlowAR: next-scale prediction of a continuous latent, each scale drawn by flow matching.

Ren et al., "FlowAR: Scale-wise Autoregressive Image Generation Meets Flow Matching" (ICML 2025);
numerics follow the official code (``OliverRensu/FlowAR``), see ``../shared/fixtures/flowar/README.md``.

* The scaled KL latent ``[B, C, S, S]`` is turned into a pyramid of area-downsampled maps, one per
  scale ``s in scales`` (``1, 2, 4, 8, 16``). The sequence holds all scales, coarse to fine, each
  row-major: ``L = sum(s^2)`` positions (341).
* The input at scale ``k + 1`` is the scale-``k`` map, bicubic-upsampled to ``S x S`` and then
  area-downsampled to the next side; the input of the first scale is the class embedding itself.
* An encoder and a decoder stack of :class:`~visar.nn.adaln_block.AdaLNBlock` (adaLN from the class
  embedding, block-causal over scales, 2D RoPE with each scale stretched onto the ``S``-grid) give
  ``z [B, L, D]``; the flow head (:mod:`visar.generators.components.flow_head_transformer`) turns noise into the
  tokens of each scale given ``z`` of that scale.
* The encoder-decoder is :class:`~visar.generators.components.adaln_encoder_decoder.AdaLNEncoderDecoder`, shared
  with xAR.
* Sampling (:mod:`visar.samplers.next_scale_flow`): per scale an Euler ODE from ``t = 1`` (noise) to
  ``t = 0`` on the official time grid, float64 state and float32 model calls, a linear CFG ramp over
  scales and a guidance interval on ``t``. The generator exposes the step protocol
  (:meth:`NextScaleFlowGenerator.start`, ``step``, ``head_velocity``, ``set_next_input``, ``to_latents``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from visar.generators.components.adaln_encoder_decoder import AdaLNEncoderDecoder, TrunkState, check_rope_width
from visar.generators.base import Condition, Generator
from visar.generators.components.draws import check_draw, drop_labels
from visar.generators.components.entities import ScalePyramid
from visar.generators.components.flow_head_transformer import FlowHeadTransformer
from visar.nn.embeddings import LabelEmbedding
from visar.nn.kv_cache import CacheState
from visar.nn.rope import grid_positions
from visar.registry import Preset, register
from visar.utils.config import register_config
from visar.utils.validation import check_labels


def tokens_to_map(seq: torch.Tensor) -> torch.Tensor:
    """``[B, s*s, C]`` row-major tokens -> ``[B, C, s, s]``."""
    B, N, C = seq.shape
    s = int(round(math.sqrt(N)))
    return seq.transpose(1, 2).reshape(B, C, s, s)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, s, s]`` -> ``[B, s*s, C]`` row-major."""
    return x.flatten(2).transpose(1, 2)


@dataclass
class ScaleFlowState(TrunkState):
    """Decoding state of :class:`NextScaleFlowGenerator` (rows ``[cond; null]`` when guided).

    Attributes:
        c: ``[R, D]`` class embeddings (the adaLN condition and the input of scale 0).
        prefix: ``[R, L, D]`` embedded inputs so far (uncached path only: the whole prefix is re-run per scale).
        inputs: ``[R, n_k, D]`` embedded input of the scale that :meth:`~NextScaleFlowGenerator.step` runs next.
    """

    c: torch.Tensor | None = None
    prefix: torch.Tensor | None = None


@register("family", "flowar")
class NextScaleFlowGenerator(AdaLNEncoderDecoder, Generator):
    """FlowAR generator over scaled continuous latents ``[B, in_channels, S, S]`` (``S = scales[-1]``).

    Implements :class:`~visar.generators.protocol.NextScaleModel` (``emits = "condition"``: ``z`` for the
    flow head); its default sampler is :class:`visar.samplers.next_scale_flow.NextScaleFlowSampler`.

    Args:
        num_classes: classes; row ``num_classes`` of the class table is the CFG null class.
        in_channels: latent channels (16 for MAR's KL-16).
        scales: strictly increasing sides, the last one the latent side ``S``.
        width, encoder_depth, decoder_depth, num_heads, mlp_ratio: AR transformer (both stacks share
            width and heads, as in every released model).
        head_width, head_depth, head_num_heads, head_cross: flow head (``head_num_heads`` defaults to
            ``head_width // 64``; ``head_cross`` picks the cross-attention block of FlowAR-L/H).
        label_drop_prob: label dropout for CFG training.
        attn_dropout, proj_dropout: dropout in the AR blocks (training only).
    """

    family = "flowar"
    token_kind = "continuous"
    emits = "condition"
    default_sampler = "next_scale_flow"

    @register_config
    def __init__(self, num_classes: int = 1000, in_channels: int = 16, scales: tuple[int, ...] = (1, 2, 4, 8, 16),
                 width: int = 768, encoder_depth: int = 6, decoder_depth: int = 6, num_heads: int = 12,
                 mlp_ratio: float = 4.0, head_width: int = 1024, head_depth: int = 2,
                 head_num_heads: int | None = None, head_cross: bool = False, label_drop_prob: float = 0.1,
                 attn_dropout: float = 0.0, proj_dropout: float = 0.0):
        super().__init__()
        scales = tuple(int(s) for s in scales)
        if not scales or any(b <= a for a, b in zip(scales, scales[1:])) or scales[0] < 1:
            raise ValueError(f"scales must be strictly increasing positive sides, got {scales}")
        check_rope_width(width, num_heads)
        head_num_heads = head_num_heads or max(1, head_width // 64)
        check_rope_width(head_width, head_num_heads, "head width")
        self.num_classes, self.in_channels, self.scales = num_classes, in_channels, scales
        self.latent_side = scales[-1]
        self.pyramid = ScalePyramid(self.latent_side, self.latent_side, list(scales))  # area pyramid of a latent
        self.label_drop_prob = label_drop_prob
        self.seq_len = sum(s * s for s in scales)

        self.class_emb = LabelEmbedding(num_classes, width)
        self.build_encoder_decoder(in_channels, width, num_heads, self.seq_len, encoder_depth, decoder_depth,
                                   mlp_ratio, attn_dropout, proj_dropout)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, width))
        self.flownet = FlowHeadTransformer(in_channels, width, head_width, head_depth, head_num_heads,
                                           cross=head_cross, mlp_ratio=mlp_ratio, rope_grid=self.latent_side)

        rows, cols = zip(*(grid_positions(s, stretch_to=self.latent_side) for s in scales))
        self.register_layout([s * s for s in scales], torch.cat(rows), torch.cat(cols))
        self._init_weights()

    def _init_weights(self) -> None:
        for p in (self.encoder_pos_embed_learned, self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned,
                  self.class_emb.embedding_table.weight):
            nn.init.normal_(p, std=0.02)

    # ------------------------------------------------------------------ layout
    @property
    def offsets(self) -> list[int]:
        """Start of each scale in the sequence, plus ``L`` at the end."""
        out = [0]
        for s in self.scales:
            out.append(out[-1] + s * s)
        return out

    def next_scale_input(self, prev: torch.Tensor, side: int) -> torch.Tensor:
        """Input map of the next scale: ``[B, C, s, s]`` -> bicubic to ``S x S`` -> area to ``side``."""
        up = F.interpolate(prev, size=(self.latent_side, self.latent_side), mode="bicubic", align_corners=False)
        return F.interpolate(up, size=(side, side), mode="area")

    def teacher_inputs(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets ``[B, L, C]`` (area pyramid) and next-scale inputs ``[B, L - 1, C]`` of a latent."""
        maps = self.pyramid.maps(latents)
        targets = torch.cat([map_to_tokens(m) for m in maps], dim=1)
        inputs = [map_to_tokens(self.next_scale_input(m, s)) for m, s in zip(maps[:-1], self.scales[1:])]
        return targets, torch.cat(inputs, dim=1) if inputs else targets[:, :0]

    # ------------------------------------------------------------------ transformer
    def transformer(self, x: torch.Tensor, c: torch.Tensor, start: int = 0, cache: CacheState | None = None,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder + decoder over positions ``[start, start + n)``.

        Args:
            x: ``[B, n, D]`` embedded inputs (class embedding for position 0, ``z_proj`` of maps after).
            c: ``[B, D]`` class embedding (adaLN condition).
            start: sequence position of ``x[:, 0]``.
            cache: static KV cache; the new keys/values are written at ``start`` and the queries attend
                to positions ``[0, start + n)`` (only valid when ``x`` is one whole scale).
            mask: additive mask ``[n, start + n]`` when no cache is used (block-causal rows).
        Returns:
            ``z [B, n, D]``.
        """
        end = start + x.shape[1]
        return self.encode_decode(x, c, start, cache, mask) + self.diffusion_pos_embed_learned[:, start:end]

    def forward(self, latents: torch.Tensor, labels: torch.Tensor, drop_labels: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Teacher-forced pass: ``latents [B, C, S, S]``, ``labels [B]`` -> ``z [B, L, D]``.

        ``drop_labels`` applies the ``label_drop_prob`` dropout to the null class (training).
        """
        self.check_latents(latents)
        check_labels(labels, self.num_classes, allow_null=True)
        c = self.class_emb(labels.to(latents.device), self.label_drop_prob if drop_labels else 0.0, generator)
        _, inputs = self.teacher_inputs(latents)
        x = torch.cat([c[:, None], self.z_proj(inputs)], dim=1)  # [B, L, D]
        return self.transformer(x, c, mask=self.mask.to(x.dtype))

    #: ``optim.ema: official``: FlowAR's ``update_ema`` with ``--ema_rate 0.9999`` after every step
    official_ema_decay = 0.9999

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay besides 1-D tensors and biases (timm's convention): none. FlowAR
        reuses MAR's ``add_weight_decay``, whose ``diffloss`` exemption matches no FlowAR name (its head is
        ``flownet``), so the flow head, positional tables and class table all decay."""
        return set()

    def loss(self, tokens: torch.Tensor, cond: Condition, generator: torch.Generator | None = None, *,
             drop: torch.Tensor | None = None, t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching loss as in the official training code: per image and scale ``t ~ U(0, 1)``,
        ``x_t = (1 - t) x + t eps``, MSE between the head's velocity and ``eps - x``; scale ``k``'s mean
        is weighted by ``s_k^2 / S^2`` and the scales are summed (so the finest scale has weight 1).

        ``tokens``: scaled latents ``[B, C, S, S]``; labels are dropped to the null class with
        probability ``label_drop_prob`` (training mode). Draws are made from ``generator`` in the official
        order (label drop, then per scale ``t`` and ``eps``) unless given:

        Args:
            drop: ``[B]`` bool, True = label replaced by the null class (applied in any mode).
            t: ``[K, B]`` flow times in ``[0, 1]`` (1 = noise), one per scale and image.
            noise: ``[B, L, C]`` ``eps`` of all scales in sequence order (scale by scale, row-major).
        """
        cond = Condition.of(cond)
        self.check_condition(cond)
        self.check_latents(tokens)
        B, dev, K = tokens.shape[0], tokens.device, len(self.scales)
        labels = cond.labels.to(dev)
        labels = drop_labels(labels, drop, self.label_drop_prob, self.training, self.num_classes, generator)
        if t is not None:
            t = check_draw("t", t, (K, B), "real", dev, torch.get_default_dtype(), low=0.0, high=1.0)
        if noise is not None:
            noise = check_draw("noise", noise, (B, self.seq_len, self.in_channels), "real", dev,
                               torch.get_default_dtype())  # the dtype of the draw it replaces
        z = self.forward(tokens, labels)
        targets, _ = self.teacher_inputs(tokens)
        off, total = self.offsets, 0.0
        for k, s in enumerate(self.scales):
            x = targets[:, off[k]:off[k + 1]]
            t_k = torch.rand(B, generator=generator, device=dev) if t is None else t[k]
            eps = (torch.randn(x.shape, generator=generator, device=dev) if noise is None
                   else noise[:, off[k]:off[k + 1]])
            x_t = (1 - t_k[:, None, None]) * x + t_k[:, None, None] * eps
            v = self.flownet(x_t, t_k, z[:, off[k]:off[k + 1]])
            per_image = (v - (eps - x)).pow(2).mean(dim=(1, 2))  # [B]
            total = total + per_image.mean() / self.latent_side ** 2 * s ** 2
        return total

    # ------------------------------------------------------------------ step protocol (NextScaleModel)
    def start(self, cond: Condition, guided: bool = False, use_cache: bool = True) -> ScaleFlowState:
        """Class embeddings of the ``R`` rows (``[cond; null]`` when ``guided``), an empty static cache over
        all scales (``use_cache=False``: an embedded prefix re-run at every scale instead) and the input
        of scale 0 (the class embedding)."""
        cond = Condition.of(cond)
        if cond.labels is None:
            raise ValueError(f"{type(self).__name__} is class-conditional: give class ids, not text features")
        dev = self.class_emb.embedding_table.weight.device
        labels = cond.labels.to(dev)
        B = labels.shape[0]
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, self.num_classes)])
        c = self.class_emb(labels)  # [R, D]
        R = labels.shape[0]
        cache = self.new_cache(R, c.dtype, dev) if use_cache else None
        prefix = None if use_cache else c.new_zeros(R, self.seq_len, self.width)
        return ScaleFlowState(batch=B, guided=guided, device=dev, cache=cache, inputs=c[:, None], c=c, prefix=prefix)

    def step(self, state: ScaleFlowState, k: int) -> torch.Tensor:
        """Run scale ``k`` on ``state.inputs``: ``z [R, s_k^2, D]``, the flow head's condition."""
        start, end = self.offsets[k], self.offsets[k + 1]
        if state.cache is not None:
            return self.transformer(state.inputs, state.c, start, cache=state.cache)
        state.prefix[:, start:end] = state.inputs
        mask = self.mask[:end, :end].to(state.c.dtype)
        return self.transformer(state.prefix[:, :end], state.c, mask=mask)[:, start:]

    def head_velocity(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The flow head: velocity ``[R', n, C]`` of ``x [R', n, C]`` (any float dtype; run in ``z``'s dtype)
        at flow times ``t [R']`` (float32, ``1`` = noise) given ``z [R', n, D]``."""
        return self.flownet(x.to(z.dtype), t, z)

    def set_next_input(self, state: ScaleFlowState, k: int, tokens: torch.Tensor) -> None:
        """Make scale ``k``'s drawn tokens ``[B, s_k^2, C]`` (any float dtype) the input of scale ``k + 1``:
        bicubic up to ``S x S`` and area down (in float32), ``z_proj``, repeated for both CFG halves."""
        nxt = map_to_tokens(self.next_scale_input(tokens_to_map(tokens.float()), self.scales[k + 1]))
        x_in = self.z_proj(nxt.to(state.c.dtype))
        state.inputs = torch.cat([x_in, x_in]) if state.guided else x_in

    def to_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """Finest-scale tokens ``[B, S*S, C]`` -> latents ``[B, C, S, S]`` in the model's dtype."""
        return tokens_to_map(tokens.to(self.class_emb.embedding_table.weight.dtype))


_EVAL_SRC = "FlowAR README (OliverRensu/FlowAR @21835c0), see ../shared/fixtures/flowar/README.md"

PRESETS = {
    "flowar-s": Preset(
        cls="visar.generators.next_scale.flowar:NextScaleFlowGenerator",
        kwargs=dict(width=768, encoder_depth=6, decoder_depth=6, num_heads=12, head_width=1024, head_depth=2,
                    head_cross=False),
        paper="FlowAR-S (Ren et al., ICML 2025), FlowAR-S.pth, 171,718,072 parameters",
        eval=dict(image_size=256, num_steps=25, cfg_scale=4.3, guidance_high=0.9, tokenizer="mar-kl16",
                  source=_EVAL_SRC)),
    "flowar-l": Preset(
        cls="visar.generators.next_scale.flowar:NextScaleFlowGenerator",
        kwargs=dict(width=1024, encoder_depth=8, decoder_depth=8, num_heads=16, head_width=1024, head_depth=12,
                    head_cross=True),
        paper="FlowAR-L (Ren et al., ICML 2025), FlowAR-L.pth, 586,862,912 parameters",
        eval=dict(image_size=256, num_steps=25, cfg_scale=2.4, guidance_high=0.9, tokenizer="mar-kl16",
                  source=_EVAL_SRC)),
    "flowar-h": Preset(
        cls="visar.generators.next_scale.flowar:NextScaleFlowGenerator",
        kwargs=dict(width=1536, encoder_depth=15, decoder_depth=15, num_heads=16, head_width=1536, head_depth=12,
                    head_cross=True),
        paper="FlowAR-H (Ren et al., ICML 2025), FlowAR-H.pth, 1,913,316,880 parameters",
        eval=dict(image_size=256, num_steps=50, cfg_scale=2.4, guidance_high=0.7, tokenizer="mar-kl16",
                  source=_EVAL_SRC)),
    "flowar-tiny": Preset(
        cls="visar.generators.next_scale.flowar:NextScaleFlowGenerator",
        kwargs=dict(width=32, encoder_depth=2, decoder_depth=2, num_heads=2, head_width=64, head_depth=2,
                    head_cross=False),
        paper="tiny twin with random weights, the configuration of the FlowAR parity fixtures "
              "(16x16x16 latents: 64 px with kl-tiny, 256 px with mar-kl16)",
        eval=dict(image_size=64, num_steps=6, cfg_scale=3.0, guidance_high=0.9, tokenizer="kl-tiny",
                  source="visar test configuration (fixture sample_cfg settings)")),
}
