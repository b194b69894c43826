"""Causal, raster-order autoregression over continuous tokens ("AR" variant of the MAR paper).

Li et al. 2024 (MAR), section 5.1 / Table 2 compare the masked, bidirectional MAR with a plain causal
transformer that predicts the next token in raster order, both with the diffusion loss. The official
repository has no code or weights for this variant; visar builds it from the paper on the same causal
Llama trunk as the discrete next-token generator (:class:`~visar.generators.components.llama_trunk.LlamaTrunk`,
static KV cache, 2D RoPE, one class token):

* tokens: the tokenizer's latents ``[B, C, h, w]`` -> ``L = h w / p^2`` raster tokens of ``C p^2``
  channels (same patchify as MAR);
* input: ``z_proj`` (linear) of tokens ``0..L-2`` after the class token; the hidden state at sequence
  position ``i`` (class token = position 0) is the head conditioning ``z_i`` of image token ``i``;
* head: :class:`~visar.generators.components.heads.DiffusionHead` (or a flow head), loss on every token, each token
  repeated ``diffusion_batch_mul`` times as in MAR;
* CFG: rows ``[cond; uncond]`` through the transformer, guidance on the head's noise prediction.

The step protocol (:class:`~visar.generators.protocol.NextTokenModel` with ``emits == "condition"``:
``start`` / ``step`` / ``rewind``, per-row positions, rollback by lowering the cache lengths) is the
discrete generator's, so samplers (continuous speculative decoding) can drive it; the conditioning vectors
replace the logits. The raster loop (guidance constant or MAR's linear ramp, the head chain) is the
default sampler :class:`visar.samplers.continuous_ar.ContinuousARSampler`.
The preset ``mar-ar-tiny`` is registered with the MAR presets in :mod:`visar.generators.masked.mar`.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from visar.generators.base import Condition, Generator
from visar.generators.components.heads import (DiffusionHead, FlowHead, check_noise_schedule_for_head,
                                               check_x0_clip_for_head)
from visar.generators.components.llama_trunk import LlamaTrunk, init_llama_weights
from visar.generators.masked.mar import patchify, unpatchify
from visar.generators.components.token_cache_steps import CachedTokenSteps
from visar.nn.embeddings import LabelEmbedding
from visar.registry import register
from visar.utils.config import register_config

log = logging.getLogger("visar")


@register("family", "mar-ar")
class NextTokenContinuousGenerator(CachedTokenSteps, Generator):
    """Causal continuous-token AR with a diffusion (or flow) head.

    Args:
        token_channels: tokenizer latent channels ``C`` (16 for kl16).
        grid_size: latent grid side ``h = w`` (16 for 256 px with kl16).
        patch_size: latent pixels per token side (token width ``C p^2``).
        dim, depth, num_heads: trunk width, blocks, heads.
        num_classes: classes (the null class is ``num_classes``).
        head: ``"diffusion"`` or ``"flow"``; head_width, head_depth: its MLP.
        num_sampling_steps: default head steps.
        diffusion_batch_mul: head-loss repetitions per token.
        class_dropout: training probability of the null class (CFG).
        ffn_hidden, rope_base, norm_eps, token_dropout, attn_dropout, resid_dropout, ffn_dropout: trunk options.
        x0_clip: diffusion head only: default clamp ``[-x0_clip, x0_clip]`` of the head's predicted clean
            token while sampling (saved with the model config); ``None`` = MAR's sampler. A head trained
            briefly from scratch needs it (5.0 for ~unit-std latents), see
            :class:`~visar.generators.components.heads.DiffusionHead`.
        noise_schedule: diffusion head only: ``"cosine"`` (MAR) or ``"linear"`` (visar option, saved with the
            model config; trains on a CPU budget, ``docs/continuous.md``).
    """

    # continuous tokens: the steps emit the token head's conditioning, drawn by the continuous AR sampler
    family, token_kind, emits, default_sampler = "mar-ar", "continuous", "condition", "continuous_ar"

    @register_config
    def __init__(self, token_channels: int = 16, grid_size: int = 16, patch_size: int = 1, dim: int = 768,
                 depth: int = 12, num_heads: int = 12, num_classes: int = 1000, head: str = "diffusion",
                 head_width: int = 1024, head_depth: int = 6, num_sampling_steps: int = 100,
                 diffusion_batch_mul: int = 4, class_dropout: float = 0.1, ffn_hidden: int | None = None,
                 rope_base: float = 10000.0, norm_eps: float = 1e-5, token_dropout: float = 0.0,
                 attn_dropout: float = 0.0, resid_dropout: float = 0.0, ffn_dropout: float = 0.0,
                 x0_clip: float | None = None, noise_schedule: str = "cosine"):
        super().__init__()
        check_x0_clip_for_head(head, x0_clip)
        check_noise_schedule_for_head(head, noise_schedule)
        if grid_size % patch_size:
            raise ValueError(f"grid_size {grid_size} must be a multiple of patch_size {patch_size}")
        if not 0.0 <= class_dropout < 1.0:
            raise ValueError(f"class_dropout must be in [0, 1), got {class_dropout}")
        self.token_channels, self.patch_size = token_channels, patch_size
        self.grid_size, self.grid = grid_size, grid_size // patch_size
        self.num_tokens = self.grid ** 2
        self.token_dim = token_channels * patch_size ** 2
        self.num_classes, self.class_dropout = num_classes, class_dropout
        self.diffusion_batch_mul = diffusion_batch_mul
        self.cond_embed = LabelEmbedding(num_classes, dim)
        self.z_proj = nn.Linear(self.token_dim, dim)
        self.trunk = LlamaTrunk(dim, depth, num_heads, 1, self.grid, ffn_hidden=ffn_hidden, rope_base=rope_base,
                                norm_eps=norm_eps, token_dropout=token_dropout, attn_dropout=attn_dropout,
                                resid_dropout=resid_dropout, ffn_dropout=ffn_dropout)
        init_llama_weights(self)
        if head == "diffusion":
            self.head = DiffusionHead(self.token_dim, dim, head_width, head_depth, num_sampling_steps,
                                      x0_clip=x0_clip, noise_schedule=noise_schedule)
        elif head == "flow":
            self.head = FlowHead(self.token_dim, dim, head_width, head_depth, num_sampling_steps)
        else:
            raise ValueError(f"head must be 'diffusion' or 'flow', got {head!r}")

    # ------------------------------------------------------------------ tokens
    def tokens_of(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, C, h, w]`` -> raster tokens ``[B, L, C p^2]`` (``[B, n, C p^2]`` passes through)."""
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError("continuous tokens must be a float tensor [B, C, h, w] or [B, n, C p^2]")
        if latents.dim() == 3:
            if latents.shape[2] != self.token_dim or latents.shape[1] > self.num_tokens:
                raise ValueError(f"tokens must be [B, n <= {self.num_tokens}, {self.token_dim}], got "
                                 f"{tuple(latents.shape)}")
            return latents
        g = self.grid_size
        if latents.dim() != 4 or latents.shape[1:] != (self.token_channels, g, g):
            raise ValueError(f"latents must have shape [B, {self.token_channels}, {g}, {g}], got "
                             f"{tuple(latents.shape)}")
        return patchify(latents, self.patch_size)

    def to_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """Raster tokens ``[B, L, C p^2]`` -> latents ``[B, C, h, w]`` (inverse of :meth:`tokens_of`)."""
        return unpatchify(tokens, self.patch_size, self.token_channels, self.grid)

    def check_tokenizer(self, tokenizer) -> None:
        super().check_tokenizer(tokenizer)
        ch = getattr(tokenizer, "latent_channels", self.token_channels)
        if ch != self.token_channels:
            raise ValueError(f"{type(self).__name__} models {self.token_channels}-channel latents but the "
                             f"tokenizer has {ch}")

    def _embed_labels(self, labels: torch.Tensor, drop_prob: float = 0.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        return self.cond_embed(labels, drop_prob, generator)[:, None]  # [B, 1, D]

    # ------------------------------------------------------------------ teacher forcing
    def forward(self, tokens: torch.Tensor, cond: Condition, drop_prob: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Head conditioning ``z [B, n, D]`` of tokens ``0..n-1`` given tokens ``[B, n, C p^2]``
        (or full latents); ``z[:, i]`` sees the class and tokens ``< i``. Null-class labels allowed."""
        x = self.tokens_of(tokens)
        if cond.labels is None:
            raise ValueError("this generator is class-conditional: give Condition(labels=...)")
        from visar.utils.validation import check_labels

        check_labels(cond.labels, self.num_classes, allow_null=True)
        if cond.batch_size != x.shape[0]:
            raise ValueError(f"{cond.batch_size} conditions for {x.shape[0]} token rows")
        c = self._embed_labels(cond.labels.to(x.device), drop_prob, generator)
        h = self.trunk(c, self.z_proj(x[:, :-1]))  # [B, n, D]
        return h[:, : x.shape[1]]

    def loss(self, tokens: torch.Tensor, cond: Condition, generator: torch.Generator | None = None) -> torch.Tensor:
        """Diffusion loss of every token of latents ``[B, C, h, w]`` given class labels."""
        self.check_condition(cond)
        x = self.tokens_of(tokens)
        if x.shape[1] != self.num_tokens:
            raise ValueError(f"training needs all {self.num_tokens} tokens, got {x.shape[1]}")
        p = self.class_dropout if self.training else 0.0
        z = self.forward(x, cond, drop_prob=p, generator=generator)
        B, L, _ = x.shape
        m = self.diffusion_batch_mul
        return self.head.loss(x.reshape(B * L, -1).repeat(m, 1), z.reshape(B * L, -1).repeat(m, 1),
                              generator=generator)

    # ------------------------------------------------------------------ step protocol
    # start / step / rewind / decode_step come from CachedTokenSteps; these are its hooks.
    def step_condition(self, cond: Condition, guided: bool) -> tuple[torch.Tensor, None]:
        """Class-token rows ``[R, 1, D]`` (``[cond; null]`` when ``guided``); no condition mask."""
        self.check_condition(cond)
        labels = cond.labels.to(self.z_proj.weight.device)
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, self.num_classes)])
        return self._embed_labels(labels), None

    def check_step_inputs(self, tokens: torch.Tensor, batch: int, rows: int) -> torch.Tensor:
        """Continuous tokens ``[B or R, n, C p^2]``."""
        if tokens.dim() != 3 or tokens.shape[0] not in (batch, rows) or tokens.shape[2] != self.token_dim:
            raise ValueError(f"tokens must be [B={batch} or R={rows}, n, {self.token_dim}], got {tuple(tokens.shape)}")
        return tokens

    def embed_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.z_proj(tokens)

    def emit(self, h: torch.Tensor) -> torch.Tensor:
        """The trunk's hidden states are the head conditioning ``z [..., D]``."""
        return h

