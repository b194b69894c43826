"""Causal, raster-order autoregression over continuous tokens ("AR" variant of the MAR paper).

Li et al. 2024 (MAR), section 5.1 / Table 2 compare the masked, bidirectional MAR with a plain causal
transformer that predicts the next token in raster order, both with the diffusion loss. The official
repository has no code or weights for this variant; visar builds it from the paper on the same causal
Llama trunk as the discrete next-token generator (:class:`~visar.generators.llama_trunk.LlamaTrunk`,
static KV cache, 2D RoPE, one class token):

* tokens: the tokenizer's latents ``[B, C, h, w]`` -> ``L = h w / p^2`` raster tokens of ``C p^2``
  channels (same patchify as MAR);
* input: ``z_proj`` (linear) of tokens ``0..L-2`` after the class token; the hidden state at sequence
  position ``i`` (class token = position 0) is the head conditioning ``z_i`` of image token ``i``;
* head: :class:`~visar.generators.heads.DiffusionHead` (or a flow head), loss on every token, each token
  repeated ``diffusion_batch_mul`` times as in MAR;
* CFG: rows ``[cond; uncond]`` through the transformer, guidance on the head's noise prediction; the
  scale is constant or MAR's linear ramp ``1 + (cfg - 1) (i + 1) / L`` at token ``i``.

The step interface (``start`` / ``step`` / ``rewind``, per-row positions, rollback by lowering the cache
lengths) is the discrete generator's, so samplers (continuous speculative decoding) can drive it; the
conditioning vectors replace the logits.
The preset ``mar-ar-tiny`` is registered with the MAR presets in :mod:`visar.generators.masked`.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from visar.generators.base import Condition, Generator
from visar.generators.heads import MODEL_X0_CLIP, DiffusionHead, FlowHead, check_x0_clip_for_head, head_sample_options
from visar.generators.llama_trunk import LlamaTrunk, init_llama_weights
from visar.generators.masked import patchify, unpatchify
from visar.generators.next_token import NextTokenState
from visar.nn.embeddings import LabelEmbedding
from visar.utils.config import register_config
from visar.utils.validation import check_sampling_args

log = logging.getLogger("visar")


class NextTokenContinuousGenerator(Generator):
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
            :class:`~visar.generators.heads.DiffusionHead`.
    """

    family = "mar-ar"
    token_kind = "continuous"

    @register_config
    def __init__(self, token_channels: int = 16, grid_size: int = 16, patch_size: int = 1, dim: int = 768,
                 depth: int = 12, num_heads: int = 12, num_classes: int = 1000, head: str = "diffusion",
                 head_width: int = 1024, head_depth: int = 6, num_sampling_steps: int = 100,
                 diffusion_batch_mul: int = 4, class_dropout: float = 0.1, ffn_hidden: int | None = None,
                 rope_base: float = 10000.0, norm_eps: float = 1e-5, token_dropout: float = 0.0,
                 attn_dropout: float = 0.0, resid_dropout: float = 0.0, ffn_dropout: float = 0.0,
                 x0_clip: float | None = None):
        super().__init__()
        check_x0_clip_for_head(head, x0_clip)
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
                                      x0_clip=x0_clip)
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

    # ------------------------------------------------------------------ step interface
    def start(self, cond: Condition, cfg_scale: float = 1.0) -> tuple[NextTokenState, torch.Tensor]:
        """Allocate the static cache and prefill the class token.

        Returns ``(state, z [R, D])``: the conditioning of image token 0 for every row (``R = 2B``
        rows ``[cond; uncond]`` when ``cfg_scale != 1``).
        """
        self.check_condition(cond)
        B = cond.batch_size
        guided = cfg_scale != 1.0
        labels = cond.labels.to(self.z_proj.weight.device)
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, self.num_classes)])
        c = self._embed_labels(labels)
        cache = self.trunk.new_cache(c.shape[0], dtype=c.dtype, device=c.device)
        mask_table = self.trunk.attention_mask(None)
        state = NextTokenState(cache=cache, mask_table=mask_table, batch=B, guided=guided, cond_len=1)
        return state, self.trunk.prefill(c, cache, mask_table)

    def step(self, state: NextTokenState, tokens: torch.Tensor, pos: torch.Tensor | int) -> torch.Tensor:
        """Feed tokens ``[B or R, n, C p^2]`` at image positions ``pos`` (int or per-row ``[B or R]``, at
        most the committed count; smaller rolls back); returns ``z [R, n, D]`` where ``z[:, j]`` conditions
        image token ``pos + j + 1``."""
        R, B = state.rows, state.batch
        if tokens.dim() != 3 or tokens.shape[0] not in (B, R) or tokens.shape[2] != self.token_dim:
            raise ValueError(f"tokens must be [B={B} or R={R}, n, {self.token_dim}], got {tuple(tokens.shape)}")
        device = state.cache.lengths.device
        pos = torch.as_tensor(pos, dtype=torch.long, device=device)
        pos = pos.expand(tokens.shape[0]) if pos.dim() == 0 else pos
        if tokens.shape[0] == B and R != B:
            tokens, pos = tokens.repeat(2, 1, 1), pos.repeat(2)
        committed = state.token_lengths
        if (pos < 0).any() or (pos > committed).any():
            raise ValueError(f"pos {pos.tolist()} must lie in [0, committed tokens {committed.tolist()}]")
        n = tokens.shape[1]
        if int(pos.max()) + n > self.num_tokens:
            raise ValueError(f"writing {n} tokens at {int(pos.max())} overflows the {self.num_tokens}-token image")
        seq_pos = 1 + pos[:, None] + torch.arange(n, device=device)  # [R, n]
        h = self.trunk.extend(self.z_proj(tokens.to(device)), seq_pos, state.cache, state.mask_table)
        state.cache.lengths.copy_(seq_pos[:, -1] + 1)
        return h

    def rewind(self, state: NextTokenState, n: int | torch.Tensor) -> None:
        """Forget the last ``n`` committed image tokens (int or per-row ``[R]``); nothing is copied."""
        n = torch.as_tensor(n, device=state.cache.lengths.device)
        if ((state.cache.lengths - n) < 1).any():
            raise ValueError(f"cannot rewind {n.tolist()} tokens: rows hold {state.token_lengths.tolist()}")
        state.cache.rewind(n)

    # ------------------------------------------------------------------ sampling
    @staticmethod
    def cfg_at(cfg: float, schedule: str, index: int, num_tokens: int) -> float:
        """Guidance scale of image token ``index``: constant, or MAR's linear ramp ``1 + (cfg-1)(i+1)/L``."""
        return cfg if schedule == "constant" else 1 + (cfg - 1) * (index + 1) / num_tokens

    @torch.no_grad()
    def sample(self, cond: Condition, generator: torch.Generator | None = None, cfg: float = 1.0,
               cfg_schedule: str = "constant", temperature: float = 1.0, num_sampling_steps: int | None = None,
               final_noise: bool = False, use_cache: bool = True, progress: bool = False,
               cfg_scale: float | None = None, x0_clip: float | None | str = MODEL_X0_CLIP) -> torch.Tensor:
        """Raster-order sampling; returns latents ``[B, C, h, w]``.

        Args:
            cond: class labels ``[B]``.
            generator: source of the head's noise.
            cfg: guidance scale (1 = none), ``cfg_scale`` is an alias; ``cfg_schedule``: ``"constant"``
                or ``"linear"``.
            temperature: head temperature (> 0).
            num_sampling_steps: head steps (default: the head's).
            final_noise: keep the head's last-step noise.
            use_cache: ``False`` recomputes the whole prefix every token (reference path for tests).
            x0_clip: clamp of the diffusion head's predicted clean token: ``"model"`` (default) = the
                model's ``x0_clip``, ``None`` = no clipping (MAR's sampler), a number > 0 = that range.
        """
        if cfg_scale is not None:
            cfg = cfg_scale
        check_sampling_args(cfg_scale=cfg, temperature=temperature)
        if cfg_schedule not in ("constant", "linear"):
            raise ValueError(f"cfg_schedule must be 'constant' or 'linear', got {cfg_schedule!r}")
        if num_sampling_steps is not None and (not isinstance(num_sampling_steps, int) or num_sampling_steps < 1):
            raise ValueError(f"num_sampling_steps must be an integer >= 1, got {num_sampling_steps!r}")
        head_opts = head_sample_options(self.head, x0_clip)
        self.check_condition(cond)
        B, L = cond.batch_size, self.num_tokens
        guided = cfg != 1.0
        dev = self.z_proj.weight.device
        out = torch.zeros(B, L, self.token_dim, device=dev, dtype=self.z_proj.weight.dtype)
        if use_cache:
            state, z = self.start(cond, cfg)
        else:
            labels = cond.labels.to(dev)
            full = Condition.of(torch.cat([labels, torch.full_like(labels, self.num_classes)]) if guided else labels)
        for i in tqdm(range(L), disable=not progress, desc="AR"):
            if not use_cache:
                prefix = out[:, : i + 1]
                z = self.forward(torch.cat([prefix, prefix]) if guided else prefix, full)[:, i]
            x = self.head.sample(z, num_sampling_steps, cfg=self.cfg_at(cfg, cfg_schedule, i, L),
                                 temperature=temperature, generator=generator, final_noise=final_noise,
                                 guided=guided, **head_opts)
            out[:, i] = x
            if use_cache and i < L - 1:
                z = self.step(state, x[:, None], i)[:, 0]
        return unpatchify(out, self.patch_size, self.token_channels, self.grid)

