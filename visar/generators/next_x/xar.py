"""xAR: next-X prediction -- an autoregressive transformer over entities, each drawn by flow matching.

Ren et al. 2025, "Beyond Next-Token: Next-X Prediction for Autoregressive Visual Generation";
numerics follow the official code (``OliverRensu/xAR``), see ``../shared/fixtures/xar/README.md``.

* The scaled KL latent ``[B, C, H, W]`` is turned into a sequence of *entities* by an
  :class:`~visar.generators.components.entities.EntityLayout` -- token, cell, subsample, scale or image (the
  released models: 8 x 8 cells of a 16 x 16 grid, i.e. 4 entities of 64 tokens). The transformer is
  block-causal over entities; every entity type runs through the same model, loss, sampler and cache.
* There is no separate head: the transformer predicts the velocity ``v = eps - x`` of every token
  (``pred``) with the encoder-decoder shared with FlowAR
  (:class:`~visar.generators.components.adaln_encoder_decoder.AdaLNEncoderDecoder`), conditioned per entity on
  ``class_emb(label) + time_embed(t_int)`` through the adaLN of :class:`~visar.nn.adaln_block.AdaLNBlock`
  (modulation computed once per entity, then expanded to its tokens).
* Training, Noisy Context Learning: every entity gets its own ``t ~ sigmoid(N(0, 1))`` and its own
  noise, so each entity is predicted from *noisy* earlier entities (:meth:`NextXGenerator.loss`).
* Sampling (:mod:`visar.samplers.next_x`): entity by entity, an Euler-Maruyama SDE on
  ``cat(linspace(1, 0.04, n), [0])`` with the drift built from the velocity's score, a linear CFG ramp
  over entities, and a static KV cache that is extended once per entity by re-encoding the previous
  entity at ``t = 0``. The generator exposes the step protocol (:meth:`NextXGenerator.start`,
  ``velocity``, ``commit``, ``to_latents``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from visar.generators.components.adaln_encoder_decoder import AdaLNEncoderDecoder, TrunkState
from visar.generators.base import Condition, Generator
from visar.generators.components.draws import drop_labels, given_or_drawn
from visar.generators.components.entities import EntityLayout, make_partition
from visar.nn.embeddings import LabelEmbedding, TimestepEmbedding, quantize_timestep, timestep_sinusoid
from visar.nn.kv_cache import CacheState
from visar.registry import Preset, register
from visar.utils.config import register_config
from visar.utils.validation import check_labels


@dataclass
class EntityState(TrunkState):
    """Decoding state of :class:`NextXGenerator` (rows ``[cond; null]`` when guided).

    Attributes:
        labels: ``[R]`` class ids of the rows (``num_classes`` = null).
        done: final tokens of the committed entities, ``[R, n_j, C]`` each in the model's dtype.
        inputs: the last model call's input ``[R, n, C]`` (``n_k``, or ``n_{k-1} + n_k`` when the call
            also wrote the previous entity into the cache, or the whole prefix without a cache).
    """

    labels: torch.Tensor | None = None
    done: list[torch.Tensor] = field(default_factory=list)


@register("family", "xar")
class NextXGenerator(AdaLNEncoderDecoder, Generator):
    """xAR generator over scaled continuous latents ``[B, in_channels, latent_size, latent_size]``.

    Implements :class:`~visar.generators.protocol.NextXModel`; its default sampler is
    :class:`visar.samplers.next_x.NextXSampler`.

    Args:
        num_classes: classes; row ``num_classes`` of the class table is the CFG null class.
        in_channels: latent channels (16 for MAR's KL-16).
        latent_size: side of the latent grid (16 for 256 px with KL-16).
        cell: for ``entity="cell"``: entity = ``cell x cell`` tokens (must divide ``latent_size``; 8 in
            the released models).
        entity: entity type, a key of :data:`visar.generators.components.entities.ENTITY_TYPES`: ``"token"``,
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
    default_sampler = "next_x"

    @register_config
    def __init__(self, num_classes: int = 1000, in_channels: int = 16, latent_size: int = 16, cell: int = 8,
                 width: int = 768, encoder_depth: int = 8, decoder_depth: int = 8, num_heads: int = 12,
                 mlp_ratio: float = 4.0, label_drop_prob: float = 0.1, attn_dropout: float = 0.0,
                 proj_dropout: float = 0.0, entity: str = "cell", stride: int = 2,
                 scales: list[int] | None = None):
        super().__init__()
        self.partition: EntityLayout = make_partition(entity, latent_size, latent_size, cell, stride=stride,
                                                      scales=scales)
        self.entity = entity
        self.num_classes, self.in_channels, self.latent_size = num_classes, in_channels, latent_size
        self.latent_side, self.label_drop_prob = latent_size, label_drop_prob

        self.class_emb = LabelEmbedding(num_classes, width)
        self.time_embed = TimestepEmbedding(width)
        self.build_encoder_decoder(in_channels, width, num_heads, self.partition.num_tokens, encoder_depth,
                                   decoder_depth, mlp_ratio, attn_dropout, proj_dropout)
        self.pred = nn.Linear(width, in_channels)

        here = torch.empty(0).device  # the default device (meta when built on the meta device)
        rows, cols = (p.to(here) for p in self.partition.positions())  # grid coordinates in sequence order
        self.register_layout(self.partition.sizes, rows, cols)
        self.register_buffer("entity_index", torch.tensor(  # [N] entity of each sequence position
            [e for e, n in enumerate(self.partition.sizes) for _ in range(n)]), persistent=False)
        for p in (self.encoder_pos_embed_learned, self.decoder_pos_embed_learned,
                  self.class_emb.embedding_table.weight):
            nn.init.normal_(p, std=0.02)

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
                    mask: torch.Tensor | None = None, cond_index: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity of the tokens at sequence positions ``[start, start + n)``.

        Args:
            x: ``[B, n, C]`` noisy tokens in entity order.
            c: ``[B, n, D]`` per-token condition, or ``[B, e, D]`` per entity with ``cond_index [n]``
                (each position's entity, in ``[0, e)``; the adaLN modulation is computed per entity).
            cache: static KV cache; keys/values are written at ``start`` and the queries attend to
                ``[0, start + n)``.
            mask: additive mask ``[n, start + n]`` (rows of the block-causal mask) or ``None``.
        Returns:
            ``[B, n, C]`` velocity.
        """
        return self.pred(self.encode_decode(self.z_proj(x), c, start, cache, mask, cond_index))

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
        return self.transformer(x_t, c, mask=self.mask.to(x_t.dtype), cond_index=self.entity_index)

    #: ``optim.ema: official``: xAR's ``update_ema`` with ``--ema_rate 0.9999`` after every step
    official_ema_decay = 0.9999

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay besides 1-D tensors and biases (timm's convention): none (xAR
        reuses MAR's ``add_weight_decay``; xAR has no ``diffloss`` module)."""
        return set()

    def loss(self, tokens: torch.Tensor, cond: Condition, generator: torch.Generator | None = None, *,
             drop: torch.Tensor | None = None, t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """Noisy Context Learning loss.

        Every entity gets ``t ~ sigmoid(N(0, 1))`` and its own noise; ``x_t = (1 - t) x + t eps``;
        MSE between the predicted velocity and ``eps - x`` over all tokens at once (block-causal mask,
        so every entity is predicted from noisy earlier ones). ``tokens``: ``[B, C, H, W]`` latents.
        Labels are dropped to the null class with probability ``label_drop_prob`` (training mode). The draws
        (``t``, ``eps``, then the label drop) come from ``generator`` unless given:

        Args:
            drop: ``[B]`` bool, True = label replaced by the null class (applied in any mode).
            t: ``[B, E]`` flow times in ``[0, 1]`` (1 = noise), one per entity (float32; the time embedding
                sees ``(t * 1000).long()``).
            noise: ``[B, N, C]`` ``eps`` in sequence order (:meth:`EntityLayout.to_sequence`).
        """
        cond = Condition.of(cond)
        self.check_condition(cond)
        self.check_latents(tokens)
        x = self.partition.to_sequence(tokens)  # [B, N, C]
        B, dev, E = x.shape[0], x.device, self.partition.num_entities
        t = given_or_drawn("t", t, lambda: torch.sigmoid(torch.randn(B, E, generator=generator, device=dev)),
                           (B, E), "real", dev, torch.get_default_dtype(), low=0.0, high=1.0)
        eps = given_or_drawn("noise", noise, lambda: torch.randn(x.shape, generator=generator, device=dev),
                             tuple(x.shape), "real", dev, torch.get_default_dtype())
        labels = cond.labels.to(dev)
        labels = drop_labels(labels, drop, self.label_drop_prob, self.training, self.num_classes, generator)
        t_tok = t[:, self.entity_index][..., None]  # [B, N, 1]
        x_t = (1 - t_tok) * x + t_tok * eps
        v = self.forward(x_t, t, labels)
        return (v - (eps - x)).pow(2).mean()

    # ------------------------------------------------------------------ step protocol (NextXModel)
    def start(self, cond: Condition, guided: bool = False, use_cache: bool = True) -> EntityState:
        """Labels of the ``R`` rows (``[cond; null]`` when ``guided``) and an empty static KV cache over all
        tokens (``use_cache=False``: none; every call then runs the whole prefix)."""
        cond = Condition.of(cond)
        if cond.labels is None:
            raise ValueError(f"{type(self).__name__} is class-conditional: give class ids, not text features")
        dev = self.pred.weight.device
        labels = cond.labels.to(dev)
        B = labels.shape[0]
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, self.num_classes)])
        cache = self.new_cache(labels.shape[0], self.pred.weight.dtype, dev) if use_cache else None
        return EntityState(batch=B, guided=guided, device=dev, cache=cache, labels=labels)

    #: :meth:`velocity` takes ``cond_only`` (samplers check this before passing it)
    velocity_cond_only = True

    def velocity(self, state: EntityState, x: torch.Tensor, t: float, k: int, first: bool,
                 cond_only: bool = False) -> torch.Tensor:
        """One model call for entity ``k`` at flow time ``t``: velocity ``[R, n_k, C]`` (model dtype).

        ``x``: ``[B or R, n_k, C]`` noisy tokens, any float dtype (cast to the model's; ``B`` rows are fed
        to both CFG halves). ``first``: the entity's first call, which with a cache also writes the
        previous entity (committed, at ``t = 0``) into it. The call's input is kept in ``state.inputs``.

        ``cond_only`` (entity 0 only): run the ``B`` conditional rows alone and return ``[B, n_0, C]``, for
        a guided sampler whose guidance scale is 1 on the first entity (its unconditional rows would go
        unused). Entity 0 attends to itself only, so the call runs without the cache; the first call of
        entity 1 writes entity 0 (clean) into the cache for every row, as it always does.
        """
        if cond_only:
            if k != 0:
                raise ValueError(f"cond_only applies to entity 0 only (entity {k} attends to the cache of "
                                 "every row); run all rows")
            xb = x[:state.batch].to(self.pred.weight.dtype)
            tt = torch.full((xb.shape[0], 1), t, dtype=torch.float64, device=xb.device)
            c = self.entity_condition(state.labels[:state.batch], tt)  # [B, 1, D]
            state.inputs = xb
            return self.transformer(xb, c, 0, cond_index=self.entity_index[:xb.shape[1]])
        xf = x.to(self.pred.weight.dtype)  # the model runs in its own dtype (float32 for parity)
        x_cur = torch.cat([xf, xf]) if state.guided and xf.shape[0] == state.batch else xf
        R, n_k = x_cur.shape[:2]
        off, done, cache = self.partition.offsets(), state.done, state.cache
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
        c = self.entity_condition(state.labels, times)  # [R, e, D]
        index = self.entity_index[off[first_entity]:off[k + 1]] - first_entity
        state.inputs = inp
        return self.transformer(inp, c, start, cache=cache, mask=mask, cond_index=index)[:, -n_k:]

    def commit(self, state: EntityState, k: int, x: torch.Tensor) -> None:
        """Record entity ``k``'s final tokens ``[B or R, n_k, C]`` (any float dtype), the clean context of
        later entities (``B`` rows serve both CFG halves)."""
        if k != len(state.done):
            raise ValueError(f"entity {k} committed after {len(state.done)} entities; commit them in order")
        xf = x.to(self.pred.weight.dtype)
        state.done.append(torch.cat([xf, xf]) if state.guided and xf.shape[0] == state.batch else xf)

    def to_latents(self, seq: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` tokens in entity order -> latents ``[B, C, H, W]`` in the model's dtype."""
        return self.partition.from_sequence(seq.to(self.pred.weight.dtype))


_EVAL_SRC = "xAR README (OliverRensu/xAR @121e9c9), see ../shared/fixtures/xar/README.md"

PRESETS = {
    "xar-b": Preset(
        cls="visar.generators.next_x.xar:NextXGenerator",
        kwargs=dict(width=768, encoder_depth=8, decoder_depth=8, num_heads=12),
        paper="xAR-B (Ren et al. 2025), xAR-B.pth, 172,638,224 parameters",
        eval=dict(image_size=256, num_steps=40, cfg_scale=2.7, tokenizer="mar-kl16", source=_EVAL_SRC)),
    "xar-l": Preset(
        cls="visar.generators.next_x.xar:NextXGenerator",
        kwargs=dict(width=1024, encoder_depth=16, decoder_depth=16, num_heads=16),
        paper="xAR-L (Ren et al. 2025), xAR-L.pth, 608,397,968 parameters",
        eval=dict(image_size=256, num_steps=50, cfg_scale=2.3, tokenizer="mar-kl16", source=_EVAL_SRC)),
    "xar-h": Preset(
        cls="visar.generators.next_x.xar:NextXGenerator",
        kwargs=dict(width=1280, encoder_depth=20, decoder_depth=20, num_heads=16),
        paper="xAR-H (Ren et al. 2025), xAR-H.pth, 1,186,024,096 parameters",
        eval=dict(image_size=256, num_steps=50, cfg_scale=2.2, tokenizer="mar-kl16", source=_EVAL_SRC)),
    "xar-tiny": Preset(
        cls="visar.generators.next_x.xar:NextXGenerator",
        kwargs=dict(width=32, encoder_depth=2, decoder_depth=2, num_heads=2),
        paper="tiny twin with random weights, the configuration of the xAR parity fixtures "
              "(16x16x16 latents: 64 px with kl-tiny, 256 px with mar-kl16)",
        eval=dict(image_size=64, num_steps=4, cfg_scale=2.5, tokenizer="kl-tiny",
                  source="visar test configuration (fixture sample_cfg settings)")),
}
