"""MAR: masked, random-order autoregression over continuous tokens with a diffusion head.

Li et al. 2024, "Autoregressive Image Generation without Vector Quantization". An MAE-style
bidirectional encoder/decoder (timm ViT blocks) turns the visible tokens into a conditioning vector
``z`` for every position; a small per-token diffusion head (:class:`~visar.generators.components.heads.DiffusionHead`)
models ``p(token | z)``.

* Tokens: the tokenizer's latents ``[B, C, h, w]`` flattened row-major to ``L = h*w/p^2`` tokens of
  ``C p^2`` channels, ordered ``(c, i, j)`` within a ``p x p`` patch.
* Encoder: ``z_proj`` tokens, prepend ``buffer_size`` positions **filled with the class embedding**,
  add learned positions, LayerNorm, **drop** masked positions (every row must have the same number of
  masked tokens), ViT blocks, LayerNorm.
* Decoder: ``decoder_embed``, scatter back with ``mask_token`` at masked positions, learned positions,
  ViT blocks, LayerNorm, drop the buffer, add ``diffusion_pos_embed_learned`` -> ``z [B, L, D]``.
* The null class (CFG) is the separate parameter ``fake_latent``; label id ``num_classes`` selects it.
* Step protocol (:class:`~visar.generators.protocol.MaskedModel`): ``start(cond, guided)`` embeds the
  classes of the ``R`` rows, ``step(state, tokens, mask) -> z [R, L, D]``, ``to_latents(tokens)``. The
  official ``sample_tokens`` loop (random order, cosine mask schedule, constant or linear guidance, the
  head chain) is :class:`visar.samplers.masked.MaskedSampler`, the family's default sampler.
* Training: one truncated-normal mask ratio per batch in ``[mask_ratio_min, 1]`` (mean 1, std 0.25),
  labels dropped to the null class with probability ``label_drop_prob``, the head loss on masked
  positions with every token repeated ``diffusion_batch_mul`` times.

Parameter names are the official ones (``diffloss.`` becomes ``head.``), see :mod:`visar.convert.mar`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from visar.generators.base import Condition, Generator
from visar.generators.components.draws import check_draw, given_or_drawn
from visar.generators.components.heads import (DiffusionHead, FlowHead, check_noise_schedule_for_head,
                                               check_x0_clip_for_head)
from visar.generators.protocol import StepState
from visar.nn.attention import Attention
from visar.nn.mlp import GeluMlp
from visar.registry import register
from visar.utils.config import register_config
from visar.utils.validation import check_labels
from visar.registry import Preset

log = logging.getLogger("visar")


class ViTBlock(nn.Module):
    """timm's pre-LN ViT block: ``x + attn(LN(x))``, ``x + MLP(LN(x))`` (qkv bias, exact GELU, LN eps 1e-6)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_dropout: float = 0.0,
                 proj_dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True, proj_bias=True, attn_dropout=attn_dropout,
                              proj_dropout=proj_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = GeluMlp(dim, int(dim * mlp_ratio), dropout=proj_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def patchify(latents: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, h, w] -> [B, (h/p)(w/p), C p^2]``: row-major tokens, ``(c, i, j)`` order inside a patch."""
    B, C, H, W = latents.shape
    x = latents.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwcpq", x).reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens: torch.Tensor, p: int, channels: int, grid: int) -> torch.Tensor:
    """``[B, grid^2, C p^2] -> [B, C, grid p, grid p]`` (inverse of :func:`patchify`)."""
    B = tokens.shape[0]
    x = torch.einsum("nhwcpq->nchpwq", tokens.reshape(B, grid, grid, channels, p, p))
    return x.reshape(B, channels, grid * p, grid * p)


def mask_by_order(mask_len: int, orders: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, L]`` mask with ``orders[:, :mask_len]`` masked (True)."""
    masking = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
    return masking.scatter(-1, orders[:, :mask_len], True)


def numpy_orders(batch: int, seq_len: int, rng) -> torch.Tensor:
    """Random orders ``LongTensor [B, L]`` as the official ``sample_orders``: ``rng.shuffle(arange(L))`` per row.

    ``rng``: an int seed (``np.random.RandomState(seed)``, which equals ``np.random.seed(seed)`` followed
    by ``np.random.shuffle``), a ``np.random.RandomState`` or a ``np.random.Generator``.
    """
    if isinstance(rng, (int, np.integer)):
        rng = np.random.RandomState(int(rng))
    if not hasattr(rng, "shuffle"):
        raise TypeError(f"order_rng must be an int seed, np.random.RandomState or np.random.Generator, got "
                        f"{type(rng).__name__}")
    orders = []
    for _ in range(batch):
        order = np.arange(seq_len)
        rng.shuffle(order)
        orders.append(order)
    return torch.from_numpy(np.array(orders)).long()


def truncated_normal_ratio(low: float, generator: torch.Generator | None, device=None) -> float:
    """One draw of the official mask ratio: N(1, 0.25) truncated to ``[low, 1]`` (inverse-CDF sampling)."""
    a, b = (low - 1.0) / 0.25, 0.0
    cdf = torch.special.ndtr(torch.tensor([a, b], dtype=torch.float64))
    u = torch.rand(1, generator=generator, dtype=torch.float64, device=device).cpu()
    x = torch.special.ndtri(cdf[0] + u * (cdf[1] - cdf[0]))
    return float((1.0 + 0.25 * x).clamp(low, 1.0))


@dataclass
class MaskedState(StepState):
    """What :meth:`MaskedGenerator.start` prepares: the class embeddings of the ``R`` rows.

    Attributes:
        batch, guided: as :class:`~visar.generators.protocol.StepState`.
        emb: ``[R, D]`` class embeddings, ``[cond; fake_latent]`` when guided.
    """

    emb: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.emb.device

    @property
    def dtype(self) -> torch.dtype:
        """Float type of the tokens a sampler builds (the model's)."""
        return self.emb.dtype


@register("family", "mar")
class MaskedGenerator(Generator):
    """MAR (class-conditional, continuous tokens). Argument names follow the official ``MAR`` class.

    Args:
        img_size, vae_stride, patch_size: image pixels, tokenizer stride, tokens per patch side;
            ``L = (img_size / vae_stride / patch_size)^2``.
        encoder_embed_dim, encoder_depth, encoder_num_heads, decoder_*: the two ViT stacks.
        mlp_ratio: ViT MLP width ratio.
        vae_embed_dim: tokenizer latent channels ``C``.
        mask_ratio_min: lower end of the training mask ratio (0.7).
        label_drop_prob: training probability of the null class (0.1).
        class_num: number of classes.
        attn_dropout, proj_dropout: ViT dropouts (training only).
        buffer_size: class-embedding positions prepended to the encoder sequence (64).
        diffloss_d, diffloss_w: head depth and width.
        num_sampling_steps: default head sampling steps (100).
        diffusion_batch_mul: head-loss repetitions of every token (4).
        grad_checkpointing: recompute the head's blocks in backward.
        head: ``"diffusion"`` (MAR) or ``"flow"`` (flow-matching head, visar option).
        x0_clip: diffusion head only: default clamp ``[-x0_clip, x0_clip]`` of the head's predicted clean
            token while sampling (visar option, saved with the model config); ``None`` = the official
            sampler. A head trained briefly from scratch needs it (5.0 for ~unit-std latents), see
            :class:`~visar.generators.components.heads.DiffusionHead`.
        noise_schedule: diffusion head only: ``"cosine"`` (MAR) or ``"linear"`` (visar option, saved with the
            model config; trains on a CPU budget, ``docs/continuous.md``).
    """

    family = "mar"
    token_kind = "continuous"
    default_sampler = "masked"

    @register_config
    def __init__(self, img_size: int = 256, vae_stride: int = 16, patch_size: int = 1,
                 encoder_embed_dim: int = 1024, encoder_depth: int = 16, encoder_num_heads: int = 16,
                 decoder_embed_dim: int = 1024, decoder_depth: int = 16, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0, vae_embed_dim: int = 16, mask_ratio_min: float = 0.7,
                 label_drop_prob: float = 0.1, class_num: int = 1000, attn_dropout: float = 0.1,
                 proj_dropout: float = 0.1, buffer_size: int = 64, diffloss_d: int = 3, diffloss_w: int = 1024,
                 num_sampling_steps: int = 100, diffusion_batch_mul: int = 4, grad_checkpointing: bool = False,
                 head: str = "diffusion", x0_clip: float | None = None, noise_schedule: str = "cosine"):
        super().__init__()
        check_x0_clip_for_head(head, x0_clip)
        check_noise_schedule_for_head(head, noise_schedule)
        if img_size % (vae_stride * patch_size):
            raise ValueError(f"img_size {img_size} must be a multiple of vae_stride * patch_size = "
                             f"{vae_stride * patch_size}")
        if not 0 < mask_ratio_min <= 1:
            raise ValueError(f"mask_ratio_min must be in (0, 1], got {mask_ratio_min}")
        self.img_size, self.vae_stride, self.patch_size = img_size, vae_stride, patch_size
        self.vae_embed_dim = vae_embed_dim
        self.grid = img_size // vae_stride // patch_size
        self.seq_len = self.grid ** 2
        self.token_embed_dim = vae_embed_dim * patch_size ** 2
        self.num_tokens, self.token_dim = self.seq_len, self.token_embed_dim  # the MaskedModel protocol's names
        self.num_classes = class_num
        self.buffer_size = buffer_size
        self.mask_ratio_min, self.label_drop_prob = mask_ratio_min, label_drop_prob
        self.diffusion_batch_mul = diffusion_batch_mul
        D, Dd = encoder_embed_dim, decoder_embed_dim
        # --- encoder
        self.class_emb = nn.Embedding(class_num, D)
        self.fake_latent = nn.Parameter(torch.zeros(1, D))
        self.z_proj = nn.Linear(self.token_embed_dim, D, bias=True)
        self.z_proj_ln = nn.LayerNorm(D, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, D))
        self.encoder_blocks = nn.ModuleList(
            ViTBlock(D, encoder_num_heads, mlp_ratio, attn_dropout, proj_dropout) for _ in range(encoder_depth))
        self.encoder_norm = nn.LayerNorm(D, eps=1e-6)
        # --- decoder
        self.decoder_embed = nn.Linear(D, Dd, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + buffer_size, Dd))
        self.decoder_blocks = nn.ModuleList(
            ViTBlock(Dd, decoder_num_heads, mlp_ratio, attn_dropout, proj_dropout) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, Dd))
        self.initialize_weights()
        steps = int(num_sampling_steps)
        if head == "diffusion":
            self.head = DiffusionHead(self.token_embed_dim, Dd, diffloss_w, diffloss_d, steps,
                                      grad_checkpointing=grad_checkpointing, x0_clip=x0_clip,
                                      noise_schedule=noise_schedule)
        elif head == "flow":
            self.head = FlowHead(self.token_embed_dim, Dd, diffloss_w, diffloss_d, steps,
                                 grad_checkpointing=grad_checkpointing)
        else:
            raise ValueError(f"head must be 'diffusion' or 'flow', got {head!r}")

    def initialize_weights(self) -> None:
        """MAR's init: N(0, 0.02) embeddings and positions, xavier-uniform linears, unit LayerNorms."""
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ token layout
    def check_latents(self, latents: torch.Tensor) -> None:
        """``latents`` must be float ``[B, vae_embed_dim, h, w]`` with ``h = w = img_size / vae_stride``."""
        g = self.img_size // self.vae_stride
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError(f"MAR tokens are float latents [B, {self.vae_embed_dim}, {g}, {g}]")
        if latents.dim() != 4 or latents.shape[1:] != (self.vae_embed_dim, g, g):
            raise ValueError(f"latents must have shape [B, {self.vae_embed_dim}, {g}, {g}] for this model "
                             f"(img_size {self.img_size}, vae_stride {self.vae_stride}); got {tuple(latents.shape)}")

    def patchify(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w] -> [B, L, C p^2]`` (row-major tokens, ``(c, i, j)`` inside a patch)."""
        self.check_latents(latents)
        return patchify(latents, self.patch_size)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L, C p^2] -> [B, C, h, w]``."""
        return unpatchify(tokens, self.patch_size, self.vae_embed_dim, self.grid)

    def check_tokenizer(self, tokenizer) -> None:
        """Kind, latent channels and stride must match (e.g. MAR needs kl16: 16 channels, stride 16)."""
        super().check_tokenizer(tokenizer)
        if getattr(tokenizer, "latent_channels", self.vae_embed_dim) != self.vae_embed_dim:
            raise ValueError(f"{type(self).__name__} models {self.vae_embed_dim}-channel latents but the tokenizer "
                             f"has {tokenizer.latent_channels}")
        if tokenizer.downsample != self.vae_stride:
            raise ValueError(f"{type(self).__name__} expects tokenizer stride {self.vae_stride}, got "
                             f"{tokenizer.downsample}")

    # ------------------------------------------------------------------ conditioning
    def class_embedding(self, labels: torch.Tensor) -> torch.Tensor:
        """``[B] -> [B, D]``; id ``num_classes`` (the null class) gives ``fake_latent``."""
        null = labels == self.num_classes
        emb = self.class_emb(labels.clamp(max=self.num_classes - 1))
        return torch.where(null[:, None], self.fake_latent.to(emb.dtype), emb)

    def forward_encoder(self, x: torch.Tensor, mask: torch.Tensor, class_embedding: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, L, Ct]``, mask ``[B, L]`` (1 = masked) -> ``[B, buffer + visible, D]``."""
        x = self.z_proj(x)
        B, L, D = x.shape
        x = torch.cat([class_embedding[:, None].expand(B, self.buffer_size, D).to(x.dtype), x], dim=1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        keep = torch.cat([torch.ones(B, self.buffer_size, dtype=torch.bool, device=x.device), ~mask.bool()], dim=1)
        x = x[keep].reshape(B, -1, D)  # kept positions in increasing order
        for blk in self.encoder_blocks:
            x = blk(x)
        return self.encoder_norm(x)

    def forward_decoder(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder output ``[B, buffer + visible, D]`` -> head conditioning ``z [B, L, Dd]``."""
        x = self.decoder_embed(x)
        B = x.shape[0]
        keep = torch.cat([torch.ones(B, self.buffer_size, dtype=torch.bool, device=x.device), ~mask.bool()], dim=1)
        full = self.mask_token.to(x.dtype).repeat(B, keep.shape[1], 1)
        full[keep] = x.reshape(-1, x.shape[-1])
        x = full + self.decoder_pos_embed_learned
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)[:, self.buffer_size:]
        return x + self.diffusion_pos_embed_learned

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None,
                class_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced head conditioning.

        Args:
            tokens: ``[B, L, C p^2]`` tokens or ``[B, C, h, w]`` latents (masked positions are ignored).
            mask: ``[B, L]``, 1 (True) = masked; every row must mask the same number of tokens.
            labels: ``[B]`` class ids (``num_classes`` = null class), or give ``class_embedding [B, D]``.

        Returns:
            ``z [B, L, Dd]``.
        """
        if tokens.dim() == 4:
            tokens = self.patchify(tokens)
        if tokens.dim() != 3 or tokens.shape[1:] != (self.seq_len, self.token_embed_dim):
            raise ValueError(f"tokens must be [B, {self.seq_len}, {self.token_embed_dim}], got {tuple(tokens.shape)}")
        if mask.shape != tokens.shape[:2]:
            raise ValueError(f"mask must be [B, {self.seq_len}], got {tuple(mask.shape)}")
        counts = mask.bool().sum(1)
        if (counts != counts[0]).any():
            raise ValueError(f"every row must mask the same number of tokens (MAR drops masked positions); "
                             f"got {counts.tolist()}")
        if class_embedding is None:
            if labels is None:
                raise ValueError("give labels or class_embedding")
            check_labels(labels, self.num_classes, allow_null=True)
            class_embedding = self.class_embedding(labels)
        return self.forward_decoder(self.forward_encoder(tokens, mask, class_embedding), mask)

    # ------------------------------------------------------------------ training
    #: ``optim.ema: official``: MAR's ``update_ema`` with ``--ema_rate 0.9999`` after every step
    official_ema_decay = 0.9999

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay besides 1-D tensors and biases (timm's convention): MAR's
        ``add_weight_decay`` also exempts the whole token head (every name with ``diffloss``, visar's ``head.``);
        positional tables, ``mask_token``, ``fake_latent`` and the class table decay."""
        return {n for n, _ in self.named_parameters() if n.startswith("head.")}

    def loss(self, tokens: torch.Tensor, cond: Condition, generator: torch.Generator | None = None,
             orders: torch.Tensor | None = None, *, mask: torch.Tensor | None = None,
             drop: torch.Tensor | None = None, t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss of latents ``[B, C, h, w]`` given class labels (MAR's ``forward``).

        Random order per image, one truncated-normal mask ratio per batch, labels dropped to
        ``fake_latent`` with probability ``label_drop_prob`` (in train mode), head loss on the masked
        tokens repeated ``diffusion_batch_mul`` times (row ``k B L + b L + l`` is token ``l`` of image
        ``b`` in copy ``k``).

        Every draw can be given instead of drawn from ``generator`` (the draws not given are made in
        this order: orders, mask ratio, label drop, then the head's ``t`` and ``noise``):

        Args:
            orders: ``LongTensor [B, L]``, a permutation of ``range(L)`` per image.
            mask: ``[B, L]`` bool (True = masked = predicted), the same count in every row; replaces
                the orders and the mask-ratio draw (``orders`` is then not used).
            drop: ``[B]`` bool, True = label replaced by ``fake_latent`` (applied in any mode).
            t, noise: the head's draws for the ``N = diffusion_batch_mul * B * L`` rows (see
                :meth:`DiffusionHead.loss` / :meth:`FlowHead.loss`).
        """
        self.check_condition(cond)
        x = self.patchify(tokens)
        B, L, _ = x.shape
        dev = x.device
        if mask is None:
            given = orders is not None
            orders = given_or_drawn("orders", orders, lambda: torch.argsort(
                torch.rand(B, L, generator=generator, device=dev), dim=1), (B, L), "index", dev, low=0, high=L)
            if given and not bool((orders.sort(dim=1).values == torch.arange(L, device=dev)).all()):
                raise ValueError(f"orders must hold a permutation of range({L}) in every row")
            n_masked = int(math.ceil(L * truncated_normal_ratio(self.mask_ratio_min, generator, dev)))
            mask = mask_by_order(n_masked, orders)
        else:
            mask = check_draw("mask", mask, (B, L), "mask", dev)
            counts = mask.sum(1)
            if bool((counts != counts[0]).any()) or int(counts[0]) == 0:
                raise ValueError(f"mask must mask the same number (> 0) of tokens in every row, got {counts.tolist()}")
        emb = self.class_embedding(cond.labels.to(dev))
        if drop is not None:
            drop = check_draw("drop", drop, (B,), "mask", dev)
        elif self.training and self.label_drop_prob > 0:
            drop = torch.rand(B, generator=generator, device=dev) < self.label_drop_prob
        if drop is not None:
            emb = torch.where(drop[:, None], self.fake_latent.to(emb.dtype), emb)
        z = self.forward_decoder(self.forward_encoder(x, mask, emb), mask)
        m = self.diffusion_batch_mul
        target = x.reshape(B * L, -1).repeat(m, 1)
        z = z.reshape(B * L, -1).repeat(m, 1)
        weight = mask.reshape(B * L).repeat(m).to(z.dtype)
        return self.head.loss(target, z, weight, generator=generator, t=t, noise=noise)

    # ------------------------------------------------------------------ step protocol
    def start(self, cond: Condition, guided: bool = False) -> MaskedState:
        """Class embeddings of the ``R`` rows: ``[B, D]``, or ``[2B, D]`` = ``[cond; fake_latent]`` when ``guided``."""
        if not isinstance(guided, bool):
            raise TypeError(f"guided must be a bool (rows [cond; null] or not), got {type(guided).__name__}")
        self.check_condition(cond)
        B = cond.batch_size
        emb = self.class_embedding(cond.labels.to(self.fake_latent.device))
        if guided:
            emb = torch.cat([emb, self.fake_latent.expand(B, -1)], dim=0)
        return MaskedState(batch=B, guided=guided, emb=emb)

    def step(self, state: MaskedState, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Head conditioning ``z [R, L, Dd]`` of every position given ``tokens [B, L, C p^2]`` (masked
        positions ignored) and ``mask [B, L]`` (True = unknown, the same count in every row); both guidance
        halves see the same tokens."""
        B, L, C = state.batch, self.seq_len, self.token_embed_dim
        if tokens.shape != (B, L, C) or mask.shape != (B, L):
            raise ValueError(f"tokens must be [{B}, {L}, {C}] and mask [{B}, {L}]; got {tuple(tokens.shape)} and "
                             f"{tuple(mask.shape)}")
        if state.guided:
            tokens, mask = torch.cat([tokens, tokens], dim=0), torch.cat([mask, mask], dim=0)
        return self.forward_decoder(self.forward_encoder(tokens, mask, state.emb), mask)

    def to_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L, C p^2]`` tokens -> latents ``[B, C, h, w]`` (:meth:`unpatchify`)."""
        return self.unpatchify(tokens)


# ---------------------------------------------------------------------------------------------- presets
_PAPER = "MAR, Li et al. 2024 (arXiv 2406.11838); LTH14/mar"
_EVAL_SRC = ("LTH14/mar README, evaluation: num_iter 256, 100 diffusion steps, linear CFG, temperature 1.0 "
             "(without CFG: temperature 0.95); 50k images, balanced labels, ADM reference batch")


def _mar(width: int, depth: int, heads: int, dl_d: int, dl_w: int) -> dict:
    return {"img_size": 256, "vae_stride": 16, "patch_size": 1, "encoder_embed_dim": width,
            "encoder_depth": depth, "encoder_num_heads": heads, "decoder_embed_dim": width, "decoder_depth": depth,
            "decoder_num_heads": heads, "mlp_ratio": 4.0, "vae_embed_dim": 16, "buffer_size": 64,
            "diffloss_d": dl_d, "diffloss_w": dl_w, "num_sampling_steps": 100, "class_num": 1000}


def _eval(cfg: float, fid: float, fid_nocfg: float) -> dict:
    return {"image_size": 256, "tokenizer": "mar-kl16", "num_iter": 256, "num_steps": 100,
            "cfg_scale": cfg, "cfg_schedule": "linear", "temperature": 1.0, "temperature_without_cfg": 0.95,
            "num_images": 50000, "labels": "balanced (50 per class)", "fid": fid, "fid_without_cfg": fid_nocfg,
            "source": _EVAL_SRC}


PRESETS = {
    "mar-b": Preset(cls="visar.generators.masked.mar:MaskedGenerator", kwargs=_mar(768, 12, 12, 6, 1024),
                    paper=_PAPER + " (MAR-B, 208M)", eval=_eval(2.9, 2.31, 3.48)),
    "mar-l": Preset(cls="visar.generators.masked.mar:MaskedGenerator", kwargs=_mar(1024, 16, 16, 8, 1280),
                    paper=_PAPER + " (MAR-L, 479M)", eval=_eval(3.0, 1.78, 2.60)),
    "mar-h": Preset(cls="visar.generators.masked.mar:MaskedGenerator", kwargs=_mar(1280, 20, 16, 12, 1536),
                    paper=_PAPER + " (MAR-H, 943M)", eval=_eval(3.2, 1.55, 2.35)),
    "mar-tiny": Preset(
        cls="visar.generators.masked.mar:MaskedGenerator",
        kwargs={"img_size": 128, "vae_stride": 16, "patch_size": 1, "encoder_embed_dim": 32, "encoder_depth": 2,
                "encoder_num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 2, "decoder_num_heads": 2,
                "mlp_ratio": 4.0, "vae_embed_dim": 16, "buffer_size": 8, "diffloss_d": 2, "diffloss_w": 32,
                "num_sampling_steps": 100, "class_num": 1000},
        paper="tiny MAR of the parity fixtures (8x8 tokens, width 32, 2+2 blocks)",
        eval={"num_iter": 4, "num_steps": 100, "cfg_scale": 3.0, "cfg_schedule": "linear", "temperature": 1.0}),
    # the causal raster-order variant of the MAR paper (visar.generators.next_token.continuous)
    "mar-ar-tiny": Preset(
        cls="visar.generators.next_token.continuous:NextTokenContinuousGenerator",
        kwargs={"token_channels": 16, "grid_size": 8, "dim": 64, "depth": 2, "num_heads": 4, "num_classes": 10,
                "head_width": 64, "head_depth": 2, "num_sampling_steps": 20},
        paper="causal raster-order continuous AR with diffusion loss (MAR paper, Li et al. 2024, Table 2 'AR'); "
              "tiny visar configuration, no official weights exist",
        eval={"cfg_scale": 1.0, "cfg_schedule": "constant", "temperature": 1.0, "num_steps": 20}),
}
