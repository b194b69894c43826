"""Distilled Decoding students of next-scale (VAR) teachers: the noise of every scale to all scales' tokens.

Distilled Decoding (Liu et al. 2024, "Distilled Decoding 1: One-step Sampling of Image Auto-regressive Models
with Flow Matching", arXiv 2412.17153), next-scale form. The VAR teacher map
(:class:`~visar.samplers.flow_map.NextScaleFlowMapSampler`) gives every token ``j`` of scale ``s`` its own noise
vector; the noise of an image is all scales' noise concatenated, ``eps [L, C]`` with ``L = sum_s pn_s^2`` (scale
0's tokens first, row-major within a scale) and ``C`` the codebook dimension. Token ``(s, j)`` depends on the
class, the tokens of the scales ``< s`` and its own noise. The trajectory states fix whole scales:

    X_t = (c_q of scales 0 .. t-1, eps of scales t .. S-1),   t = 0 .. S

A student learns ``X_t -> q`` for ``t`` in its ``timesteps``, counted in **scales**: ``[0]`` gives a one-step
sampler, ``[0, t2]`` a two-step one (predict every scale from ``X_0``, keep the ``t2`` coarsest scales, put the
same noise back on the rest, predict again from ``X_{t2}``). The intermediate state lies on a scale boundary
because a scale's tokens are drawn together: a state that cut a scale would hold part of a draw.

Architecture (the teacher's family, initialised from the teacher, :meth:`DistilledNextScale.from_teacher`):

* the teacher's whole VAR transformer (:class:`~visar.generators.next_scale.var.NextScaleGenerator`) is copied
  as ``transformer``: class embedding, start embedding, level and position embeddings, ``word_embed``, the
  AdaLN blocks and the AdaLN logits head;
* input at position ``i`` of scale ``s``: ``word_embed(x_i) + indicator[x_i is data] + lvl_embed[s] +
  pos_1LC[i]``, where ``x_i`` is the token's noise or, in an intermediate state, its codebook vector (the
  teacher's ``word_embed`` already maps ``C``-dimensional code features to the width); scale 0's positions also
  get the teacher's start input ``class embedding + pos_start``. ``indicator`` has two learned vectors (noise /
  data) that start at zero;
* VAR's block-causal mask over scales: a position sees its own scale and the coarser ones, so token ``(s, j)``
  sees the class (also through AdaLN), the earlier scales and its own scale's noise, which covers what the
  teacher map's token depends on;
* position ``i`` of scale ``s`` predicts token ``i`` of scale ``s`` from its noise. The teacher's input there is
  the accumulated features of the coarser scales (``area_down(f_hat, pn_s)``) and its output is scale ``s``'s
  logits too, so the copied head starts as the teacher's readout of that scale; only the input changes (noise
  instead of the teacher's accumulated features), as the next-token student predicts token ``i`` at position
  ``i``.

Training objective (visar's choice; the paper's training code is not released): cross-entropy against the
teacher's tokens at the positions still holding noise (scales ``>= t``), every token weighted equally, plus
``regression_weight`` times the squared error of an optional linear regression head (on the normalised final
hidden state) against the codebook vectors ``c_q``. No classifier-free guidance and no label dropout: guidance is
baked into the teacher's pairs. The states, checks and loss are shared with the next-token student
(:mod:`visar.generators.components.distilled_student`).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from visar.generators.components.distilled_student import (DistilledStudent, check_student_options,
                                                           check_timesteps, student_from_teacher)
from visar.generators.next_scale.var import SCHEDULE_256, NextScaleGenerator
from visar.nn.norms import layer_norm_no_affine
from visar.registry import register
from visar.utils.config import register_config
from visar.utils.validation import check_tokens

#: architecture arguments a student copies from its teacher's config
TEACHER_ARCH = ("num_classes", "vocab_size", "token_dim", "scales", "depth", "width", "num_heads", "mlp_ratio",
                "norm_eps", "shared_adaln", "attn_l2_norm")
#: what ``from_teacher`` options may set
OPTIONS = ("regression_weight", "drop_path", "attn_dropout", "dropout")


def quantizer_codebook(tokenizer: Any) -> torch.Tensor:
    """The ``[V, Cvae]`` codebook of a multi-scale tokenizer (or its quantizer): ``embedding.weight``, not
    normalised (what :class:`~visar.samplers.flow_map.NextScaleFlowMapSampler` uses)."""
    q = tokenizer.quantize if isinstance(getattr(tokenizer, "quantize", None), nn.Module) else tokenizer
    emb = getattr(q, "embedding", None)
    if not isinstance(emb, nn.Embedding):
        raise TypeError(f"the tokenizer {type(tokenizer).__name__} has no multi-scale quantizer codebook: a "
                        "next-scale student needs VAR's multi-scale VQ tokenizer")
    return emb.weight.detach()


@register("family", "var-distilled")
class DistilledNextScale(DistilledStudent):
    """One- or two-step student of a class-conditional VAR teacher (see the module docstring).

    Args:
        num_classes, vocab_size, token_dim, scales, depth, width, num_heads, mlp_ratio, norm_eps, shared_adaln,
            attn_l2_norm: the teacher's architecture (:class:`~visar.generators.next_scale.var.NextScaleGenerator`;
            ``token_dim`` is the codebook dimension ``C``).
        timesteps: training states in **scales** (``[0]``: one-step; ``[0, t2]``: two-step, ``t2`` coarsest scales
            kept, the sampler's default intermediate state).
        regression_weight: ``> 0`` adds a linear regression head ``width -> C`` and its squared error against
            ``c_q`` (weighted) to the loss; 0 (default): logits only.
        drop_path, attn_dropout, dropout: training regularisation of the copied blocks (default off).

    The ``codebook`` buffer ``[V, C]`` is set by :meth:`from_teacher`; a student with an all-zero codebook
    was never given one and refuses to run. Tokens come and go as VAR's: a list of ``[B, pn_s, pn_s]`` ids (or
    one ``[B, L]`` tensor of all scales).
    """

    family = "var-distilled"
    token_kind = "multiscale"
    teacher_family = "var"
    state_unit = "scales"

    @register_config
    def __init__(self, num_classes: int = 1000, vocab_size: int = 4096, token_dim: int = 32,
                 scales: Sequence[int] = SCHEDULE_256, depth: int = 16, width: int = 1024, num_heads: int = 16,
                 mlp_ratio: float = 4.0, norm_eps: float = 1e-6, shared_adaln: bool = False,
                 attn_l2_norm: bool = True, timesteps: list | None = None, regression_weight: float = 0.0,
                 drop_path: float = 0.0, attn_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__()
        self.transformer = NextScaleGenerator(num_classes, vocab_size, token_dim, scales, depth, width, num_heads,
                                              mlp_ratio, norm_eps, shared_adaln, attn_l2_norm, class_dropout=0.0,
                                              drop_path=drop_path, attn_dropout=attn_dropout, dropout=dropout)
        self.scales = list(self.transformer.scales)
        sizes = [pn * pn for pn in self.scales]
        self.init_student(vocab_size, token_dim, sum(sizes), num_classes, len(sizes), timesteps, regression_weight,
                          width)
        nn.init.zeros_(self.indicator.weight)
        offsets = torch.tensor([sum(sizes[:k]) for k in range(len(sizes) + 1)])
        self.register_buffer("offsets", offsets, persistent=False)  # [S + 1]: first position of each scale, L

    # -- construction from a teacher -----------------------------------------------------------------
    @classmethod
    def from_teacher(cls, teacher: nn.Module, codebook: torch.Tensor, timesteps: Sequence[int] | None = None,
                     **options: Any) -> "DistilledNextScale":
        """A student of ``teacher`` (a class-conditional VAR ``NextScaleGenerator``) initialised from it.

        Args:
            teacher: the teacher generator (its config names the architecture; all its weights are copied).
            codebook: ``[V, C]`` the teacher tokenizer's quantizer codebook (``embedding.weight``, as the teacher
                map uses it).
            timesteps: training states in scales (``[0]`` one-step, ``[0, t2]`` two-step).
            **options: ``regression_weight``, ``drop_path``, ``attn_dropout``, ``dropout`` (not the architecture).
        """
        cfg = getattr(teacher, "config", None)
        if not isinstance(teacher, NextScaleGenerator) or not isinstance(cfg, dict) or \
                not all(k in cfg for k in TEACHER_ARCH):
            raise TypeError(f"the teacher must be a VAR NextScaleGenerator (class embedding, word embedding, AdaLN "
                            f"blocks, logits head); got {type(teacher).__name__}")
        check_student_options(options, TEACHER_ARCH, OPTIONS)
        if not isinstance(codebook, torch.Tensor) or codebook.dim() != 2 or \
                tuple(codebook.shape) != (cfg["vocab_size"], cfg["token_dim"]):
            raise ValueError(f"codebook must be [V={cfg['vocab_size']}, C={cfg['token_dim']}] (the teacher's "
                             f"quantizer codebook), got {getattr(codebook, 'shape', type(codebook).__name__)}")
        student = cls(timesteps=None if timesteps is None else list(timesteps), **{k: cfg[k] for k in TEACHER_ARCH},
                      **options)
        student.to(teacher.pos_1LC.device)
        with torch.no_grad():
            student.codebook.copy_(codebook.detach().float())
            student.transformer.load_state_dict(teacher.state_dict())
        return student

    # -- the family's layout and checks ----------------------------------------------------------------
    @staticmethod
    def tokenizer_codebook(tokenizer: Any) -> torch.Tensor:
        return quantizer_codebook(tokenizer)

    def check_tokenizer(self, tokenizer) -> None:
        """Kind, vocabulary, scale schedule and codebook vectors must be the ones the student was distilled with."""
        q = tokenizer.quantize if isinstance(getattr(tokenizer, "quantize", None), nn.Module) else tokenizer
        theirs = list(getattr(q, "scales", []))
        if getattr(tokenizer, "kind", None) == self.token_kind and theirs != self.scales:
            raise ValueError(f"the tokenizer's scales {theirs} are not the student's {self.scales}: pair the student "
                             "with its teacher's tokenizer")
        super().check_tokenizer(tokenizer)

    def teacher_mismatch(self, model: Any) -> str | None:
        """The generator must be a VAR model with the same vocabulary, code dimension, scales and classes."""
        if not hasattr(model, "scales") or getattr(model, "emits", None) != "logits":
            return (f"a next-scale student stands in for a VAR teacher, not for {type(model).__name__}; use a "
                    "student distilled from this pipeline's teacher")
        for what, mine, theirs in (("token vocabulary", self.vocab_size, getattr(model, "vocab_size", None)),
                                   ("code dimension", self.codebook_dim, getattr(model, "token_dim", None)),
                                   ("scales", self.scales, list(model.scales)),
                                   ("classes", self.num_classes, getattr(model, "num_classes", None))):
            if mine != theirs:
                return (f"the student was distilled for another tokenizer or teacher: its {what} is {mine}, the "
                        f"pipeline's generator has {theirs}; use a student distilled from this pipeline's teacher")
        return None

    def noise_layout(self) -> str:
        return f"L = {self.num_tokens} tokens of all scales {self.scales}, scale 0 first"

    def flat_tokens(self, tokens: Any, batch: int) -> torch.Tensor:
        """A list of ``S`` id tensors ``[B, pn_s, pn_s]`` (or ``[B, pn_s^2]``), or one ``[B, L]`` -> ``[B, L]``."""
        if isinstance(tokens, (list, tuple)):
            if len(tokens) != len(self.scales):
                raise ValueError(f"tokens must be a list of {len(self.scales)} tensors for scales {self.scales}, got "
                                 f"{len(tokens)}")
            parts = []
            for k, (t, pn) in enumerate(zip(tokens, self.scales)):
                if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.shape[0] != batch or \
                        t[0].numel() != pn * pn:
                    raise ValueError(f"tokens[{k}] must be integer ids [B={batch}, {pn}, {pn}], got "
                                     f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
                parts.append(t.reshape(batch, pn * pn))
            tokens = torch.cat(parts, 1)
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a list of per-scale LongTensors or one [B, L] LongTensor, got "
                            f"{type(tokens).__name__}")
        if tokens.dim() != 2 or tuple(tokens.shape) != (batch, self.num_tokens):
            raise ValueError(f"tokens must be [B={batch}, L={self.num_tokens}] (all scales) or a list of per-scale "
                             f"[B, pn, pn], got {tuple(tokens.shape)}")
        check_tokens(tokens, self.vocab_size)
        return tokens.long()

    def tokens_out(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``[B, L]`` -> list of ``[B, pn_s, pn_s]`` (what the multi-scale tokenizer decodes)."""
        B = flat.shape[0]
        return [p.reshape(B, pn, pn) for p, pn in zip(flat.split([pn * pn for pn in self.scales], 1), self.scales)]

    def prefix_len(self, t: torch.Tensor) -> torch.Tensor:
        """State ``t`` fixes the ``t`` coarsest scales: ``pn_0^2 + ... + pn_{t-1}^2`` positions."""
        return self.offsets.to(t.device)[t]

    # -- the network ---------------------------------------------------------------------------------
    def network(self, x: torch.Tensor, labels: torch.Tensor, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Block-causal pass over all scales: position ``i`` of scale ``s`` -> logits of token ``i`` of scale ``s``."""
        v = self.transformer
        w = v.word_embed.weight
        cond_emb = v.class_emb(labels)  # [B, D]
        h = v.word_embed(x.to(w.dtype)) + self.indicator(data.long()) + v.lvl_embed(v.lvl_1L) + v.pos_1LC
        start = cond_emb[:, None] + v.pos_start  # [B, pn_0^2, D]: the teacher's start input
        h = torch.cat([h[:, :v.first_len] + start, h[:, v.first_len:]], 1)  # [B, L, D]
        for block, mods in zip(v.blocks, v.condition_mods(cond_emb)):
            h = block(h, mods, mask=v.attn_mask)
        return v.head_logits(h, cond_emb), layer_norm_no_affine(h, v.norm_eps)

    def no_weight_decay(self) -> set[str]:
        """VAR's rule on the copied transformer (:meth:`NextScaleGenerator.no_weight_decay`), plus the indicator."""
        return {f"transformer.{n}" for n in self.transformer.no_weight_decay()} | {"indicator.weight"}


__all__ = ["DistilledNextScale", "quantizer_codebook", "student_from_teacher", "check_timesteps"]
