"""VAR's multi-scale residual VQVAE tokenizer (Tian et al. 2024, Sec. 3.2 and Alg. 1-2).

``images [B, 3, H, W] in [-1, 1]`` -> conv encoder (LDM topology, :mod:`visar.nn.autoencoder`) ->
``quant_conv`` (3x3) -> ``f [B, Cvae, h, w]`` -> multi-scale residual quantisation
(:class:`~visar.tokenizers.msvq_quantizer.MultiScaleResidualQuantizer`) -> a list of ``S`` token maps
``[B, pn_k, pn_k]``. Decoding accumulates ``f_hat`` over all scales and runs ``post_quant_conv`` (3x3)
and the decoder; the output is clamped to ``[-1, 1]`` as in the official ``fhat_to_img``.

The tokenizer must be built with the schedule it serves (it decides the scales and the residual-conv
index of each scale); ``h = H / downsample`` must equal the last scale.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from visar.tokenizers.base import Tokenizer
from visar.tokenizers.msvq_quantizer import MultiScaleResidualQuantizer
from visar.utils.config import register_config
from visar.registry import Preset, register

SCHEDULE_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


@register("tokenizer", "msvq")
class MultiScaleVQTokenizer(Tokenizer):
    """Multi-scale residual VQVAE.

    Args:
        vocab_size: codebook size ``V`` (4096 in VAR).
        token_dim: code dimension ``Cvae`` (32 in VAR).
        scales: token-map sides ``pn_k``; the last one is the latent side ``H / downsample``.
        ch, ch_mult, num_res_blocks: conv autoencoder size (VAR: 160, (1, 1, 2, 2, 4), 2).
        num_phi, phi_ratio: shared residual convs and their mixing ratio (4 and 0.5 in VAR).
        beta: commitment weight of the training loss.
        quant_conv_kernel: kernel of ``quant_conv`` / ``post_quant_conv`` (3 in VAR).
        restart_unused: dead-code restarts during training (0 = off, as in VAR; see the quantizer).
    """

    kind = "multiscale"
    family = "var"

    @register_config
    def __init__(self, vocab_size: int = 4096, token_dim: int = 32, scales: Sequence[int] = SCHEDULE_256,
                 ch: int = 160, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 num_phi: int = 4, phi_ratio: float = 0.5, beta: float = 0.25, quant_conv_kernel: int = 3,
                 restart_unused: int = 0):
        super().__init__()
        from visar.nn.autoencoder import build_decoder, build_encoder

        self.downsample = 2 ** (len(ch_mult) - 1)
        self.encoder = build_encoder(ch, ch_mult, num_res_blocks, token_dim)
        self.decoder = build_decoder(ch, ch_mult, num_res_blocks, token_dim)
        pad = quant_conv_kernel // 2
        self.quant_conv = nn.Conv2d(token_dim, token_dim, quant_conv_kernel, padding=pad)
        self.post_quant_conv = nn.Conv2d(token_dim, token_dim, quant_conv_kernel, padding=pad)
        self.quantize = MultiScaleResidualQuantizer(vocab_size, token_dim, scales, num_phi, phi_ratio, beta,
                                                    restart_unused)

    @property
    def scales(self) -> list[int]:
        return self.quantize.scales

    @property
    def vocab_size(self) -> int:
        return self.quantize.vocab_size

    @property
    def image_size(self) -> int:
        """The only image side this schedule accepts (``last scale * downsample``)."""
        return self.quantize.latent_side * self.downsample

    def check_images(self, images: torch.Tensor) -> None:
        super().check_images(images)
        H, W = images.shape[-2:]
        if H != self.image_size or W != self.image_size:
            raise ValueError(f"images are {H}x{W} but this tokenizer's schedule {self.scales} ends at "
                             f"{self.scales[-1]}x{self.scales[-1]} tokens, i.e. {self.image_size}x{self.image_size} "
                             f"pixels; resize the images or build the tokenizer with a schedule ending at "
                             f"{H // self.downsample} (e.g. load_tokenizer(path, scales=[...]))")

    # ---- encode ------------------------------------------------------------------------------------------
    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, 3, H, W]`` in ``[-1, 1]`` -> continuous latent ``f [B, Cvae, h, w]``."""
        self.check_images(images)
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``images [B, 3, H, W]`` in ``[-1, 1]`` -> list of ids ``LongTensor [B, pn_k, pn_k]``."""
        ids, _ = self.quantize.quantize(self.encode_latent(images))
        return ids

    # ---- decode ------------------------------------------------------------------------------------------
    def decode_fhat(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Accumulated latent ``f_hat [B, Cvae, h, w]`` -> images ``[B, 3, H, W]`` clamped to ``[-1, 1]``."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def tokens_to_fhat(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-scale ids -> ``f_hat [B, Cvae, h, w]`` (sum of the residuals of all scales)."""
        return self.quantize.tokens_to_fhat(tokens)

    @torch.no_grad()
    def decode(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """List of ids ``[B, pn_k, pn_k]`` (or ``[B, pn_k^2]``) -> images ``[B, 3, H, W]`` in ``[-1, 1]`` (clamped)."""
        return self.decode_fhat(self.tokens_to_fhat(tokens))

    def teacher_forcing_inputs(self, tokens: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-scale ids -> VAR's transformer inputs ``[B, L - pn_0^2, Cvae]``."""
        return self.quantize.teacher_forcing_inputs(tokens)

    # ---- training ----------------------------------------------------------------------------------------
    def training_loss(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training pass. Returns ``loss = recon + vq`` with ``recon`` the pixel MSE of the
        reconstruction and ``vq`` the multi-scale codebook + ``beta`` * commitment loss (VAR's
        ``VectorQuantizer2``), plus ``usage``: the fraction of the codebook hit in this batch.

        (The released VQVAE was trained with extra perceptual and GAN terms that visar does not ship.)
        """
        f = self.encode_latent(images)
        f_hat, vq, ids = self.quantize(f)
        recon = self.decoder(self.post_quant_conv(f_hat))
        rec = F.mse_loss(recon, images)
        used = torch.zeros(self.vocab_size, dtype=torch.bool, device=images.device)
        for i in ids:
            used[i.reshape(-1)] = True
        return {"loss": rec + vq, "recon": rec.detach(), "vq": vq.detach(), "usage": used.float().mean()}


PRESETS = {
    "var-vqvae": Preset("visar.tokenizers.msvq:MultiScaleVQTokenizer",
                        dict(vocab_size=4096, token_dim=32, scales=list(SCHEDULE_256), ch=160), kind="tokenizer",
                        paper="Tian et al. 2024, VAR (vae_ch160v4096z32.pth, 256 px schedule)"),
    "var-vqvae-512": Preset("visar.tokenizers.msvq:MultiScaleVQTokenizer",
                            dict(vocab_size=4096, token_dim=32, scales=[1, 2, 3, 4, 6, 9, 13, 18, 24, 32], ch=160),
                            kind="tokenizer", paper="Tian et al. 2024, VAR (same file, 512 px schedule)"),
    "var-vqvae-tiny": Preset("visar.tokenizers.msvq:MultiScaleVQTokenizer",
                             dict(vocab_size=64, token_dim=16, scales=[1, 2, 3, 4], ch=32), kind="tokenizer",
                             paper="visar test twin of VAR's VQVAE (64 px, 4 scales)"),
}
