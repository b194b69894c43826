"""LlamaGen's VQ tokenizer (Sun et al. 2024, "Autoregressive Model Beats Diffusion", Sec. 2.2).

Image ``[B, 3, H, W]`` in ``[-1, 1]`` -> LDM-style conv encoder (:mod:`visar.nn.autoencoder`) ->
``quant_conv`` (1x1) to ``codebook_embed_dim`` channels -> nearest code of an **l2-normalised**
codebook -> ``LongTensor [B, H/ds, W/ds]`` in raster order; decoding looks the (normalised) rows up,
applies ``post_quant_conv`` and the decoder. ``ds = 2 ** (len(ch_mult) - 1)`` (16 or 8).

The codebook is stored un-normalised (as in the official files) and normalised on every use, both
for the nearest-code search and for ``ids -> vectors``.

Training (:meth:`VQTokenizer.training_loss`): reconstruction MSE + codebook loss
``|sg(z) - e|^2`` + commitment ``beta |z - sg(e)|^2`` (beta 0.25), straight-through gradients,
per-code "steps since last used" counters and :meth:`VQTokenizer.restart_dead_codes`.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from visar.nn.autoencoder import build_decoder, build_encoder
from visar.tokenizers.base import Tokenizer
from visar.utils.config import register_config
from visar.utils.dist import all_gather_cat, all_reduce_, is_distributed
from visar.utils.validation import check_tokens
from visar.registry import Preset, register

log = logging.getLogger("visar")


class L2Quantizer(nn.Module):
    """Nearest-neighbour quantizer over an l2-normalised codebook ``embedding.weight [K, D]``.

    ``steps_unused [K]`` (int64 buffer) counts training steps since each code was last selected;
    it drives dead-code restarts and is not part of the official files.
    """

    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)
        with torch.no_grad():
            self.embedding.weight.normal_()
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))

    def codebook(self) -> torch.Tensor:
        """Normalised codebook ``[K, D]``."""
        return F.normalize(self.embedding.weight, p=2, dim=-1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z [B, D, h, w]`` -> ``(z_n, zq_st, ids, codes)``.

        ``z_n``: normalised latents ``[B, h, w, D]``; ``codes``: selected normalised rows ``[B, h, w, D]``;
        ``zq_st = z_n + (codes - z_n).detach()`` as ``[B, D, h, w]`` (straight-through); ``ids [B, h, w]``.
        """
        z_n = F.normalize(z.permute(0, 2, 3, 1), p=2, dim=-1)  # [B, h, w, D]
        e = self.codebook()  # [K, D]
        flat = z_n.reshape(-1, z_n.shape[-1])  # [N, D]
        # squared distance written as |z|^2 + |e|^2 - 2 z.e, the official evaluation order
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()  # [N, K]
        ids = d.argmin(1).view(z_n.shape[:-1])  # [B, h, w]
        codes = F.embedding(ids, e)  # [B, h, w, D]
        zq_st = (z_n + (codes - z_n).detach()).permute(0, 3, 1, 2)
        return z_n, zq_st, ids, codes


@register("tokenizer", "vq")
class VQTokenizer(Tokenizer):
    """Discrete tokenizer equivalent to LlamaGen's ``VQModel``.

    Args:
        codebook_size: number of codes ``K`` (the vocabulary of the generator).
        codebook_embed_dim: code dimension ``D`` (8 in LlamaGen).
        ch: base width of encoder and decoder (128 in the official models).
        ch_mult: width multiplier per level; ``len(ch_mult) - 1`` stride-2 stages, so downsample
            ``2 ** (len(ch_mult) - 1)`` (``(1, 1, 2, 2, 4)`` -> 16, ``(1, 2, 2, 4)`` -> 8).
        num_res_blocks: ResNet blocks per encoder level (the decoder uses one more).
        z_channels: encoder output / decoder input channels (256).
        commit_beta: commitment-loss weight.
        dead_code_steps: a code unused for this many training steps counts as dead
            (see :meth:`restart_dead_codes`).
    """

    kind = "discrete"
    family = "llamagen"

    @register_config
    def __init__(self, codebook_size: int = 16384, codebook_embed_dim: int = 8, ch: int = 128,
                 ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2, z_channels: int = 256,
                 commit_beta: float = 0.25, dead_code_steps: int = 200):
        super().__init__()
        if codebook_size < 2 or codebook_embed_dim < 1:
            raise ValueError(f"need codebook_size >= 2 and codebook_embed_dim >= 1, got {codebook_size}, "
                             f"{codebook_embed_dim}")
        if commit_beta < 0 or dead_code_steps < 1:
            raise ValueError(f"commit_beta must be >= 0 and dead_code_steps >= 1, got {commit_beta}, {dead_code_steps}")
        ch_mult = tuple(int(m) for m in ch_mult)
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.commit_beta = float(commit_beta)
        self.dead_code_steps = int(dead_code_steps)
        self.encoder = build_encoder(ch, ch_mult, num_res_blocks, z_channels, in_channels=3, attn_levels=(-1,))
        self.decoder = build_decoder(ch, ch_mult, num_res_blocks, z_channels, out_channels=3, attn_levels=(-1,))
        self.quant_conv = nn.Conv2d(z_channels, codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(codebook_embed_dim, z_channels, 1)
        self.quantize = L2Quantizer(codebook_size, codebook_embed_dim)

    # ------------------------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return self.quantize.embedding.num_embeddings

    @property
    def embed_dim(self) -> int:
        return self.quantize.embedding.embedding_dim

    def codebook(self) -> torch.Tensor:
        """l2-normalised codebook ``[vocab_size, embed_dim]``."""
        return self.quantize.codebook()

    # ------------------------------------------------------------------------------------ encoding
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` -> pre-quantisation latents ``[B, D, H/ds, W/ds]``
        (``quant_conv(encoder(x))``, not normalised)."""
        self.check_images(images)
        return self.quant_conv(self.encoder(images))

    def quantize_latents(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents ``[B, D, h, w]`` -> ``(quantized [B, D, h, w], ids [B, h, w])``.

        ``quantized`` holds the normalised codebook rows, written ``z + (e - z)`` with ``z`` the
        normalised latents (straight-through gradient to ``latents``).
        """
        self._check_latents(latents)
        _, zq, ids, _ = self.quantize(latents)
        return zq, ids

    def quantize_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images -> ``(prequant latents, quantized latents, ids)``, the official ``encode`` intermediates."""
        h = self.encode_latents(images)
        zq, ids = self.quantize_latents(h)
        return h, zq, ids

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` -> ids ``LongTensor [B, H/ds, W/ds]`` (raster order when
        flattened: ``row * w + col``)."""
        return self.quantize_latents(self.encode_latents(images))[1]

    # ------------------------------------------------------------------------------------ decoding
    def _grid_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"ids must be a LongTensor [B, h, w] (or [B, h*w] raster order), got {type(ids).__name__}")
        check_tokens(ids, self.vocab_size, "ids")
        if ids.dim() == 2:
            side = math.isqrt(ids.shape[1])
            if side * side != ids.shape[1]:
                raise ValueError(f"ids [B, N] need N to be a square number (square token grid), got N={ids.shape[1]}; "
                                 "pass [B, h, w] for non-square grids")
            ids = ids.view(ids.shape[0], side, side)
        if ids.dim() != 3:
            raise ValueError(f"ids must have shape [B, h, w] (or [B, h*w]), got {tuple(ids.shape)}")
        return ids.long()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids ``[B, h, w]`` (or ``[B, h*w]`` square, raster order) -> normalised code vectors ``[B, D, h, w]``."""
        ids = self._grid_ids(ids)
        return F.embedding(ids, self.codebook()).permute(0, 3, 1, 2).contiguous()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Quantised latents ``[B, D, h, w]`` -> images ``[B, 3, h*ds, w*ds]``, nominally in ``[-1, 1]``
        (not clamped)."""
        self._check_latents(latents)
        return self.decoder(self.post_quant_conv(latents))

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids ``[B, h, w]`` (or ``[B, h*w]``) -> images ``[B, 3, h*ds, w*ds]``, not clamped."""
        return self.decode_latents(self.embed(ids))

    def forward(self, images: torch.Tensor, return_loss: bool = False, **loss_options):
        """Reconstruction ``decode(encode(images))`` with straight-through gradients, or with
        ``return_loss=True`` the dict of :meth:`training_loss` (call it this way through a
        DistributedDataParallel wrapper so its gradient hooks are set up)."""
        if return_loss:
            return self.training_loss(images, **loss_options)
        return self.decode_latents(self.quantize_latents(self.encode_latents(images))[0])

    def _check_latents(self, z: torch.Tensor) -> None:
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or z.shape[1] != self.embed_dim:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"latents must be [B, {self.embed_dim}, h, w] (codebook_embed_dim channels), got {shape}")

    # ------------------------------------------------------------------------------------ training
    def training_loss(self, images: torch.Tensor, return_latents: bool = False) -> dict[str, torch.Tensor]:
        """VQ-VAE losses on a batch ``[B, 3, H, W]`` in ``[-1, 1]``.

        Returns a dict of scalars: ``loss`` (= ``recon + codebook + commit``), ``recon`` (pixel MSE),
        ``codebook`` (``mean |sg(z) - e|^2``), ``commit`` (``beta * mean |z - sg(e)|^2``), and detached
        statistics ``usage`` (fraction of the codebook selected in this batch) and ``perplexity``
        (``exp`` of the entropy of the batch's code histogram). With ``return_latents=True`` it also
        holds ``latents`` ``[N, D]``: the batch's normalised encoder outputs (detached), the
        candidates for :meth:`restart_dead_codes`.

        In training mode the per-code unused-step counters advance by one step. Under an initialised
        ``torch.distributed`` group of several processes (data parallelism) a code counts as used when
        any process selected it: the counts are all-reduced (a collective: every process must run
        its training pass), so all replicas hold the same counters.
        """
        # The 1x1 convs around the quantizer would see channels-last tensors (the encoder's attention leaves its
        # output channels-last; the quantizer's output zq is a permute of [B, h, w, D]) and then compute their
        # weight gradients channels-last, which DistributedDataParallel's contiguous gradient buckets report as
        # "Grad strides do not match bucket view strides" (and copy slowly). Both inputs are made contiguous
        # here, in training only: encode and decode keep their exact numerics.
        self.check_images(images)
        h = self.quant_conv(self.encoder(images).contiguous())
        z_n, zq, ids, codes = self.quantize(h)
        recon = self.decode_latents(zq.contiguous())
        rec_loss = F.mse_loss(recon, images)
        codebook_loss = F.mse_loss(codes, z_n.detach())
        commit_loss = self.commit_beta * F.mse_loss(z_n, codes.detach())
        with torch.no_grad():
            counts = torch.bincount(ids.flatten(), minlength=self.vocab_size)
            if self.training:  # usage of the global batch: every process ages (and restarts) the same codes
                used = all_reduce_(counts.clone(), "sum") if is_distributed() else counts
                self.quantize.steps_unused.add_(1).masked_fill_(used > 0, 0)
            p = counts.float() / counts.sum()
            perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())
            usage = (counts > 0).float().mean()
        out = {"loss": rec_loss + codebook_loss + commit_loss, "recon": rec_loss, "codebook": codebook_loss,
               "commit": commit_loss, "usage": usage, "perplexity": perplexity}
        if self.training:  # candidates for the restarts of after_optimizer_step (this micro-batch only)
            self._restart_candidates = z_n.detach().reshape(-1, self.embed_dim)
        if return_latents:
            out["latents"] = z_n.detach().reshape(-1, self.embed_dim)
        return out

    def restart_interval(self) -> int:
        """Training steps between two dead-code checks of :meth:`after_optimizer_step`."""
        return max(1, self.dead_code_steps // 8)

    @torch.no_grad()
    def after_optimizer_step(self, step: int, gather=None) -> dict[str, float]:
        """Trainer hook: every :meth:`restart_interval` steps, restart dead codes from the encoder
        outputs of the step's last micro-batch (gathered over processes with ``gather``, by default
        :func:`visar.utils.dist.all_gather_cat`, so every process writes the same rows into the same
        dead codes; the pick is seeded by ``step``, so resumed runs stay exact).
        Returns ``{"restarted": n}`` on check steps, else ``{}``. A frozen codebook (decoder-only
        fine-tuning, ``requires_grad=False``) is never restarted: the tokens must not change."""
        cands = getattr(self, "_restart_candidates", None)
        if cands is None or step % self.restart_interval() or not self.quantize.embedding.weight.requires_grad:
            return {}
        cands = gather(cands.contiguous()) if gather is not None else all_gather_cat(cands)
        n = self.restart_dead_codes(cands, generator=torch.Generator().manual_seed(int(step)))
        return {"restarted": float(n)}

    def dead_codes(self, threshold: int | None = None) -> torch.Tensor:
        """Bool mask ``[vocab_size]`` of codes unused for at least ``threshold`` (default
        ``dead_code_steps``) training steps."""
        t = self.dead_code_steps if threshold is None else int(threshold)
        return self.quantize.steps_unused >= t

    @torch.no_grad()
    def restart_dead_codes(self, latents: torch.Tensor, generator: torch.Generator | None = None,
                           threshold: int | None = None) -> int:
        """Re-initialise dead codes from recent encoder outputs; returns how many were restarted.

        Args:
            latents: candidate vectors ``[N, D]`` (e.g. ``training_loss(..., return_latents=True)["latents"]``
                of recent batches) or latents ``[B, D, h, w]``.
            generator: randomness for picking the rows (sampled with replacement when ``N`` is smaller
                than the number of dead codes). Under data parallelism pass the same latents (gathered)
                and an equally seeded generator on every rank so the codebooks stay identical.
            threshold: unused-step count that makes a code dead (default ``dead_code_steps``).

        Only the rows of dead codes change; their counters restart at 0.
        """
        if not isinstance(latents, torch.Tensor) or latents.dim() not in (2, 4):
            raise ValueError("latents must be [N, D] vectors or [B, D, h, w] latents")
        if latents.dim() == 4:
            self._check_latents(latents)
            latents = latents.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        if latents.shape[1] != self.embed_dim or latents.shape[0] == 0:
            raise ValueError(f"latents must be a non-empty [N, {self.embed_dim}] tensor, got {tuple(latents.shape)}")
        dead = self.dead_codes(threshold).nonzero().flatten()
        if dead.numel() == 0:
            return 0
        n = latents.shape[0]
        dev = generator.device if generator is not None else torch.device("cpu")
        if n >= dead.numel():
            pick = torch.randperm(n, generator=generator, device=dev)[: dead.numel()]
        else:
            pick = torch.randint(0, n, (dead.numel(),), generator=generator, device=dev)
        weight = self.quantize.embedding.weight
        weight[dead] = F.normalize(latents[pick.to(latents.device)].float(), dim=-1).to(weight)
        self.quantize.steps_unused[dead] = 0
        log.info("restarted %d dead codes of %d", dead.numel(), self.vocab_size)
        return int(dead.numel())


_PAPER = "Sun et al. 2024, Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation (LlamaGen), Tab. 2"

PRESETS = {
    "llamagen-vq-16": Preset(
        cls="visar.tokenizers.vq:VQTokenizer", kind="tokenizer", paper=_PAPER + "; released vq_ds16_c2i.pt",
        kwargs=dict(codebook_size=16384, codebook_embed_dim=8, ch=128, ch_mult=(1, 1, 2, 2, 4), z_channels=256),
        eval={"image_size": 256, "rFID_reported": 2.19, "dataset": "ImageNet val 50k (LlamaGen README)"}),
    "llamagen-vq-8": Preset(
        cls="visar.tokenizers.vq:VQTokenizer", kind="tokenizer", paper=_PAPER + "; released vq_ds8_c2i.pt",
        kwargs=dict(codebook_size=16384, codebook_embed_dim=8, ch=128, ch_mult=(1, 2, 2, 4), z_channels=256),
        eval={"image_size": 256, "rFID_reported": 0.59, "dataset": "ImageNet val 50k (LlamaGen README)"}),
    "llamagen-vq-tiny": Preset(
        cls="visar.tokenizers.vq:VQTokenizer", kind="tokenizer",
        paper="tiny twin of llamagen-vq-16 (the architecture of the parity fixture vq_tiny_ds16)",
        kwargs=dict(codebook_size=256, codebook_embed_dim=8, ch=32, ch_mult=(1, 1, 1, 1, 2), z_channels=32)),
}
