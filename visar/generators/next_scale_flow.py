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
  ``z [B, L, D]``; the flow head (:mod:`visar.generators.flow_head_transformer`) turns noise into the
  tokens of each scale given ``z`` of that scale.
* Sampling: per scale an Euler ODE from ``t = 1`` (noise) to ``t = 0`` on the official time grid,
  float64 state and float32 model calls, a linear CFG ramp over scales and a guidance interval on
  ``t`` (:func:`euler_time_grid`, :meth:`NextScaleFlowGenerator.sample`).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from visar.generators.base import Condition, Generator
from visar.generators.entities import ScalePyramid, block_causal_mask
from visar.generators.flow_head_transformer import FlowHeadTransformer
from visar.nn.adaln_block import AdaLNBlock
from visar.nn.embeddings import LabelEmbedding
from visar.nn.kv_cache import CacheState
from visar.nn.norms import RMSNorm
from visar.nn.rope import grid_positions, rope_2d_angles, rope_tables
from visar.utils.config import register_config
from visar.utils.validation import check_labels
from visar.zoo import Preset
from visar.nn.guidance import cfg_mix


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


def tokens_to_map(seq: torch.Tensor) -> torch.Tensor:
    """``[B, s*s, C]`` row-major tokens -> ``[B, C, s, s]``."""
    B, N, C = seq.shape
    s = int(round(math.sqrt(N)))
    return seq.transpose(1, 2).reshape(B, C, s, s)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, s, s]`` -> ``[B, s*s, C]`` row-major."""
    return x.flatten(2).transpose(1, 2)


class NextScaleFlowGenerator(Generator):
    """FlowAR generator over scaled continuous latents ``[B, in_channels, S, S]`` (``S = scales[-1]``).

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
        if width % num_heads or (width // num_heads) % 4:
            raise ValueError(f"width {width} / {num_heads} heads must give a head dim divisible by 4 (2D RoPE)")
        head_num_heads = head_num_heads or max(1, head_width // 64)
        if head_width % head_num_heads or (head_width // head_num_heads) % 4:
            raise ValueError(f"head width {head_width} / {head_num_heads} heads must give a head dim divisible by 4")
        self.num_classes, self.in_channels, self.scales = num_classes, in_channels, scales
        self.latent_side = scales[-1]
        self.pyramid = ScalePyramid(self.latent_side, self.latent_side, list(scales))  # area pyramid of a latent
        self.width, self.num_heads, self.label_drop_prob = width, num_heads, label_drop_prob
        self.seq_len = sum(s * s for s in scales)
        L, D = self.seq_len, width

        self.class_emb = LabelEmbedding(num_classes, D)
        self.z_proj = nn.Linear(in_channels, D)
        self.z_proj_ln = RMSNorm(D, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L, D))
        self.encoder_blocks = nn.ModuleList(
            AdaLNBlock(D, num_heads, mlp_ratio, qkv_bias=True, attn_dropout=attn_dropout, proj_dropout=proj_dropout)
            for _ in range(encoder_depth))
        self.encoder_norm = RMSNorm(D, eps=1e-6)
        self.decoder_embed = nn.Linear(D, D)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, L, D))
        self.decoder_blocks = nn.ModuleList(
            AdaLNBlock(D, num_heads, mlp_ratio, qkv_bias=True, attn_dropout=attn_dropout, proj_dropout=proj_dropout)
            for _ in range(decoder_depth))
        self.decoder_norm = RMSNorm(D, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, L, D))
        self.flownet = FlowHeadTransformer(in_channels, D, head_width, head_depth, head_num_heads,
                                           cross=head_cross, mlp_ratio=mlp_ratio, rope_grid=self.latent_side)

        self.register_buffer("mask", block_causal_mask([s * s for s in scales]), persistent=False)
        rows, cols = zip(*(grid_positions(s, stretch_to=self.latent_side) for s in scales))
        cos, sin = rope_tables(rope_2d_angles(torch.cat(rows), torch.cat(cols), D // num_heads))
        self.register_buffer("rope_cos", cos, persistent=False)  # [L, head_dim/2]
        self.register_buffer("rope_sin", sin, persistent=False)
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

    @property
    def num_layers(self) -> int:
        return len(self.encoder_blocks) + len(self.decoder_blocks)

    def check_latents(self, latents: torch.Tensor) -> None:
        """``latents`` must be a float ``[B, in_channels, S, S]`` tensor (scaled KL latents)."""
        S = self.latent_side
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError(f"latents must be a float tensor [B, {self.in_channels}, {S}, {S}]")
        if latents.dim() != 4 or tuple(latents.shape[1:]) != (self.in_channels, S, S):
            raise ValueError(f"latents must have shape [B, {self.in_channels}, {S}, {S}] (scaled KL latents of a "
                             f"{S * 16}px image for KL-16), got {tuple(latents.shape)}")

    def check_tokenizer(self, tokenizer) -> None:
        super().check_tokenizer(tokenizer)
        ch = getattr(tokenizer, "latent_channels", None)
        if ch is not None and ch != self.in_channels:
            raise ValueError(f"the tokenizer has {ch} latent channels but this generator models {self.in_channels}")

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
        rope = (self.rope_cos[start:end], self.rope_sin[start:end])
        h = self.z_proj_ln(x + self.encoder_pos_embed_learned[:, start:end])
        n_enc = len(self.encoder_blocks)
        for i, blk in enumerate(self.encoder_blocks):
            h = blk(h, c, rope=rope, mask=mask, cache=cache.layers[i] if cache else None, cache_pos=start,
                    attend_len=end)
        h = self.encoder_norm(h)
        h = self.decoder_embed(h) + self.decoder_pos_embed_learned[:, start:end]
        for i, blk in enumerate(self.decoder_blocks):
            h = blk(h, c, rope=rope, mask=mask, cache=cache.layers[n_enc + i] if cache else None, cache_pos=start,
                    attend_len=end)
        return self.decoder_norm(h) + self.diffusion_pos_embed_learned[:, start:end]

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

    def loss(self, tokens: torch.Tensor, cond: Condition, generator: torch.Generator | None = None) -> torch.Tensor:
        """Flow-matching loss as in the official training code: per image and scale ``t ~ U(0, 1)``,
        ``x_t = (1 - t) x + t eps``, MSE between the head's velocity and ``eps - x``; scale ``k``'s mean
        is weighted by ``s_k^2 / S^2`` and the scales are summed (so the finest scale has weight 1).

        ``tokens``: scaled latents ``[B, C, S, S]``; labels are dropped to the null class with
        probability ``label_drop_prob``.
        """
        cond = Condition.of(cond)
        self.check_condition(cond)
        self.check_latents(tokens)
        B, dev = tokens.shape[0], tokens.device
        z = self.forward(tokens, cond.labels, drop_labels=self.training, generator=generator)
        targets, _ = self.teacher_inputs(tokens)
        off, total = self.offsets, tokens.new_zeros(())
        for k in range(len(self.scales)):
            x = targets[:, off[k]:off[k + 1]]
            t = torch.rand(B, generator=generator, device=dev)
            eps = torch.randn(x.shape, generator=generator, device=dev)
            x_t = (1 - t[:, None, None]) * x + t[:, None, None] * eps
            v = self.flownet(x_t, t, z[:, off[k]:off[k + 1]])
            total = total + (v - (eps - x)).pow(2).sum()
        return total / (B * self.in_channels * self.latent_side ** 2)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, cond: Condition | list | torch.Tensor | int, generator: torch.Generator | None = None,
               num_steps: int = 25, cfg_scale: float = 4.3, guidance_high: float = 0.9, guidance_low: float = 0.0,
               use_cache: bool = True, callback: Callable[[dict], None] | None = None) -> torch.Tensor:
        """Draw latents scale by scale.

        Args:
            cond: class ids (``[B]``) or a :class:`Condition`.
            generator: ``torch.Generator`` for the noise (CPU generators also work for CUDA models: the
                noise is drawn on the generator's device, as the official sampler does).
            num_steps: Euler grid size (:func:`euler_time_grid`; 25 gives 24 steps, 50 gives 50).
            cfg_scale: classifier-free guidance at the finest scale; scale ``k`` uses
                ``1 + (cfg_scale - 1) k / (K - 1)``, applied where it is ``> 1`` (as the official sampler
                does). ``cfg_scale <= 1`` disables guidance and skips the unconditional rows (the official
                sampler fails at exactly 1).
            guidance_high, guidance_low: guidance is applied while ``guidance_low <= t <= guidance_high``;
                before that the conditional and unconditional halves evolve on their own noise.
            use_cache: keep keys/values of earlier scales in a static cache (``False`` re-runs the
                whole prefix through the block-causal transformer at every scale; same result).
            callback: called after each scale with ``{"scale", "latents", "condition", "out", "cfg_scale"}``
                (noise, z, float64 final state of all rows).
        Returns:
            ``[B, C, S, S]`` scaled latents in the model's dtype (decode with the KL tokenizer).
        """
        cond = Condition.of(cond)
        if cond.labels is None:
            raise ValueError(f"{type(self).__name__} is class-conditional: give class ids, not text features")
        self.check_condition(cond)
        grid = euler_time_grid(num_steps)
        if not math.isfinite(cfg_scale) or cfg_scale < 0:
            raise ValueError(f"cfg_scale must be a finite number >= 0 (<= 1 disables guidance), got {cfg_scale}")
        if not (0.0 <= guidance_low <= guidance_high <= 1.0):
            raise ValueError(f"need 0 <= guidance_low <= guidance_high <= 1, got {guidance_low}, {guidance_high}")
        dev = self.class_emb.embedding_table.weight.device
        labels = cond.labels.to(dev)
        B, C = labels.shape[0], self.in_channels
        guided = cfg_scale > 1.0  # official: guidance only for cfg > 1 (at cfg <= 1 the halves never mix)
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, self.num_classes)])
        rows = labels.shape[0]
        c = self.class_emb(labels)  # [rows, D]
        off, K = self.offsets, len(self.scales)
        cache = (CacheState(self.num_layers, rows, self.seq_len, self.num_heads, self.width // self.num_heads,
                            dtype=c.dtype, device=dev) if use_cache else None)
        prefix = c.new_zeros(rows, self.seq_len, self.width)  # embedded inputs, for the uncached path
        x_in = c[:, None]
        noise_dev = generator.device if generator is not None else dev
        out_rows = None
        for k, s in enumerate(self.scales):
            start, end = off[k], off[k + 1]
            if use_cache:
                z = self.transformer(x_in, c, start, cache=cache)
            else:
                prefix[:, start:end] = x_in
                z = self.transformer(prefix[:, :end], c, mask=self.mask[:end, :end].to(c.dtype))[:, start:]
            noise = torch.randn(rows, s * s, C, generator=generator, device=noise_dev).to(dev)
            cfg_k = 1.0 + (cfg_scale - 1.0) * k / max(K - 1, 1)
            out_rows = self._euler(noise, z, grid, cfg_k, guided, guidance_low, guidance_high)
            if callback is not None:
                callback({"scale": k, "latents": noise, "condition": z, "out": out_rows, "cfg_scale": cfg_k})
            sample_k = out_rows[:B].float()  # [B, s*s, C]
            if k + 1 < K:
                nxt = map_to_tokens(self.next_scale_input(tokens_to_map(sample_k), self.scales[k + 1]))
                x_in = self.z_proj(nxt.to(c.dtype))
                if guided:
                    x_in = torch.cat([x_in, x_in])
        return tokens_to_map(out_rows[:B].to(c.dtype))

    def _euler(self, noise: torch.Tensor, z: torch.Tensor, grid: torch.Tensor, cfg: float, guided: bool,
               low: float, high: float) -> torch.Tensor:
        """Euler ODE of one scale from ``grid[0]`` to ``grid[-1]``; float64 state, float32 head calls.

        With guidance, rows are ``[cond; uncond]``; inside the interval the head is called on the
        conditional half twice (``[x_c; x_c]`` with the conditional and unconditional ``z``) and both
        halves of the state move by ``d_u + cfg (d_c - d_u)``; outside it each half moves on its own.
        Returns the float64 final state of all rows ``[rows, n, C]``.
        """
        x = noise.to(torch.float64)
        B = x.shape[0] // 2
        ts = grid.tolist()
        for t_cur, t_next in zip(ts[:-1], ts[1:]):
            in_interval = guided and cfg > 1.0 and low <= t_cur <= high
            # inside the interval the head sees the conditional half twice; the state keeps both halves
            x_model = torch.cat([x[:B], x[:B]]) if in_interval else x
            t = torch.full((x.shape[0],), t_cur, dtype=torch.float64, device=x.device).float()
            d = self.flownet(x_model.to(z.dtype), t, z).double()  # model in its dtype, the rest in float64
            if in_interval:
                d_c, d_u = d.chunk(2)
                d = cfg_mix(d_c, d_u, cfg)
                d = torch.cat([d, d])
            x = x + (t_next - t_cur) * d
        return x


_EVAL_SRC = "FlowAR README (OliverRensu/FlowAR @21835c0), see ../shared/fixtures/flowar/README.md"

PRESETS = {
    "flowar-s": Preset(
        cls="visar.generators.next_scale_flow:NextScaleFlowGenerator",
        kwargs=dict(width=768, encoder_depth=6, decoder_depth=6, num_heads=12, head_width=1024, head_depth=2,
                    head_cross=False),
        paper="FlowAR-S (Ren et al., ICML 2025), FlowAR-S.pth, 171,718,072 parameters",
        eval=dict(image_size=256, num_steps=25, cfg_scale=4.3, guidance_high=0.9, tokenizer="mar-kl16",
                  source=_EVAL_SRC)),
    "flowar-l": Preset(
        cls="visar.generators.next_scale_flow:NextScaleFlowGenerator",
        kwargs=dict(width=1024, encoder_depth=8, decoder_depth=8, num_heads=16, head_width=1024, head_depth=12,
                    head_cross=True),
        paper="FlowAR-L (Ren et al., ICML 2025), FlowAR-L.pth, 586,862,912 parameters",
        eval=dict(image_size=256, num_steps=25, cfg_scale=2.4, guidance_high=0.9, tokenizer="mar-kl16",
                  source=_EVAL_SRC)),
    "flowar-h": Preset(
        cls="visar.generators.next_scale_flow:NextScaleFlowGenerator",
        kwargs=dict(width=1536, encoder_depth=15, decoder_depth=15, num_heads=16, head_width=1536, head_depth=12,
                    head_cross=True),
        paper="FlowAR-H (Ren et al., ICML 2025), FlowAR-H.pth, 1,913,316,880 parameters",
        eval=dict(image_size=256, num_steps=50, cfg_scale=2.4, guidance_high=0.7, tokenizer="mar-kl16",
                  source=_EVAL_SRC)),
    "flowar-tiny": Preset(
        cls="visar.generators.next_scale_flow:NextScaleFlowGenerator",
        kwargs=dict(width=32, encoder_depth=2, decoder_depth=2, num_heads=2, head_width=64, head_depth=2,
                    head_cross=False),
        paper="tiny twin with random weights, the configuration of the FlowAR parity fixtures "
              "(16x16x16 latents: 64 px with kl-tiny, 256 px with mar-kl16)",
        eval=dict(image_size=64, num_steps=6, cfg_scale=3.0, guidance_high=0.9, tokenizer="kl-tiny",
                  source="visar test configuration (fixture sample_cfg settings)")),
}
