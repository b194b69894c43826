"""Distilled Decoding students of next-token (LlamaGen) teachers: a noise sequence to all tokens in one pass.

Distilled Decoding (Liu et al. 2024, "Distilled Decoding 1: One-step Sampling of Image Auto-regressive Models
with Flow Matching", arXiv 2412.17153). The teacher map (:mod:`visar.samplers.flow_map`) turns a noise
sequence ``eps [L, C]`` (``C``: the codebook dimension) into the teacher's tokens ``q [L]``, deterministically
and with the teacher's law. Its trajectory states are

    X_t = (c_{q_1}, ..., c_{q_t}, eps_{t+1}, ..., eps_L),   t = 0 .. L

(the first ``t`` positions hold the codebook vectors of the teacher's tokens, the rest their noise). A student
learns ``X_t -> q`` for ``t`` in a small set of timesteps: ``{0}`` gives a one-step sampler (``X_0`` is pure
noise), ``{0, t2}`` a two-step one (predict everything from ``X_0``, keep the first ``t2`` tokens, put the same
noise back on the rest, predict again from ``X_{t2}``).

Architecture (the teacher's family, initialised from the teacher, :func:`student_from_teacher`):

* input of image position ``i``: ``in_proj(x_i) + indicator[x_i is data]`` (``in_proj``: a linear map
  ``C -> dim``, initialised as the least-squares fit of the teacher's token embeddings from the codebook
  vectors, so a data position starts close to the teacher's embedding of that token; ``indicator``: two
  learned vectors, noise / data, initialised at zero);
* the teacher's class embedding (one condition token), its :class:`LlamaTrunk` blocks and final norm, and its
  logits head, copied;
* causal attention over ``[class, x_1, ..., x_L]``: the output at image position ``i`` sees the label, the
  earlier positions and its own noise or data vector, which is exactly what the teacher map's token ``i``
  depends on. Unlike the teacher (whose position ``i`` predicts token ``i + 1``), position ``i`` predicts token
  ``i`` itself; the copied head starts from the teacher's next-token readout and is fine-tuned.

Training objective (a visar design choice: the paper's training code is not released): cross-entropy of the
logits against the teacher's tokens at the positions that still hold noise (``i >= t``; the kept prefix is
copied by the sampler, not predicted), optionally plus ``regression_weight`` times the mean squared error of a
linear regression head against the codebook vectors ``c_q`` at those positions (an auxiliary loss; the
sampler reads the logits only). No classifier-free guidance: it is baked into the teacher's data.

The student keeps the codebook ``[V, C]`` it was distilled with as a buffer: it builds ``X_t`` from tokens
and checks that a pipeline's tokenizer is the one it was made for. The states, checks and loss are shared with
the next-scale student (:mod:`visar.generators.components.distilled_student`).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from visar.generators.components.distilled_student import (DistilledStudent, check_student_options,
                                                           check_timesteps, student_from_teacher)
from visar.generators.components.llama_trunk import LlamaTrunk, init_llama_weights
from visar.nn.embeddings import LabelEmbedding
from visar.registry import register
from visar.utils.config import register_config
from visar.utils.validation import check_tokens

#: architecture arguments a student copies from its teacher's config
TEACHER_ARCH = ("vocab_size", "dim", "depth", "num_heads", "grid_size", "num_classes", "ffn_hidden", "rope_base",
                "norm_eps")
#: what ``from_teacher`` options may set
OPTIONS = ("regression_weight", "token_dropout", "resid_dropout", "ffn_dropout", "attn_dropout")


@register("family", "llamagen-distilled")
class DistilledNextToken(DistilledStudent):
    """One- or two-step student of a class-conditional LlamaGen teacher (see the module docstring).

    Args:
        vocab_size: codebook size ``V`` of the teacher's VQ tokenizer.
        codebook_dim: codebook dimension ``C`` (8 for LlamaGen's VQ; the vectors are l2-normalised).
        dim, depth, num_heads, grid_size, num_classes, ffn_hidden, rope_base, norm_eps: the teacher's
            architecture (:class:`~visar.generators.next_token.llamagen.NextTokenGenerator`).
        timesteps: training states ``X_t`` in tokens (``[0]``: one-step; ``[0, t2]``: two-step, and ``t2`` is
            the sampler's default intermediate state).
        regression_weight: ``> 0`` adds a linear regression head ``dim -> C`` and its MSE against ``c_q``
            (weighted) to the loss; 0 (default): logits only.
        token_dropout, resid_dropout, ffn_dropout, attn_dropout: training dropouts (default off).
        init_std: normal init of linear layers and embeddings (before a teacher's weights are copied in).

    The ``codebook`` buffer ``[V, C]`` is set by :meth:`from_teacher`; a student with an all-zero codebook
    was never given one and refuses to run.
    """

    family = "llamagen-distilled"
    token_kind = "discrete"
    teacher_family = "llamagen"
    state_unit = "tokens"

    @register_config
    def __init__(self, vocab_size: int = 16384, codebook_dim: int = 8, dim: int = 768, depth: int = 12,
                 num_heads: int = 12, grid_size: int = 16, num_classes: int = 1000,
                 timesteps: list | None = None, ffn_hidden: int | None = None, rope_base: float = 10000.0,
                 norm_eps: float = 1e-5, regression_weight: float = 0.0, token_dropout: float = 0.0,
                 resid_dropout: float = 0.0, ffn_dropout: float = 0.0, attn_dropout: float = 0.0,
                 init_std: float = 0.02):
        super().__init__()
        for name, v in dict(dim=dim, depth=depth, num_heads=num_heads, grid_size=grid_size).items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.grid_size = grid_size
        L = grid_size * grid_size
        self.init_student(vocab_size, codebook_dim, L, num_classes, L, timesteps, regression_weight, dim)
        self.cond_embed = LabelEmbedding(num_classes, dim)
        self.in_proj = nn.Linear(codebook_dim, dim)
        self.trunk = LlamaTrunk(dim, depth, num_heads, 1, grid_size, ffn_hidden=ffn_hidden, rope_base=rope_base,
                                norm_eps=norm_eps, token_dropout=token_dropout, attn_dropout=attn_dropout,
                                resid_dropout=resid_dropout, ffn_dropout=ffn_dropout)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        init_llama_weights(self, init_std)
        nn.init.zeros_(self.indicator.weight)

    # -- construction from a teacher -----------------------------------------------------------------
    @classmethod
    def from_teacher(cls, teacher: nn.Module, codebook: torch.Tensor, timesteps: Sequence[int] | None = None,
                     **options: Any) -> "DistilledNextToken":
        """A student of ``teacher`` (a class-conditional LlamaGen ``NextTokenGenerator``) initialised from it.

        Args:
            teacher: the teacher generator (its config names the architecture; its class embedding, trunk
                and logits head are copied).
            codebook: ``[V, C]`` codebook vectors of the teacher's tokenizer as the teacher map uses them
                (LlamaGen: l2-normalised, ``tokenizer.codebook()``).
            timesteps: training states in tokens (``[0]`` one-step, ``[0, t2]`` two-step).
            **options: ``regression_weight`` and the dropouts (not the architecture).
        """
        cfg = getattr(teacher, "config", None)
        if not isinstance(cfg, dict) or not all(k in cfg for k in TEACHER_ARCH) or not hasattr(teacher, "tok_embed"):
            raise TypeError(f"the teacher must be a LlamaGen NextTokenGenerator (class embedding, token embedding, "
                            f"Llama trunk, logits head); got {type(teacher).__name__}")
        if cfg.get("caption_dim") is not None or cfg.get("cls_token_num", 1) != 1:
            raise ValueError("distilled students are class-conditional: this teacher is text-conditional")
        check_student_options(options, TEACHER_ARCH, OPTIONS)
        if not isinstance(codebook, torch.Tensor) or codebook.dim() != 2 or codebook.shape[0] != cfg["vocab_size"]:
            raise ValueError(f"codebook must be [V={cfg['vocab_size']}, C] (the teacher's tokenizer's codebook), got "
                             f"{getattr(codebook, 'shape', type(codebook).__name__)}")
        student = cls(codebook_dim=int(codebook.shape[1]), timesteps=None if timesteps is None else list(timesteps),
                      **{k: cfg[k] for k in TEACHER_ARCH}, **options)
        device = teacher.tok_embed.weight.device
        student.to(device)
        with torch.no_grad():
            student.codebook.copy_(codebook.detach().float())
            student.cond_embed.load_state_dict(teacher.cond_embed.state_dict())
            student.trunk.load_state_dict(teacher.trunk.state_dict())
            student.head.load_state_dict(teacher.head.state_dict())
            # in_proj(c_k) ~ tok_embed[k]: least squares over the V codebook vectors (with a bias column)
            cb = codebook.detach().double().to(device)
            a = torch.cat([cb, torch.ones_like(cb[:, :1])], 1)  # [V, C + 1]
            sol = torch.linalg.lstsq(a.cpu(), teacher.tok_embed.weight.detach().double().cpu()).solution  # [C+1, D]
            student.in_proj.weight.copy_(sol[:-1].T.to(student.in_proj.weight))
            student.in_proj.bias.copy_(sol[-1].to(student.in_proj.bias))
        return student

    # -- the family's layout and checks ----------------------------------------------------------------
    @staticmethod
    def tokenizer_codebook(tokenizer: Any) -> torch.Tensor:
        """``tokenizer.codebook()`` (LlamaGen's VQ: l2-normalised), as the teacher map uses it."""
        if not callable(getattr(tokenizer, "codebook", None)):
            raise TypeError(f"the tokenizer {type(tokenizer).__name__} has no codebook(): a next-token student "
                            "needs a VQ tokenizer")
        return tokenizer.codebook()

    def teacher_mismatch(self, model: Any) -> str | None:
        """The generator must be a next-token model with the same vocabulary, tokens per image and classes."""
        if hasattr(model, "scales") or not hasattr(model, "num_tokens"):
            return (f"a next-token student stands in for a next-token teacher, not for {type(model).__name__}; use "
                    "a student distilled from this pipeline's teacher")
        classes = getattr(model, "num_classes", self.num_classes)
        for what, mine, theirs in (("token vocabulary", self.vocab_size, model.vocab_size),
                                   ("tokens per image", self.num_tokens, model.num_tokens),
                                   ("classes", self.num_classes, classes)):
            if mine != theirs:
                return (f"the student was distilled for another tokenizer or teacher: its {what} is {mine}, the "
                        f"pipeline's generator has {theirs}; use a student distilled from this pipeline's teacher")
        return None

    def flat_tokens(self, tokens: Any, batch: int) -> torch.Tensor:
        """``LongTensor [B, L]`` or ``[B, h, w]`` -> ``[B, L]`` (validated)."""
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a LongTensor [B, L] or [B, h, w], got {type(tokens).__name__}")
        if tokens.dim() == 3:
            tokens = tokens.flatten(1)
        if tokens.dim() != 2 or tuple(tokens.shape) != (batch, self.num_tokens):
            raise ValueError(f"tokens must be [B={batch}, L={self.num_tokens}] (or [B, h, w]), got "
                             f"{tuple(tokens.shape)}")
        check_tokens(tokens, self.vocab_size)
        return tokens.long()

    def tokens_out(self, flat: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` -> ``[B, grid, grid]``."""
        return flat.view(flat.shape[0], self.grid_size, self.grid_size)

    def prefix_len(self, t: torch.Tensor) -> torch.Tensor:
        """State ``t`` fixes the first ``t`` tokens."""
        return t

    # -- the network ---------------------------------------------------------------------------------
    def network(self, x: torch.Tensor, labels: torch.Tensor, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal pass over ``[class, x_1..x_L]``: image position ``i`` sees the label, ``x_<i`` and ``x_i``."""
        w = self.in_proj.weight
        h = self.in_proj(x.to(w.dtype)) + self.indicator(data.long())  # [B, L, D]
        cls_tok = self.cond_embed(labels)[:, None]  # [B, 1, D]
        h = self.trunk(cls_tok, h)[:, 1:]  # [B, L, D]
        return self.head(h).float(), h

    def no_weight_decay(self) -> set[str]:
        """No exemptions beyond 1-D tensors and biases (the teacher's, LlamaGen's, rule)."""
        return set()


__all__ = ["DistilledNextToken", "student_from_teacher", "check_timesteps"]
