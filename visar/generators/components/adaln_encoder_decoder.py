"""The AdaLN encoder-decoder shared by FlowAR (next-scale flow) and xAR (next-X).

Both official models (Ren et al.) run the same trunk over a block-causal sequence of ``L`` positions:

``z_proj_ln(h + encoder_pos_embed)`` -> encoder :class:`~visar.nn.adaln_block.AdaLNBlock` stack (2D
RoPE, static KV cache) -> ``encoder_norm`` -> ``decoder_embed(.) + decoder_pos_embed`` -> decoder
stack -> ``decoder_norm``. FlowAR adds ``diffusion_pos_embed_learned`` (the flow head's condition),
xAR a ``pred`` linear (the velocity).

:class:`AdaLNEncoderDecoder` is a mixin for the generator (an ``nn.Module``): the submodules are set
on the generator itself, so the state-dict keys stay the official ones (``z_proj.weight``,
``encoder_blocks.0.ada_lin.1.weight``, ...) and the converters and saved files keep loading.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from visar.generators.components.entities import block_causal_mask
from visar.generators.protocol import StepState
from visar.nn.adaln_block import AdaLNBlock
from visar.nn.kv_cache import CacheState
from visar.nn.norms import RMSNorm
from visar.nn.rope import rope_2d_angles, rope_tables


def check_rope_width(width: int, num_heads: int, what: str = "width") -> None:
    """``width / num_heads`` must be an integer head dim divisible by 4 (2D RoPE)."""
    if width % num_heads or (width // num_heads) % 4:
        raise ValueError(f"{what} {width} / {num_heads} heads must give a head dim divisible by 4 (2D RoPE)")


@dataclass
class TrunkState(StepState):
    """What a sampling state of an :class:`AdaLNEncoderDecoder` model carries besides ``batch`` and ``guided``.

    Attributes:
        device: the model's device (noise drawn elsewhere is moved here).
        cache: static KV cache of the ``R`` rows over all ``L`` positions, or ``None`` (uncached path).
        inputs: the input of the model's last or next call (family-specific, see the generator).
    """

    device: torch.device | None = None
    cache: CacheState | None = None
    inputs: torch.Tensor | None = None


class AdaLNEncoderDecoder:
    """Mixin: the encoder/decoder trunk of FlowAR and xAR (both stacks share width and heads).

    A subclass (also a :class:`~visar.generators.base.Generator`) calls :meth:`build_encoder_decoder`
    and :meth:`register_layout` in its constructor and sets ``in_channels`` and ``latent_side``.
    """

    width: int
    num_heads: int
    in_channels: int
    latent_side: int

    def build_encoder_decoder(self, in_channels: int, width: int, num_heads: int, seq_len: int, encoder_depth: int,
                              decoder_depth: int, mlp_ratio: float = 4.0, attn_dropout: float = 0.0,
                              proj_dropout: float = 0.0) -> None:
        """Create ``z_proj``, ``z_proj_ln``, ``encoder_pos_embed_learned [1, L, D]``, ``encoder_blocks``,
        ``encoder_norm``, ``decoder_embed``, ``decoder_pos_embed_learned``, ``decoder_blocks`` and
        ``decoder_norm`` (in this order: the order of the random initialisation)."""
        check_rope_width(width, num_heads)
        self.width, self.num_heads = width, num_heads
        D = width

        def stack(depth: int) -> nn.ModuleList:
            return nn.ModuleList(AdaLNBlock(D, num_heads, mlp_ratio, qkv_bias=True, attn_dropout=attn_dropout,
                                            proj_dropout=proj_dropout) for _ in range(depth))

        self.z_proj = nn.Linear(in_channels, D)
        self.z_proj_ln = RMSNorm(D, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len, D))
        self.encoder_blocks = stack(encoder_depth)
        self.encoder_norm = RMSNorm(D, eps=1e-6)
        self.decoder_embed = nn.Linear(D, D)
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len, D))
        self.decoder_blocks = stack(decoder_depth)
        self.decoder_norm = RMSNorm(D, eps=1e-6)

    def register_layout(self, sizes: list[int], rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Non-persistent buffers: the block-causal ``mask [L, L]`` over blocks of ``sizes`` and the 2D RoPE
        tables ``rope_cos`` / ``rope_sin [L, head_dim/2]`` of grid coordinates ``rows``, ``cols [L]``."""
        self.register_buffer("mask", block_causal_mask(sizes), persistent=False)
        cos, sin = rope_tables(rope_2d_angles(rows, cols, self.width // self.num_heads))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def num_layers(self) -> int:
        """Encoder plus decoder blocks (the layers of a KV cache)."""
        return len(self.encoder_blocks) + len(self.decoder_blocks)

    def new_cache(self, rows: int, dtype: torch.dtype, device: torch.device) -> CacheState:
        """A static KV cache of ``rows`` sequences over all ``L`` positions and every layer."""
        return CacheState(self.num_layers, rows, self.encoder_pos_embed_learned.shape[1], self.num_heads,
                          self.width // self.num_heads, dtype=dtype, device=device)

    def encode_decode(self, h: torch.Tensor, c: torch.Tensor, start: int = 0, cache: CacheState | None = None,
                      mask: torch.Tensor | None = None, cond_index: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder + decoder over sequence positions ``[start, start + n)``.

        Args:
            h: ``[B, n, D]`` embedded inputs (before the positional embedding).
            c: adaLN condition: ``[B, D]`` per image, ``[B, n, D]`` per token, or ``[B, e, D]`` per block
                with ``cond_index [n]`` (values in ``[0, e)``) naming each position's block: the
                modulation is computed per block, then expanded (bit-exact with expanding ``c``).
            cache: static KV cache; keys/values are written at ``start`` and the queries attend to
                ``[0, start + n)``.
            mask: additive mask ``[n, start + n]`` (rows of the block-causal mask) or ``None``.
        Returns:
            ``decoder_norm`` output ``[B, n, D]``.
        """
        end = start + h.shape[1]
        rope = (self.rope_cos[start:end], self.rope_sin[start:end])
        layers = list(cache.layers) if cache is not None else [None] * self.num_layers
        h = self.z_proj_ln(h + self.encoder_pos_embed_learned[:, start:end])
        n_enc = len(self.encoder_blocks)
        for blk, layer in zip(self.encoder_blocks, layers[:n_enc]):
            h = blk(h, c, rope=rope, mask=mask, cache=layer, cache_pos=start, attend_len=end, cond_index=cond_index)
        h = self.decoder_embed(self.encoder_norm(h)) + self.decoder_pos_embed_learned[:, start:end]
        for blk, layer in zip(self.decoder_blocks, layers[n_enc:]):
            h = blk(h, c, rope=rope, mask=mask, cache=layer, cache_pos=start, attend_len=end, cond_index=cond_index)
        return self.decoder_norm(h)

    def check_latents(self, latents: torch.Tensor) -> None:
        """``latents`` must be a float ``[B, in_channels, S, S]`` tensor (scaled KL latents, ``S = latent_side``)."""
        S, C = self.latent_side, self.in_channels
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError(f"latents must be a float tensor [B, {C}, {S}, {S}]")
        if latents.dim() != 4 or tuple(latents.shape[1:]) != (C, S, S):
            raise ValueError(f"latents must have shape [B, {C}, {S}, {S}] (scaled KL latents; {S * 16} px images "
                             f"with KL-16), got {tuple(latents.shape)}")

    def check_tokenizer(self, tokenizer) -> None:
        """The generator checks (kind) plus the tokenizer's latent channels."""
        super().check_tokenizer(tokenizer)
        ch = getattr(tokenizer, "latent_channels", None)
        if ch is not None and ch != self.in_channels:
            raise ValueError(f"the tokenizer has {ch} latent channels but this generator models {self.in_channels}")


__all__ = ["AdaLNEncoderDecoder", "TrunkState", "check_rope_width"]
