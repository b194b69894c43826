"""xAR: next-X prediction -- an autoregressive transformer over entities, each drawn by flow matching.

Ren et al. 2025, "Beyond Next-Token: Next-X Prediction for Autoregressive Visual Generation";
numerics follow the official code (``OliverRensu/xAR``), see ``../shared/fixtures/xar/README.md``.

* The scaled KL latent ``[B, C, H, W]`` is turned into a sequence of *entities* by an
  :class:`~visar.generators.entities.EntityLayout` -- token, cell, subsample, scale or image (the
  released models: 8 x 8 cells of a 16 x 16 grid, i.e. 4 entities of 64 tokens). The transformer is
  block-causal over entities; every entity type runs through the same model, loss, sampler and cache.
* There is no separate head: the transformer predicts the velocity ``v = eps - x`` of every token
  (``pred``), conditioned per entity on ``class_emb(label) + time_embed(t_int)`` through the adaLN of
  :class:`~visar.nn.adaln_block.AdaLNBlock`.
* Training, Noisy Context Learning: every entity gets its own ``t ~ sigmoid(N(0, 1))`` and its own
  noise, so each entity is predicted from *noisy* earlier entities (:meth:`NextXGenerator.loss`).
* Sampling: entity by entity, an Euler-Maruyama SDE on ``cat(linspace(1, 0.04, n), [0])`` with the
  drift built from the velocity's score, a linear CFG ramp over entities, and a static KV cache that
  is extended once per entity by re-encoding the previous entity at ``t = 0``
  (:meth:`NextXGenerator.sample`).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from visar.generators.base import Condition, Generator
from visar.generators.entities import EntityLayout, make_partition
from visar.nn.adaln_block import AdaLNBlock
from visar.nn.embeddings import LabelEmbedding, TimestepEmbedding, quantize_timestep, timestep_sinusoid
from visar.nn.kv_cache import CacheState
from visar.nn.norms import RMSNorm
from visar.nn.rope import rope_2d_angles, rope_tables
from visar.utils.config import register_config
from visar.utils.validation import check_labels
from visar.zoo import Preset
from visar.nn.guidance import cfg_mix


def em_time_grid(num_steps: int, t_min: float = 0.04) -> torch.Tensor:
    """xAR's Euler-Maruyama grid ``cat(linspace(1, t_min, n), [0])`` (float64, ``n + 1`` points).

    ``n - 1`` stochastic steps plus a final deterministic step from ``t_min`` to 0: ``n`` model calls
    per entity.
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    return torch.cat([torch.linspace(1, t_min, num_steps, dtype=torch.float64),
                      torch.zeros(1, dtype=torch.float64)])


class NextXGenerator(Generator):
    """xAR generator over scaled continuous latents ``[B, in_channels, latent_size, latent_size]``.

    Args:
        num_classes: classes; row ``num_classes`` of the class table is the CFG null class.
        in_channels: latent channels (16 for MAR's KL-16).
        latent_size: side of the latent grid (16 for 256 px with KL-16).
        cell: for ``entity="cell"``: entity = ``cell x cell`` tokens (must divide ``latent_size``; 8 in
            the released models).
        entity: entity type, a key of :data:`visar.generators.entities.ENTITY_TYPES`: ``"token"``,
            ``"cell"``, ``"subsample"``, ``"scale"`` or ``"image"`` (see ``docs/xar.md``).
        stride: for ``entity="subsample"``: ``stride^2`` entities of tokens ``stride`` apart (must divide
            ``latent_size``).
        scales: for ``entity="scale"``: increasing sides ending at ``latent_size`` (default ``[1, 2, 4,
            ..., latent_size]``); entity ``k`` is the latent area-downsampled to ``scales[k]^2`` tokens.
        width, encoder_depth, decoder_depth, num_heads, mlp_ratio: the transformer (both stacks share
            width and heads, as in every released model).
        label_drop_prob: label dropout for CFG training.
        attn_dropout, proj_dropout: dropout in the blocks (training only).
    """

    family = "xar"
    token_kind = "continuous"

    @register_config
    def __init__(self, num_classes: int = 1000, in_channels: int = 16, latent_size: int = 16, cell: int = 8,
                 width: int = 768, encoder_depth: int = 8, decoder_depth: int = 8, num_heads: int = 12,
                 mlp_ratio: float = 4.0, label_drop_prob: float = 0.1, attn_dropout: float = 0.0,
                 proj_dropout: float = 0.0, entity: str = "cell", stride: int = 2,
                 scales: list[int] | None = None):
        super().__init__()
        if width % num_heads or (width // num_heads) % 4:
            raise ValueError(f"width {width} / {num_heads} heads must give a head dim divisible by 4 (2D RoPE)")
        self.partition: EntityLayout = make_partition(entity, latent_size, latent_size, cell, stride=stride,
                                                      scales=scales)
        self.entity = entity
        self.num_classes, self.in_channels, self.latent_size = num_classes, in_channels, latent_size
        self.width, self.num_heads, self.label_drop_prob = width, num_heads, label_drop_prob
        N, D = self.partition.num_tokens, width

        self.class_emb = LabelEmbedding(num_classes, D)
        self.time_embed = TimestepEmbedding(D)
        self.z_proj = nn.Linear(in_channels, D)
        self.z_proj_ln = RMSNorm(D, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, N, D))
        self.encoder_blocks = nn.ModuleList(
            AdaLNBlock(D, num_heads, mlp_ratio, qkv_bias=True, attn_dropout=attn_dropout, proj_dropout=proj_dropout)
            for _ in range(encoder_depth))
        self.encoder_norm = RMSNorm(D, eps=1e-6)
        self.decoder_embed = nn.Linear(D, D)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, N, D))
        self.decoder_blocks = nn.ModuleList(
            AdaLNBlock(D, num_heads, mlp_ratio, qkv_bias=True, attn_dropout=attn_dropout, proj_dropout=proj_dropout)
            for _ in range(decoder_depth))
        self.decoder_norm = RMSNorm(D, eps=1e-6)
        self.pred = nn.Linear(D, in_channels)

        self.register_buffer("mask", self.partition.mask(), persistent=False)  # [N, N]
        here = torch.empty(0).device  # the default device (meta when built on the meta device)
        rows, cols = (p.to(here) for p in self.partition.positions())  # grid coordinates in sequence order
        cos, sin = rope_tables(rope_2d_angles(rows, cols, D // num_heads))
        self.register_buffer("rope_cos", cos, persistent=False)  # [N, hd/2], seq order
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("entity_index", torch.tensor(  # [N] entity of each sequence position
            [e for e, n in enumerate(self.partition.sizes) for _ in range(n)]), persistent=False)
        for p in (self.encoder_pos_embed_learned, self.decoder_pos_embed_learned,
                  self.class_emb.embedding_table.weight):
            nn.init.normal_(p, std=0.02)

    # ------------------------------------------------------------------ layout
    @property
    def num_layers(self) -> int:
        return len(self.encoder_blocks) + len(self.decoder_blocks)

    def check_latents(self, latents: torch.Tensor) -> None:
        """``latents`` must be a float ``[B, in_channels, latent_size, latent_size]`` tensor."""
        S = self.latent_size
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError(f"latents must be a float tensor [B, {self.in_channels}, {S}, {S}]")
        if latents.dim() != 4 or tuple(latents.shape[1:]) != (self.in_channels, S, S):
            raise ValueError(f"latents must have shape [B, {self.in_channels}, {S}, {S}] (scaled KL latents), "
                             f"got {tuple(latents.shape)}")

    def check_tokenizer(self, tokenizer) -> None:
        super().check_tokenizer(tokenizer)
        ch = getattr(tokenizer, "latent_channels", None)
        if ch is not None and ch != self.in_channels:
            raise ValueError(f"the tokenizer has {ch} latent channels but this generator models {self.in_channels}")

    # ------------------------------------------------------------------ transformer
    def entity_condition(self, labels: torch.Tensor, t: torch.Tensor, drop_prob: float = 0.0,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-entity condition ``class_emb(label) + time_embed(t_int)``: ``[B, E, D]``.

        ``t``: ``[B, E]`` flow times in ``[0, 1]`` (quantised with ``(t * 1000).long()`` in float32) or
        integer timesteps in ``[0, 1000]``.
        """
        t_int = t if not t.is_floating_point() else quantize_timestep(t)
        B, E = t_int.shape
        freqs = timestep_sinusoid(t_int.reshape(-1).to(labels.device), self.time_embed.freq_dim)
        temb = self.time_embed.mlp(freqs.to(self.pred.weight.dtype)).view(B, E, -1)
        return self.class_emb(labels, drop_prob, generator)[:, None] + temb

    def transformer(self, x: torch.Tensor, c: torch.Tensor, start: int = 0, cache: CacheState | None = None,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity of the tokens at sequence positions ``[start, start + n)``.

        Args:
            x: ``[B, n, C]`` noisy tokens in entity order.
            c: ``[B, n, D]`` per-token condition.
            cache: static KV cache; keys/values are written at ``start`` and the queries attend to
                ``[0, start + n)``.
            mask: additive mask ``[n, start + n]`` (rows of the block-causal mask) or ``None``.
        Returns:
            ``[B, n, C]`` velocity.
        """
        end = start + x.shape[1]
        rope = (self.rope_cos[start:end], self.rope_sin[start:end])
        h = self.z_proj_ln(self.z_proj(x) + self.encoder_pos_embed_learned[:, start:end])
        n_enc = len(self.encoder_blocks)
        for i, blk in enumerate(self.encoder_blocks):
            h = blk(h, c, rope=rope, mask=mask, cache=cache.layers[i] if cache else None, cache_pos=start,
                    attend_len=end)
        h = self.decoder_embed(self.encoder_norm(h)) + self.decoder_pos_embed_learned[:, start:end]
        for i, blk in enumerate(self.decoder_blocks):
            h = blk(h, c, rope=rope, mask=mask, cache=cache.layers[n_enc + i] if cache else None, cache_pos=start,
                    attend_len=end)
        return self.pred(self.decoder_norm(h))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, drop_labels: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Teacher-forced velocity of a whole noisy sequence.

        Args:
            x_t: ``[B, N, C]`` noisy tokens in entity order (:meth:`EntityLayout.to_sequence`).
            t: ``[B, E]`` per-entity flow time (float) or integer timestep.
            labels: ``[B]`` class ids (``num_classes`` = null class).
        Returns:
            ``[B, N, C]`` velocity ``eps - x``.
        """
        if x_t.dim() != 3 or x_t.shape[1:] != (self.partition.num_tokens, self.in_channels):
            raise ValueError(f"x_t must be [B, {self.partition.num_tokens}, {self.in_channels}], "
                             f"got {tuple(x_t.shape)}")
        if t.shape != (x_t.shape[0], self.partition.num_entities):
            raise ValueError(f"t must be [B, {self.partition.num_entities}] (one time per entity), "
                             f"got {tuple(t.shape)}")
        hi = 1.0 if t.is_floating_point() else 1000
        if t.numel() and (float(t.min()) < 0 or float(t.max()) > hi):
            raise ValueError(f"t must lie in [0, {hi}] (flow time, 1 = noise; integer timesteps up to 1000)")
        check_labels(labels, self.num_classes, allow_null=True)
        c = self.entity_condition(labels.to(x_t.device), t, self.label_drop_prob if drop_labels else 0.0, generator)
        c = c[:, self.entity_index]  # [B, N, D]
        return self.transformer(x_t, c, mask=self.mask.to(x_t.dtype))

    def loss(self, tokens: torch.Tensor, cond: Condition, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noisy Context Learning loss.

        Every entity gets ``t ~ sigmoid(N(0, 1))`` and its own noise; ``x_t = (1 - t) x + t eps``;
        MSE between the predicted velocity and ``eps - x`` over all tokens at once (block-causal mask,
        so every entity is predicted from noisy earlier ones). ``tokens``: ``[B, C, H, W]`` latents.
        """
        cond = Condition.of(cond)
        self.check_condition(cond)
        self.check_latents(tokens)
        x = self.partition.to_sequence(tokens)  # [B, N, C]
        B, dev = x.shape[0], x.device
        t = torch.sigmoid(torch.randn(B, self.partition.num_entities, generator=generator, device=dev))
        eps = torch.randn(x.shape, generator=generator, device=dev)
        t_tok = t[:, self.entity_index][..., None]  # [B, N, 1]
        x_t = (1 - t_tok) * x + t_tok * eps
        v = self.forward(x_t, t, cond.labels.to(dev), drop_labels=self.training, generator=generator)
        return (v - (eps - x)).pow(2).mean()

    # ------------------------------------------------------------------ sampling
    def _call(self, x_cur: torch.Tensor, t: float, k: int, done: list[torch.Tensor], labels: torch.Tensor,
              first: bool, cache: CacheState | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One model call for entity ``k`` at time ``t``; returns ``(velocity [R, n_k, C], model input)``.

        ``x_cur``: ``[R, n_k, C]`` float32 rows. ``done``: final float32 samples of entities ``< k``
        (``[R, n_j, C]`` each), re-encoded at ``t = 0``.
        """
        R, n_k = x_cur.shape[:2]
        off = self.partition.offsets()
        tt = torch.full((R, 1), t, dtype=torch.float64, device=x_cur.device)
        if cache is not None and (not first or k == 0):
            inp, start, mask, times = x_cur, off[k], None, tt
        elif cache is not None:
            # extend the cache once per entity: the previous entity, clean, then the current one
            inp, start = torch.cat([done[-1], x_cur], dim=1), off[k - 1]
            mask = self.mask[off[k - 1]:off[k + 1], :off[k + 1]].to(x_cur.dtype)
            times = torch.cat([torch.zeros_like(tt), tt], dim=1)
        else:
            inp, start = torch.cat([*done, x_cur], dim=1), 0
            mask = self.mask[:off[k + 1], :off[k + 1]].to(x_cur.dtype) if k else None
            times = torch.cat([torch.zeros(R, k, dtype=torch.float64, device=x_cur.device), tt], dim=1)
        first_entity = k - times.shape[1] + 1
        c = self.entity_condition(labels, times)  # [R, e, D]
        c = c[:, self.entity_index[off[first_entity]:off[k + 1]] - first_entity]
        v = self.transformer(inp, c, start, cache=cache, mask=mask)
        return v[:, -n_k:], inp

    @torch.no_grad()
    def sample(self, cond: Condition | list | torch.Tensor | int, generator: torch.Generator | None = None,
               num_steps: int = 40, cfg_scale: float = 2.7, use_cache: bool = True,
               callback: Callable[[dict], None] | None = None, method: str = "sde") -> torch.Tensor:
        """Draw latents entity by entity with the Euler-Maruyama sampler (or a deterministic Euler ODE).

        Per entity ``k``: ``x ~ N(0, I)`` (float32 draw, float64 state); for each step of
        :func:`em_time_grid` the model gives ``v``; score ``s = (-(1 - t) v - x) / t``, drift
        ``d = v - t s``; CFG ``d = d_u + cfg_k (d_c - d_u)`` with ``cfg_k = 1 + (cfg - 1) k / (E - 1)``;
        ``x += d dt + sqrt(2 t) sqrt(|dt|) e`` with ``e`` a float64 draw made before the model call, and
        a last noise-free step to ``t = 0``.

        Args:
            cond: class ids ``[B]`` or a :class:`Condition`.
            generator: ``torch.Generator`` for all noise (drawn on its device).
            num_steps: model calls per entity (>= 1; the official code needs >= 3 because of a cache
                bug that this implementation does not have).
            cfg_scale: guidance at the last entity; ``1`` disables guidance (no unconditional rows).
            use_cache: static KV cache (``False`` runs the whole sequence at every call; same result).
            callback: called after every model call with ``{"entity", "step", "x", "time", "labels", "out"}``.
            method: ``"sde"`` (the official sampler above) or ``"ode"``: Euler steps ``x += v_cfg dt`` of
                the probability-flow ODE on ``linspace(1, 0, num_steps + 1)`` with the same CFG ramp
                applied to the velocity and the initial draw as the only noise (not in the official code).
        Returns:
            ``[B, C, H, W]`` scaled latents in the model's dtype.
        """
        cond = Condition.of(cond)
        if cond.labels is None:
            raise ValueError(f"{type(self).__name__} is class-conditional: give class ids, not text features")
        self.check_condition(cond)
        if method not in ("sde", "ode"):
            raise ValueError(f"method must be 'sde' (Euler-Maruyama, official) or 'ode' (Euler), got {method!r}")
        grid = em_time_grid(num_steps).tolist()
        if method == "ode":
            grid = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
        if not math.isfinite(cfg_scale) or cfg_scale < 0:
            raise ValueError(f"cfg_scale must be a finite number >= 0 (1 disables guidance), got {cfg_scale}")
        dev, dtype = self.pred.weight.device, self.pred.weight.dtype
        labels = cond.labels.to(dev)
        B, C, E = labels.shape[0], self.in_channels, self.partition.num_entities
        guided = cfg_scale != 1.0
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, self.num_classes)])
        R = labels.shape[0]
        cache = (CacheState(self.num_layers, R, self.partition.num_tokens, self.num_heads, self.width // self.num_heads,
                            dtype=self.pred.weight.dtype, device=dev) if use_cache else None)
        noise_dev = generator.device if generator is not None else dev
        done: list[torch.Tensor] = []  # final samples of finished entities, [R, n_j, C] in the model dtype
        ode = method == "ode"
        for k, n_k in enumerate(self.partition.sizes):
            x = torch.randn(B, n_k, C, generator=generator, device=noise_dev).to(dev).double()
            cfg_k = 1.0 + (cfg_scale - 1.0) * k / max(E - 1, 1)
            for i, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
                last = ode or i == len(grid) - 2  # no noise term
                if not last:
                    e = torch.randn(x.shape, generator=generator, device=noise_dev, dtype=torch.float64).to(dev)
                xf = x.to(dtype)  # the model runs in its own dtype (float32 for parity)
                x_rows = torch.cat([xf, xf]) if guided else xf
                v, inp = self._call(x_rows, t_cur, k, done, labels, i == 0, cache)
                if callback is not None:
                    callback({"entity": k, "step": i, "x": inp, "time": t_cur, "labels": labels, "out": v})
                xx, v = (torch.cat([x, x]) if guided else x), v.double()  # drift and update in float64
                if ode:  # dx/dt = v = eps - x along x_t = (1 - t) x + t eps
                    d = v
                else:
                    score = (-(1 - t_cur) * v - xx) / t_cur
                    d = v - t_cur * score  # 0.5 * w * s with w = 2t
                if guided:
                    d_c, d_u = d.chunk(2)
                    d = cfg_mix(d_c, d_u, cfg_k)
                dt = t_next - t_cur
                x = x + d * dt if last else x + d * dt + math.sqrt(2 * t_cur) * math.sqrt(abs(dt)) * e
            xf = x.to(dtype)
            done.append(torch.cat([xf, xf]) if guided else xf)
        seq = torch.cat([d_[:B] for d_ in done], dim=1)
        return self.partition.from_sequence(seq)


_EVAL_SRC = "xAR README (OliverRensu/xAR @121e9c9), see ../shared/fixtures/xar/README.md"

PRESETS = {
    "xar-b": Preset(
        cls="visar.generators.next_x:NextXGenerator",
        kwargs=dict(width=768, encoder_depth=8, decoder_depth=8, num_heads=12),
        paper="xAR-B (Ren et al. 2025), xAR-B.pth, 172,638,224 parameters",
        eval=dict(image_size=256, num_steps=40, cfg_scale=2.7, tokenizer="mar-kl16", source=_EVAL_SRC)),
    "xar-l": Preset(
        cls="visar.generators.next_x:NextXGenerator",
        kwargs=dict(width=1024, encoder_depth=16, decoder_depth=16, num_heads=16),
        paper="xAR-L (Ren et al. 2025), xAR-L.pth, 608,397,968 parameters",
        eval=dict(image_size=256, num_steps=50, cfg_scale=2.3, tokenizer="mar-kl16", source=_EVAL_SRC)),
    "xar-h": Preset(
        cls="visar.generators.next_x:NextXGenerator",
        kwargs=dict(width=1280, encoder_depth=20, decoder_depth=20, num_heads=16),
        paper="xAR-H (Ren et al. 2025), xAR-H.pth, 1,186,024,096 parameters",
        eval=dict(image_size=256, num_steps=50, cfg_scale=2.2, tokenizer="mar-kl16", source=_EVAL_SRC)),
    "xar-tiny": Preset(
        cls="visar.generators.next_x:NextXGenerator",
        kwargs=dict(width=32, encoder_depth=2, decoder_depth=2, num_heads=2),
        paper="tiny twin with random weights, the configuration of the xAR parity fixtures "
              "(16x16x16 latents: 64 px with kl-tiny, 256 px with mar-kl16)",
        eval=dict(image_size=64, num_steps=4, cfg_scale=2.5, tokenizer="kl-tiny",
                  source="visar test configuration (fixture sample_cfg settings)")),
}
