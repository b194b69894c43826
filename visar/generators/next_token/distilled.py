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
and checks that a pipeline's tokenizer is the one it was made for.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from visar.conditions import Condition
from visar.generators.base import Generator
from visar.generators.components.draws import check_draw
from visar.generators.components.llama_trunk import LlamaTrunk, init_llama_weights
from visar.nn.embeddings import LabelEmbedding
from visar.registry import register
from visar.utils.config import register_config
from visar.utils.validation import check_labels, check_tokens

#: architecture arguments a student copies from its teacher's config
TEACHER_ARCH = ("vocab_size", "dim", "depth", "num_heads", "grid_size", "num_classes", "ffn_hidden", "rope_base",
                "norm_eps")


def check_timesteps(timesteps: Sequence[int] | None, num_tokens: int) -> list[int]:
    """Sorted distinct training timesteps in ``[0, num_tokens)``, containing 0 (``None``: ``[0]``)."""
    if timesteps is None:
        return [0]
    if isinstance(timesteps, (str, bytes)) or not isinstance(timesteps, Sequence) or not timesteps:
        raise ValueError(f"timesteps must be a non-empty list of ints ([0] one-step, [0, t2] two-step), got "
                         f"{timesteps!r}")
    out = []
    for t in timesteps:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < num_tokens:
            raise ValueError(f"timesteps must be ints in [0, {num_tokens}) (tokens already fixed in the input "
                             f"state), got {list(timesteps)!r}")
        out.append(t)
    out = sorted(set(out))
    if out[0] != 0:
        raise ValueError(f"timesteps must contain 0 (the all-noise state every sampler starts from), got {out}")
    return out


@register("family", "llamagen-distilled")
class DistilledNextToken(Generator):
    """One- or two-step student of a class-conditional LlamaGen teacher (see the module docstring).

    Args:
        vocab_size: codebook size ``V`` of the teacher's VQ tokenizer.
        codebook_dim: codebook dimension ``C`` (8 for LlamaGen's VQ; the vectors are l2-normalised).
        dim, depth, num_heads, grid_size, num_classes, ffn_hidden, rope_base, norm_eps: the teacher's
            architecture (:class:`~visar.generators.next_token.llamagen.NextTokenGenerator`).
        timesteps: training states ``X_t`` (``[0]``: one-step; ``[0, t2]``: two-step, and ``t2`` is the
            sampler's default intermediate state).
        regression_weight: ``> 0`` adds a linear regression head ``dim -> C`` and its MSE against ``c_q``
            (weighted) to the loss; 0 (default): logits only.
        token_dropout, resid_dropout, ffn_dropout, attn_dropout: training dropouts (default off).
        init_std: normal init of linear layers and embeddings (before a teacher's weights are copied in).

    The ``codebook`` buffer ``[V, C]`` is set by :meth:`from_teacher`; a student with an all-zero codebook
    was never given one and refuses to run.
    """

    family = "llamagen-distilled"
    token_kind = "discrete"
    default_sampler = "distilled"

    @register_config
    def __init__(self, vocab_size: int = 16384, codebook_dim: int = 8, dim: int = 768, depth: int = 12,
                 num_heads: int = 12, grid_size: int = 16, num_classes: int = 1000,
                 timesteps: list | None = None, ffn_hidden: int | None = None, rope_base: float = 10000.0,
                 norm_eps: float = 1e-5, regression_weight: float = 0.0, token_dropout: float = 0.0,
                 resid_dropout: float = 0.0, ffn_dropout: float = 0.0, attn_dropout: float = 0.0,
                 init_std: float = 0.02):
        super().__init__()
        for name, v in dict(vocab_size=vocab_size, codebook_dim=codebook_dim, dim=dim, depth=depth,
                            num_heads=num_heads, grid_size=grid_size, num_classes=num_classes).items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not regression_weight >= 0:
            raise ValueError(f"regression_weight must be >= 0 (0: no regression head), got {regression_weight!r}")
        self.vocab_size, self.codebook_dim, self.grid_size = vocab_size, codebook_dim, grid_size
        self.num_tokens = grid_size * grid_size
        self.num_classes = num_classes
        self.timesteps = check_timesteps(timesteps, self.num_tokens)
        self.regression_weight = float(regression_weight)
        self.cond_embed = LabelEmbedding(num_classes, dim)
        self.in_proj = nn.Linear(codebook_dim, dim)
        self.indicator = nn.Embedding(2, dim)  # row 0: the position holds noise, row 1: a codebook vector
        self.trunk = LlamaTrunk(dim, depth, num_heads, 1, grid_size, ffn_hidden=ffn_hidden, rope_base=rope_base,
                                norm_eps=norm_eps, token_dropout=token_dropout, attn_dropout=attn_dropout,
                                resid_dropout=resid_dropout, ffn_dropout=ffn_dropout)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.reg_head = nn.Linear(dim, codebook_dim) if regression_weight > 0 else None
        self.register_buffer("codebook", torch.zeros(vocab_size, codebook_dim))
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
            timesteps: training states (``[0]`` one-step, ``[0, t2]`` two-step).
            **options: ``regression_weight`` and the dropouts (not the architecture).
        """
        cfg = getattr(teacher, "config", None)
        if not isinstance(cfg, dict) or not all(k in cfg for k in TEACHER_ARCH) or not hasattr(teacher, "tok_embed"):
            raise TypeError(f"the teacher must be a LlamaGen NextTokenGenerator (class embedding, token embedding, "
                            f"Llama trunk, logits head); got {type(teacher).__name__}")
        if cfg.get("caption_dim") is not None or cfg.get("cls_token_num", 1) != 1:
            raise ValueError("distilled students are class-conditional: this teacher is text-conditional")
        arch_keys = set(TEACHER_ARCH) | {"codebook_dim", "timesteps"}
        if arch_keys & set(options):
            raise ValueError(f"the student's architecture is the teacher's; options may set regression_weight and "
                             f"dropouts only, got {sorted(arch_keys & set(options))}")
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

    # -- checks --------------------------------------------------------------------------------------
    def check_condition(self, cond: Condition, allow_null: bool = False) -> None:
        """Class ids ``[B]`` in ``[0, num_classes)``."""
        if not isinstance(cond, Condition):
            raise TypeError(f"expected a visar Condition, got {type(cond).__name__}; use Condition.of(class_ids)")
        if cond.labels is None:
            raise ValueError("a distilled student is class-conditional: give class ids, e.g. Condition.of([1, 2])")
        if cond.labels.dim() != 1:
            raise ValueError(f"class ids must be a 1-D tensor [B], got shape {tuple(cond.labels.shape)}")
        check_labels(cond.labels, self.num_classes, allow_null=False)

    def check_ready(self) -> None:
        if not bool(self.codebook.abs().sum() > 0):
            raise ValueError("this student has no codebook (all zeros): build it from a teacher with "
                             "student_from_teacher(PIPELINE_DIR) or DistilledNextToken.from_teacher")

    def check_codebook(self, codebook: torch.Tensor, what: str = "the tokenizer") -> None:
        """Raise unless ``codebook [V, C]`` is the one this student was distilled with (up to float rounding)."""
        mine = self.codebook
        if tuple(codebook.shape) != tuple(mine.shape):
            raise ValueError(f"this student was distilled for a tokenizer with {mine.shape[0]} codes of dimension "
                             f"{mine.shape[1]}, but {what} has {codebook.shape[0]} codes of dimension "
                             f"{codebook.shape[1]}: use a student distilled from this pipeline's teacher")
        if not torch.allclose(codebook.detach().float().to(mine.device), mine, atol=1e-5, rtol=1e-4):
            raise ValueError(f"this student was distilled for another tokenizer: {what}'s codebook differs from the "
                             "student's (same size); use a student distilled from this pipeline's teacher")

    def check_tokenizer(self, tokenizer) -> None:
        """Kind, vocabulary and codebook vectors must be the ones the student was distilled with."""
        super().check_tokenizer(tokenizer)
        vocab = getattr(tokenizer, "vocab_size", None)
        if vocab != self.vocab_size:
            raise ValueError(f"the tokenizer has {vocab} codes but this student was distilled for {self.vocab_size}; "
                             "pair it with its teacher's VQ tokenizer")
        if callable(getattr(tokenizer, "codebook", None)):
            self.check_codebook(tokenizer.codebook(), f"the tokenizer {type(tokenizer).__name__}")

    def check_noise(self, noise: Any, batch: int | None = None, name: str = "noise") -> torch.Tensor:
        """A float tensor ``[B, L, C]`` (one codebook-dimension vector per token)."""
        L, C = self.num_tokens, self.codebook_dim
        want = f"[{'B' if batch is None else batch}, {L}, {C}]"
        if not isinstance(noise, torch.Tensor) or noise.dim() != 3 or tuple(noise.shape[1:]) != (L, C) or (
                batch is not None and noise.shape[0] != batch) or not noise.is_floating_point():
            got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"{name} must be a float tensor {want} (L = {L} tokens, C = {C} the codebook "
                             f"dimension), got {got}")
        if not bool(torch.isfinite(noise).all()):
            raise ValueError(f"{name} holds NaN or inf values")
        return noise

    def _tokens(self, tokens: Any, batch: int) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a LongTensor [B, L] or [B, h, w], got {type(tokens).__name__}")
        if tokens.dim() == 3:
            tokens = tokens.flatten(1)
        if tokens.dim() != 2 or tuple(tokens.shape) != (batch, self.num_tokens):
            raise ValueError(f"tokens must be [B={batch}, L={self.num_tokens}] (or [B, h, w]), got "
                             f"{tuple(tokens.shape)}")
        check_tokens(tokens, self.vocab_size)
        return tokens.long()

    def _t(self, t: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)):
            raise TypeError(f"t must be an int or a LongTensor [B] of fixed-prefix lengths, got {type(t).__name__}")
        if isinstance(t, int):
            t = torch.full((batch,), t, dtype=torch.long, device=device)
        t = check_draw("t", t, (batch,), "index", device, low=0, high=self.num_tokens + 1)
        return t

    # -- the network ---------------------------------------------------------------------------------
    def input_state(self, noise: torch.Tensor, tokens: torch.Tensor | None = None,
                    t: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The state ``X_t``: ``(x [B, L, C], data [B, L] bool)``.

        Positions ``i < t`` hold ``codebook[tokens[:, i]]`` (data), the rest ``noise[:, i]``. ``t``: an int or
        ``LongTensor [B]`` in ``[0, L]``; ``tokens [B, L]`` (or ``[B, h, w]``) is needed when any ``t > 0``.
        """
        noise = self.check_noise(noise)
        B = noise.shape[0]
        t = self._t(t, B, noise.device)
        pos = torch.arange(self.num_tokens, device=noise.device)
        data = pos[None] < t[:, None]  # [B, L]
        if not bool(data.any()):
            return noise, data
        if tokens is None:
            raise ValueError("tokens are needed to build a state with a fixed prefix (t > 0)")
        tokens = self._tokens(tokens, B).to(noise.device)
        codes = self.codebook.to(noise.device, noise.dtype)[tokens]  # [B, L, C]
        return torch.where(data[..., None], codes, noise), data

    def forward(self, x: torch.Tensor, cond: Condition, data: torch.Tensor, return_regression: bool = False):
        """Logits of every token given a state.

        Args:
            x: ``[B, L, C]`` state (codebook vectors and noise), e.g. from :meth:`input_state`.
            cond: class ids ``[B]``.
            data: ``[B, L]`` bool, True where ``x`` holds a codebook vector.
            return_regression: also return the regression head's ``[B, L, C]`` (needs ``regression_weight > 0``).
        Returns:
            ``logits [B, L, V]`` (float32), ``logits[:, i]`` predicting the teacher's token ``i``.
        """
        self.check_ready()
        x = self.check_noise(x, name="x")
        B = x.shape[0]
        self.check_condition(cond)
        if cond.batch_size != B:
            raise ValueError(f"{cond.batch_size} conditions for {B} states")
        if not isinstance(data, torch.Tensor) or tuple(data.shape) != (B, self.num_tokens):
            raise ValueError(f"data must be a bool tensor [B={B}, L={self.num_tokens}]")
        w = self.in_proj.weight
        h = self.in_proj(x.to(w.device, w.dtype)) + self.indicator(data.to(w.device).long())  # [B, L, D]
        cls_tok = self.cond_embed(cond.labels.to(w.device))[:, None]  # [B, 1, D]
        h = self.trunk(cls_tok, h)[:, 1:]  # [B, L, D]: image position i sees the label, x_<i and x_i
        logits = self.head(h).float()
        if not return_regression:
            return logits
        if self.reg_head is None:
            raise ValueError("this student has no regression head (regression_weight=0)")
        return logits, self.reg_head(h).float()

    # -- training ------------------------------------------------------------------------------------
    def draw_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One training timestep per row, uniform over :attr:`timesteps`: ``LongTensor [B]`` (on the generator's
        device; CPU without one)."""
        device = generator.device if generator is not None else torch.device("cpu")
        idx = torch.randint(len(self.timesteps), (batch,), generator=generator, device=device)
        return torch.tensor(self.timesteps, dtype=torch.long, device=device)[idx]

    def training_loss(self, noise: torch.Tensor, tokens: torch.Tensor, cond: Condition,
                      t: torch.Tensor | int | None = None,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Distillation loss on teacher pairs.

        Args:
            noise: ``[B, L, C]`` the teacher map's input noise.
            tokens: ``[B, L]`` (or ``[B, h, w]``) the teacher's tokens for that noise.
            cond: the pairs' class ids ``[B]``.
            t: the state of each row (int or ``LongTensor [B]`` in ``[0, L)``); ``None``: drawn uniformly from
                :attr:`timesteps` with ``generator``.
        Returns:
            ``{"loss", "ce", "acc"}`` (and ``"mse"`` with a regression head): cross-entropy and token accuracy
            over the positions ``i >= t`` (those still holding noise).
        """
        noise = self.check_noise(noise)
        B = noise.shape[0]
        tokens = self._tokens(tokens, B).to(noise.device)
        if t is None:
            t = self.draw_timesteps(B, generator)
        t = self._t(t, B, noise.device)
        if bool((t >= self.num_tokens).any()):
            raise ValueError(f"t must be < {self.num_tokens}: a state with every token fixed has nothing to predict")
        x, data = self.input_state(noise, tokens, t)
        out = self.forward(x, cond, data, return_regression=self.reg_head is not None)
        logits, reg = out if isinstance(out, tuple) else (out, None)
        keep = ~data.to(logits.device)  # [B, L]
        target = tokens.to(logits.device)
        ce = F.cross_entropy(logits[keep], target[keep])
        acc = (logits[keep].argmax(-1) == target[keep]).float().mean().detach()
        result = {"loss": ce, "ce": ce.detach(), "acc": acc}
        if reg is not None:
            mse = (reg[keep] - self.codebook.to(reg)[target[keep]]).pow(2).sum(-1).mean()
            result["loss"] = ce + self.regression_weight * mse
            result["mse"] = mse.detach()
        return result

    def loss(self, tokens: torch.Tensor, cond: Condition, noise: torch.Tensor | None = None,
             t: torch.Tensor | int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scalar :meth:`training_loss` (the teacher pair is ``(noise, tokens)``; ``noise`` is required)."""
        if noise is None:
            raise ValueError("a distilled student trains on (noise, teacher tokens) pairs: give noise=[B, L, C] "
                             "(made by `visar distill-data`)")
        return self.training_loss(noise, tokens, cond, t, generator)["loss"]

    def no_weight_decay(self) -> set[str]:
        """No exemptions beyond 1-D tensors and biases (the teacher's, LlamaGen's, rule)."""
        return set()


def student_from_teacher(teacher: str | os.PathLike, timesteps: list | None = None, *,
                         generator_name: str = "generator", tokenizer_name: str = "tokenizer",
                         **options: Any) -> DistilledNextToken:
    """A student initialised from the teacher pipeline folder ``teacher`` (``generator.*`` + ``tokenizer.*``,
    e.g. ``visar/assets/shapes-llamagen``): what a ``task: distill`` config names as ``model.cls``
    (``visar.generators.next_token.distilled:student_from_teacher``). ``options``: ``regression_weight``,
    dropouts. The codebook is the tokenizer's ``codebook()`` (LlamaGen: l2-normalised), as the teacher map's.
    """
    from visar.tokenizers.base import Tokenizer

    gen = Generator.from_pretrained(teacher, generator_name)
    tok = Tokenizer.from_pretrained(teacher, tokenizer_name)
    gen.check_tokenizer(tok)
    if not callable(getattr(tok, "codebook", None)):
        raise TypeError(f"the teacher's tokenizer {type(tok).__name__} has no codebook(): a next-token student "
                        "needs a VQ tokenizer")
    return DistilledNextToken.from_teacher(gen, tok.codebook(), timesteps, **options)


__all__ = ["DistilledNextToken", "student_from_teacher", "check_timesteps"]
