"""Next-token prediction over discrete image tokens: LlamaGen's GPT (Sun et al. 2024, arXiv 2406.06525).

``NextTokenGenerator`` = condition embedding (class label with a CFG null class, or projected caption
features with a learned unconditional caption) + token embedding + :class:`LlamaTrunk` + linear
logits head. Image tokens are ``LongTensor [B, h, w]`` (raster order) of a VQ tokenizer.

* Teacher forcing: ``generator(tokens, cond) -> logits [B, L, V]``; ``logits[:, i]`` is the
  distribution of image token ``i`` given the condition and tokens ``< i``.
* Training: ``loss(tokens, cond)`` (cross-entropy, class/caption dropout for CFG).
* Step protocol over a static KV cache (:class:`~visar.generators.protocol.NextTokenModel`: ``start`` /
  ``step`` / ``rewind`` / ``decode_step``, from :class:`~visar.generators.components.token_cache_steps.CachedTokenSteps`),
  emitting raw float32 logits ``[R, n, V]``; samplers drive it. ``sample(cond, generator, **options)``
  delegates to the default sampler, :class:`~visar.samplers.autoregressive.AutoregressiveSampler`.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from visar.conditions import cat_conditions
from visar.generators.base import Condition, Generator
from visar.generators.components.draws import check_draw
from visar.generators.components.llama_trunk import CaptionEmbedding, LlamaTrunk, init_llama_weights
from visar.generators.components.token_cache_steps import CachedTokenSteps, NextTokenState  # noqa: F401 (re-exported)
from visar.nn.embeddings import LabelEmbedding
from visar.registry import Preset, register
from visar.utils.config import register_config
from visar.utils.validation import check_labels, check_tokens

log = logging.getLogger("visar")


@register("family", "llamagen")
class NextTokenGenerator(CachedTokenSteps, Generator):
    """LlamaGen GPT (class- or text-conditional).

    Args:
        vocab_size: image-token vocabulary ``V`` (the VQ codebook size, 16384 officially).
        dim, depth, num_heads: transformer width, blocks and heads (GPT-B: 768, 12, 12).
        grid_size: image tokens per side (16 for 256 px and 24 for 384 px with a ds16 VQ).
        num_classes: class-conditional models: number of classes (the null class is ``num_classes``).
        caption_dim: text-conditional models: width of the caption features (2048 for flan-t5-xl);
            ``None`` makes a class-conditional model.
        cls_token_num: condition tokens ``C`` (1 for classes, 120 caption tokens for text).
        ffn_hidden: SwiGLU width; ``None`` is ``find_multiple(int(2*4*dim/3), 256)``.
        rope_base, norm_eps: RoPE base (10000) and RMSNorm epsilon (1e-5).
        class_dropout: probability of replacing the condition by the null class / unconditional
            caption during training (CFG), 0.1 in LlamaGen.
        token_dropout, resid_dropout, ffn_dropout, attn_dropout: training dropouts (LlamaGen: 0.1,
            0.1, 0.1, 0.0); off in eval mode.
        init_std: std of the normal init of linear layers and embeddings; the logits head starts at
            zero as in LlamaGen.
    """

    family = "llamagen"
    token_kind = "discrete"
    emits = "logits"
    default_sampler = "autoregressive"

    @register_config
    def __init__(self, vocab_size: int = 16384, dim: int = 768, depth: int = 12, num_heads: int = 12,
                 grid_size: int = 16, num_classes: int = 1000, caption_dim: int | None = None,
                 cls_token_num: int = 1, ffn_hidden: int | None = None, rope_base: float = 10000.0,
                 norm_eps: float = 1e-5, class_dropout: float = 0.1, token_dropout: float = 0.1,
                 resid_dropout: float = 0.1, ffn_dropout: float = 0.1, attn_dropout: float = 0.0,
                 init_std: float = 0.02):
        super().__init__()
        for name, v in dict(vocab_size=vocab_size, dim=dim, depth=depth, num_heads=num_heads,
                            grid_size=grid_size, cls_token_num=cls_token_num).items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if caption_dim is None and num_classes < 1:
            raise ValueError("a class-conditional model needs num_classes >= 1 (or give caption_dim for text)")
        if not 0.0 <= class_dropout < 1.0:
            raise ValueError(f"class_dropout must be in [0, 1), got {class_dropout}")
        self.vocab_size, self.grid_size = vocab_size, grid_size
        self.num_tokens = grid_size * grid_size
        self.text_conditional = caption_dim is not None
        self.num_classes = 0 if self.text_conditional else num_classes
        self.caption_dim, self.cls_token_num = caption_dim, cls_token_num
        self.class_dropout = class_dropout
        if self.text_conditional:
            self.cond_embed = CaptionEmbedding(caption_dim, dim, cls_token_num)
        else:
            if cls_token_num != 1:
                raise ValueError("class-conditional LlamaGen uses one class token (cls_token_num=1)")
            self.cond_embed = LabelEmbedding(num_classes, dim)
        self.tok_embed = nn.Embedding(vocab_size, dim)
        self.trunk = LlamaTrunk(dim, depth, num_heads, cls_token_num, grid_size, ffn_hidden=ffn_hidden,
                                rope_base=rope_base, norm_eps=norm_eps, token_dropout=token_dropout,
                                attn_dropout=attn_dropout, resid_dropout=resid_dropout, ffn_dropout=ffn_dropout)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        init_llama_weights(self, init_std)
        nn.init.zeros_(self.head.weight)

    # -- conditions ----------------------------------------------------------------------------
    @property
    def null_class(self) -> int:
        return self.num_classes

    def check_condition(self, cond: Condition, allow_null: bool = False) -> None:
        """Class ids in ``[0, num_classes)`` (``allow_null`` admits the null class) for class models;
        caption features ``[B, T <= cls_token_num, caption_dim]`` (and mask ``[B, T]``) for text models."""
        if not isinstance(cond, Condition):
            raise TypeError(f"expected a visar Condition, got {type(cond).__name__}; use Condition.of(class_ids)")
        if self.text_conditional:
            if cond.text is None:
                raise ValueError("this LlamaGen model is text-conditional: give Condition(text=[B, T, "
                                 f"{self.caption_dim}] caption features, text_mask=[B, T])")
            t = cond.text
            if t.dim() != 3 or t.shape[-1] != self.caption_dim:
                raise ValueError(f"caption features must be [B, T, {self.caption_dim}] (the width of the text "
                                 f"encoder this model was trained with), got {tuple(t.shape)}")
            if t.shape[1] > self.cls_token_num:
                raise ValueError(f"caption has {t.shape[1]} tokens but the model takes at most "
                                 f"{self.cls_token_num}; truncate the prompt features")
            if cond.text_mask is not None and tuple(cond.text_mask.shape) != tuple(t.shape[:2]):
                raise ValueError(f"text_mask must be [B, T] = {tuple(t.shape[:2])}, got {tuple(cond.text_mask.shape)}")
        else:
            if cond.labels is None:
                raise ValueError("this LlamaGen model is class-conditional: give class ids, e.g. Condition.of([1, 2])")
            if cond.labels.dim() != 1:
                raise ValueError(f"class ids must be a 1-D tensor [B], got shape {tuple(cond.labels.shape)}")
            check_labels(cond.labels, self.num_classes, allow_null=allow_null)

    def null_condition(self, cond: Condition) -> Condition:
        """The unconditional counterpart of ``cond`` (null class, or the learned unconditional caption
        with the **same** padding mask, as LlamaGen's CFG does)."""
        B = cond.batch_size
        if self.text_conditional:
            cond = self.padded_text(cond)
            return Condition(text=self.cond_embed.uncond_embedding[None].expand(B, -1, -1), text_mask=cond.text_mask)
        return Condition(labels=torch.full((B,), self.null_class, dtype=torch.long, device=cond.labels.device))

    def padded_text(self, cond: Condition) -> Condition:
        """Caption ``[B, C, caption_dim]`` left-padded to ``C = cls_token_num`` with its mask ``[B, C]``."""
        text, mask = cond.text, cond.text_mask
        B, T, _ = text.shape
        C = self.cls_token_num
        if T < C:  # left padding: valid features at the end (LlamaGen's convention)
            text = torch.cat([text.new_zeros(B, C - T, text.shape[-1]), text], dim=1)
            if mask is None:
                mask = torch.ones(B, T, device=text.device)
            mask = torch.cat([mask.new_zeros(B, C - T), mask], dim=1)
        return Condition(text=text, text_mask=mask)

    def embed_condition(self, cond: Condition, drop_prob: float = 0.0,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Condition tokens ``[B, C, D]`` and the condition mask ``[B, C]`` (text models; else ``None``)."""
        dtype = self.tok_embed.weight.dtype
        if self.text_conditional:
            cond = self.padded_text(cond)
            return self.cond_embed(cond.text.to(dtype), drop_prob, generator), cond.text_mask
        return self.cond_embed(cond.labels, drop_prob, generator)[:, None], None

    def _tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a LongTensor [B, L] or [B, h, w], got {type(tokens).__name__}")
        if tokens.dim() == 3:
            tokens = tokens.flatten(1)
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, L] or [B, h, w], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.num_tokens:
            raise ValueError(f"{tokens.shape[1]} tokens exceed the model's {self.num_tokens} "
                             f"({self.grid_size}x{self.grid_size}); is grid_size right for this image size?")
        check_tokens(tokens, self.vocab_size)
        return tokens.long()

    # -- teacher forcing -----------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, cond: Condition, return_hidden: bool = False,
                drop_prob: float = 0.0, generator: torch.Generator | None = None):
        """Teacher-forced logits.

        Args:
            tokens: ``LongTensor [B, L]`` or ``[B, h, w]`` image tokens (``L <= grid_size**2``).
            cond: class ids (the null class ``num_classes`` is allowed here, giving unconditional
                logits) or caption features.
            return_hidden: also return a dict of hidden states ``[B, L, D]`` at the positions that
                predict the ``L`` tokens: ``embed`` (entering block 0), ``layer{i}`` (after block ``i``),
                ``final_norm``.
        Returns:
            ``logits [B, L, V]`` (float32), ``logits[:, i]`` predicting token ``i``; with
            ``return_hidden`` a tuple ``(logits, hidden)``.
        """
        tokens = self._tokens(tokens)
        self.check_condition(cond, allow_null=True)
        if cond.batch_size != tokens.shape[0]:
            raise ValueError(f"{cond.batch_size} conditions for {tokens.shape[0]} token rows")
        cond_tokens, cond_mask = self.embed_condition(cond, drop_prob, generator)
        C, L = self.cls_token_num, tokens.shape[1]
        x = self.tok_embed(tokens[:, :-1])  # [B, L-1, D]
        out = self.trunk(cond_tokens, x, cond_mask, return_hidden=return_hidden)
        h, hidden = out if return_hidden else (out, None)
        logits = self.head(h[:, C - 1:C - 1 + L]).float()  # [B, L, V]
        if not return_hidden:
            return logits
        names = ["embed"] + [f"layer{i}" for i in range(len(hidden) - 2)] + ["final_norm"]
        return logits, {n: t[:, C - 1:C - 1 + L] for n, t in zip(names, hidden)}

    #: ``optim.ema: official``: LlamaGen's documented runs train without EMA (``--ema`` is off by default; with
    #: it, a constant 0.9999 over the parameters, ``optim.ema: constant`` with ``train.ema_decay: 0.9999``)
    official_ema_decay = 0.0

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay besides 1-D tensors and biases (timm's convention): none, since
        LlamaGen's ``creat_optimizer`` decays every tensor with >= 2 dimensions (embeddings included)."""
        return set()

    def loss(self, tokens: torch.Tensor, cond: Condition, generator: torch.Generator | None = None,
             drop_prob: float | None = None, *, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy of ``tokens [B, h, w]`` or ``[B, L]`` given ``cond``.

        In training mode the condition is replaced by the null class / unconditional caption with
        probability ``drop_prob`` (default: the model's ``class_dropout``), drawn from ``generator``.
        ``drop`` (``[B]`` bool, True = replaced) gives that draw explicitly and applies in any mode. The
        dropouts inside the trunk (``token_dropout``, ...) are ``nn.Dropout`` draws of torch's global RNG.
        """
        tokens = self._tokens(tokens)
        self.check_condition(cond, allow_null=True)
        if cond.batch_size != tokens.shape[0]:
            raise ValueError(f"{cond.batch_size} conditions for {tokens.shape[0]} token rows")
        B = tokens.shape[0]
        p = (self.class_dropout if drop_prob is None else drop_prob) if self.training else 0.0
        if drop is not None:
            drop = check_draw("drop", drop, (B,), "mask", tokens.device)
        elif p > 0:
            drop = torch.rand(B, generator=generator, device=self._condition_device(cond)) < p
        if drop is not None:
            cond = self.drop_condition(cond, drop)
        logits = self.forward(tokens, cond)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))

    @staticmethod
    def _condition_device(cond: Condition) -> torch.device:
        return (cond.text if cond.labels is None else cond.labels).device

    def drop_condition(self, cond: Condition, drop: torch.Tensor) -> Condition:
        """``cond`` with the rows where ``drop [B]`` (bool) is True replaced by the null condition (null class,
        or the unconditional caption with the row's padding mask kept)."""
        null = self.null_condition(cond)
        if not self.text_conditional:
            return Condition(labels=torch.where(drop.to(cond.labels.device), null.labels, cond.labels))
        cond, dtype = self.padded_text(cond), self.tok_embed.weight.dtype
        text = torch.where(drop.to(cond.text.device)[:, None, None], null.text.to(dtype), cond.text.to(dtype))
        return Condition(text=text, text_mask=cond.text_mask)

    # -- step protocol (start / step / rewind / decode_step from CachedTokenSteps) ---------------
    def step_condition(self, cond: Condition, guided: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embedded condition rows ``[R, C, D]`` (``[cond; null]`` when ``guided``) and their mask."""
        self.check_condition(cond, allow_null=True)
        cond = cond.to(self.tok_embed.weight.device)
        if self.text_conditional:
            cond = self.padded_text(cond)
        if guided:
            cond = cat_conditions(cond, self.null_condition(cond))
        return self.embed_condition(cond)

    def check_step_inputs(self, tokens: torch.Tensor, batch: int, rows: int) -> torch.Tensor:
        """Image-token ids ``LongTensor [B or R, n]`` in ``[0, vocab_size)``."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] not in (batch, rows):
            raise ValueError(f"tokens must be a LongTensor [B={batch}, n] or [R={rows}, n]")
        check_tokens(tokens, self.vocab_size)
        return tokens.long()

    def embed_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embed(tokens)

    def emit(self, h: torch.Tensor) -> torch.Tensor:
        """Raw float32 logits ``[..., V]`` of hidden states ``[..., D]``."""
        return self.head(h).float()

    def check_tokenizer(self, tokenizer) -> None:
        """Kind and vocabulary must match the tokenizer (``vocab_size`` == codebook size)."""
        super().check_tokenizer(tokenizer)
        vocab = getattr(tokenizer, "vocab_size", None)
        if vocab != self.vocab_size:
            raise ValueError(f"the tokenizer has {vocab} codes but this generator models {self.vocab_size} "
                             "token ids; pair the generator with the VQ it was trained on")


_C = "visar.generators.next_token.llamagen:NextTokenGenerator"
_PAPER = "Sun et al. 2024, Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation (arXiv 2406.06525)"
_EVAL_SRC = ("LlamaGen GETTING_STARTED.md 'Sampling' commands and README FID table (commit ce98ec4): "
             "sample_c2i_ddp.py, 50k samples, ADM evaluator against VIRTUAL_imagenet256_labeled.npz")


def _c2i_eval(cfg: float, image_size: int, fid: float, weights: str) -> dict[str, Any]:
    return {"dataset": "imagenet-1k", "cfg_scale": cfg, "cfg_interval": -1, "temperature": 1.0, "top_k": 0,
            "top_p": 1.0, "image_size": image_size, "image_size_eval": 256, "num_samples": 50000,
            "labels": "random (uniform class ids)", "seed": 0, "fid_reported": fid, "weights": weights,
            "tokenizer": "llamagen-vq-16 (vq_ds16_c2i.pt)", "source": _EVAL_SRC}


_OFFICIAL = dict(vocab_size=16384, num_classes=1000)
PRESETS = {
    "llamagen-gpt-b": Preset(_C, dict(_OFFICIAL, dim=768, depth=12, num_heads=12, grid_size=16), "generator",
                             _PAPER + "; GPT-B 111M",
                             dict(_c2i_eval(2.0, 256, 5.46, "c2i_B_256.pt (24x24: c2i_B_384.pt, FID 6.09)"),
                                  note="the GETTING_STARTED command gives cfg 2.0 for GPT-B at image-size 384; "
                                       "the README FID 5.46 is the 16x16 (256 px) model")),
    "llamagen-gpt-l": Preset(_C, dict(_OFFICIAL, dim=1024, depth=24, num_heads=16, grid_size=24), "generator",
                             _PAPER + "; GPT-L 343M",
                             _c2i_eval(2.0, 384, 3.07, "c2i_L_384.pt (16x16: c2i_L_256.pt, FID 3.80)")),
    "llamagen-gpt-xl": Preset(_C, dict(_OFFICIAL, dim=1280, depth=36, num_heads=20, grid_size=24), "generator",
                              _PAPER + "; GPT-XL 775M", _c2i_eval(1.75, 384, 2.62, "c2i_XL_384.pt")),
    "llamagen-gpt-xxl": Preset(_C, dict(_OFFICIAL, dim=1536, depth=48, num_heads=24, grid_size=24), "generator",
                               _PAPER + "; GPT-XXL 1.4B (FSDP, bare state dict)",
                               _c2i_eval(1.75, 384, 2.34, "c2i_XXL_384.pt")),
    "llamagen-gpt-3b": Preset(_C, dict(_OFFICIAL, dim=3200, depth=24, num_heads=32, grid_size=24), "generator",
                              _PAPER + "; GPT-3B 3.1B, head_dim 100 (FSDP, bare state dict)",
                              _c2i_eval(1.65, 384, 2.18, "c2i_3B_384.pt")),
    "llamagen-gpt-xl-t2i": Preset(
        _C, dict(vocab_size=16384, dim=1280, depth=36, num_heads=20, grid_size=16, caption_dim=2048,
                 cls_token_num=120), "generator", _PAPER + "; GPT-XL text-conditional (flan-t5-xl features)",
        {"dataset": "text prompts (no FID protocol released)", "cfg_scale": 7.5, "temperature": 1.0, "top_k": 1000,
         "top_p": 1.0, "image_size": 256, "text_encoder": "google/flan-t5-xl, 120 tokens, left padded",
         "weights": "t2i_XL_stage1_256.pt (grid_size=32: t2i_XL_stage2_512.pt)",
         "tokenizer": "llamagen-vq-16 (vq_ds16_t2i.pt)",
         "source": "LlamaGen autoregressive/sample/sample_t2i.py defaults (commit ce98ec4)"}),
    "llamagen-gpt-tiny": Preset(
        _C, dict(vocab_size=256, dim=128, depth=2, num_heads=2, grid_size=4, num_classes=10), "generator",
        "visar test twin of the LlamaGen GPT (the parity fixture's architecture)", {}),
}
