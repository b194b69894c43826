"""What every Distilled Decoding student shares: input states, checks, the loss, and building one from a teacher.

Distilled Decoding (Liu et al. 2024, "Distilled Decoding 1: One-step Sampling of Image Auto-regressive Models
with Flow Matching", arXiv 2412.17153). The teacher map (:mod:`visar.samplers.flow_map`) turns a noise sequence
``eps [L, C]`` (one vector of the codebook dimension ``C`` per token, ``L`` the tokens of an image) into the
teacher's tokens ``q [L]``, deterministically and with the teacher's law. Its trajectory states are

    X_t = (c_{q_1}, ..., c_{q_n(t)}, eps_{n(t)+1}, ..., eps_L)

(the first ``n(t)`` positions hold the codebook vectors of the teacher's tokens, the rest their noise). ``t``
counts AR steps: a next-token student's state ``t`` fixes ``n(t) = t`` tokens, a next-scale student's fixes the
``t`` coarsest scales (``n(t) = pn_0^2 + ... + pn_{t-1}^2``). A student learns ``X_t -> q`` for ``t`` in a small
set of ``timesteps``: ``{0}`` gives a one-step sampler, ``{0, t2}`` a two-step one.

:class:`DistilledStudent` holds everything that does not depend on the teacher's family: the codebook buffer
``[V, C]`` (it builds ``X_t`` from tokens and checks that a tokenizer is the one it was distilled for), the
states, the checks, the training objective (cross-entropy against the teacher's tokens at the positions still
holding noise, plus an optional regression term) and :func:`student_from_teacher`, which builds the student of
a teacher pipeline folder whatever its family. A family's student (``visar.generators.<kind>.distilled``)
supplies the network (:meth:`DistilledStudent.network`), its token layout and its teacher checks.
"""
from __future__ import annotations

import abc
import os
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from visar.conditions import Condition
from visar.generators.base import Generator
from visar.generators.components.draws import check_draw
from visar.utils.validation import check_labels

def check_timesteps(timesteps: Sequence[int] | None, num_states: int, unit: str = "tokens") -> list[int]:
    """Sorted distinct training states in ``[0, num_states)``, containing 0 (``None``: ``[0]``).

    ``unit`` names what a state fixes (``"tokens"`` for next-token students, ``"scales"`` for next-scale ones).
    """
    if timesteps is None:
        return [0]
    if isinstance(timesteps, (str, bytes)) or not isinstance(timesteps, Sequence) or not timesteps:
        raise ValueError(f"timesteps must be a non-empty list of ints ([0] one-step, [0, t2] two-step), got "
                         f"{timesteps!r}")
    out = []
    for t in timesteps:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < num_states:
            raise ValueError(f"timesteps must be ints in [0, {num_states}) ({unit} already fixed in the input "
                             f"state), got {list(timesteps)!r}")
        out.append(t)
    out = sorted(set(out))
    if out[0] != 0:
        raise ValueError(f"timesteps must contain 0 (the all-noise state every sampler starts from), got {out}")
    return out


def check_student_options(options: dict, arch: Sequence[str], allowed: Sequence[str]) -> None:
    """``from_teacher`` options may set ``allowed`` (the regression weight, dropouts) only; the architecture
    (``arch``, the codebook dimension and the timesteps) is the teacher's or an argument of its own."""
    bad = sorted((set(arch) | {"codebook_dim", "token_dim", "timesteps"}) & set(options))
    if bad:
        raise ValueError(f"the student's architecture is the teacher's; options may set regression_weight and "
                         f"dropouts only, got {bad}")
    other = sorted(set(options) - set(allowed))
    if other:
        raise ValueError(f"unknown student options {other}; this student takes {', '.join(allowed)}")


class DistilledStudent(Generator, abc.ABC):
    """Base of the one- or two-step students (see the module docstring).

    A subclass's ``__init__`` calls :meth:`init_student` and builds its network; it implements
    :meth:`network`, :meth:`flat_tokens`, :meth:`tokens_out`, :meth:`prefix_len`, :meth:`teacher_mismatch`,
    :meth:`tokenizer_codebook` and :meth:`from_teacher`, and sets :attr:`teacher_family`.

    Attributes (set by :meth:`init_student`): ``vocab_size`` ``V``, ``codebook_dim`` ``C``, ``num_tokens``
    ``L``, ``num_classes``, ``num_states`` (states ``t`` are ``0 .. num_states``; ``num_states`` fixes every
    token), ``timesteps``, ``regression_weight``, the ``indicator`` embedding (row 0: the position holds noise,
    row 1: a codebook vector; zero at the start), the optional ``reg_head`` and the ``codebook`` buffer
    ``[V, C]`` (all zeros until :meth:`from_teacher` sets it: such a student refuses to run).
    """

    token_kind = "discrete"
    default_sampler = "distilled"
    #: the ``family`` of the teachers this student class distils (:func:`student_from_teacher` dispatches on it)
    teacher_family: ClassVar[str] = ""
    #: what a state ``t`` counts: ``"tokens"`` or ``"scales"``
    state_unit: ClassVar[str] = "tokens"

    def init_student(self, vocab_size: int, codebook_dim: int, num_tokens: int, num_classes: int, num_states: int,
                     timesteps: Sequence[int] | None, regression_weight: float, width: int) -> None:
        for name, v in dict(vocab_size=vocab_size, codebook_dim=codebook_dim, num_classes=num_classes).items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not regression_weight >= 0:
            raise ValueError(f"regression_weight must be >= 0 (0: no regression head), got {regression_weight!r}")
        self.vocab_size, self.codebook_dim, self.num_tokens = vocab_size, codebook_dim, num_tokens
        self.num_classes, self.num_states = num_classes, num_states
        self.timesteps = check_timesteps(timesteps, num_states, self.state_unit)
        self.regression_weight = float(regression_weight)
        self.indicator = nn.Embedding(2, width)  # row 0: the position holds noise, row 1: a codebook vector
        self.reg_head = nn.Linear(width, codebook_dim) if regression_weight > 0 else None
        self.register_buffer("codebook", torch.zeros(vocab_size, codebook_dim))

    # -- what a family supplies ------------------------------------------------------------------------
    @abc.abstractmethod
    def network(self, x: torch.Tensor, labels: torch.Tensor, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, L, C]``, class ids ``[B]``, ``data [B, L]`` bool -> ``(logits [B, L, V] float32, features
        [B, L, D])``; ``logits[:, i]`` predicts the teacher's token ``i``, ``features`` feed the regression head."""

    @abc.abstractmethod
    def flat_tokens(self, tokens: Any, batch: int) -> torch.Tensor:
        """Validated token ids in the family's layout -> ``LongTensor [B, L]``."""

    @abc.abstractmethod
    def tokens_out(self, flat: torch.Tensor) -> Any:
        """``[B, L]`` ids -> what the family's tokenizer decodes."""

    @abc.abstractmethod
    def prefix_len(self, t: torch.Tensor) -> torch.Tensor:
        """``LongTensor [B]`` of states -> the number of leading positions they fix."""

    @abc.abstractmethod
    def teacher_mismatch(self, model: Any) -> str | None:
        """Why this student cannot stand in for the generator ``model`` (``None``: it can)."""

    @staticmethod
    @abc.abstractmethod
    def tokenizer_codebook(tokenizer: Any) -> torch.Tensor:
        """The ``[V, C]`` codebook the teacher map uses, read from the teacher's tokenizer."""

    @classmethod
    @abc.abstractmethod
    def from_teacher(cls, teacher: nn.Module, codebook: torch.Tensor, timesteps: Sequence[int] | None = None,
                     **options: Any) -> "DistilledStudent":
        """A student of ``teacher`` initialised from its weights, over the ``[V, C]`` ``codebook``."""

    def noise_layout(self) -> str:
        """Words for the ``L`` of the noise shape in error messages."""
        return f"L = {self.num_tokens} tokens"

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
            raise ValueError(f"this student has no codebook (all zeros): build it from a teacher with "
                             f"student_from_teacher(PIPELINE_DIR) or {type(self).__name__}.from_teacher")

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
                             "pair it with its teacher's tokenizer")
        self.check_codebook(self.tokenizer_codebook(tokenizer), f"the tokenizer {type(tokenizer).__name__}")

    def check_noise(self, noise: Any, batch: int | None = None, name: str = "noise") -> torch.Tensor:
        """A finite float tensor ``[B, L, C]`` (one codebook-dimension vector per token)."""
        L, C = self.num_tokens, self.codebook_dim
        want = f"[{'B' if batch is None else batch}, {L}, {C}]"
        if not isinstance(noise, torch.Tensor) or noise.dim() != 3 or tuple(noise.shape[1:]) != (L, C) or (
                batch is not None and noise.shape[0] != batch) or not noise.is_floating_point():
            got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"{name} must be a float tensor {want} ({self.noise_layout()}, C = {C} the codebook "
                             f"dimension), got {got}")
        if not bool(torch.isfinite(noise).all()):
            raise ValueError(f"{name} holds NaN or inf values")
        return noise

    def _t(self, t: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)):
            raise TypeError(f"t must be an int or a LongTensor [B] of states (the {self.state_unit} fixed), got "
                            f"{type(t).__name__}")
        if isinstance(t, int):
            t = torch.full((batch,), t, dtype=torch.long, device=device)
        return check_draw("t", t, (batch,), "index", device, low=0, high=self.num_states + 1)

    # -- states and the network ------------------------------------------------------------------------
    def input_state(self, noise: torch.Tensor, tokens: Any = None,
                    t: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The state ``X_t``: ``(x [B, L, C], data [B, L] bool)``.

        The first ``prefix_len(t)`` positions hold ``codebook[tokens]`` (data), the rest the noise. ``t``: an int
        or ``LongTensor [B]`` in ``[0, num_states]``; ``tokens`` (the family's layout) is needed when any
        ``t > 0``.
        """
        noise = self.check_noise(noise)
        B = noise.shape[0]
        t = self._t(t, B, noise.device)
        pos = torch.arange(self.num_tokens, device=noise.device)
        data = pos[None] < self.prefix_len(t)[:, None]  # [B, L]
        if not bool(data.any()):
            return noise, data
        if tokens is None:
            raise ValueError("tokens are needed to build a state with a fixed prefix (t > 0)")
        tokens = self.flat_tokens(tokens, B).to(noise.device)
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
        device = self.codebook.device
        logits, feats = self.network(x.to(device), cond.labels.to(device), data.to(device))
        if not return_regression:
            return logits
        if self.reg_head is None:
            raise ValueError("this student has no regression head (regression_weight=0)")
        return logits, self.reg_head(feats).float()

    # -- training ------------------------------------------------------------------------------------
    def draw_timesteps(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One training state per row, uniform over :attr:`timesteps`: ``LongTensor [B]`` (on the generator's
        device; CPU without one)."""
        device = generator.device if generator is not None else torch.device("cpu")
        idx = torch.randint(len(self.timesteps), (batch,), generator=generator, device=device)
        return torch.tensor(self.timesteps, dtype=torch.long, device=device)[idx]

    def training_loss(self, noise: torch.Tensor, tokens: Any, cond: Condition,
                      t: torch.Tensor | int | None = None,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Distillation loss on teacher pairs.

        Args:
            noise: ``[B, L, C]`` the teacher map's input noise.
            tokens: the teacher's tokens for that noise (``[B, L]`` or the family's layout).
            cond: the pairs' class ids ``[B]``.
            t: the state of each row (int or ``LongTensor [B]`` in ``[0, num_states)``); ``None``: drawn uniformly
                from :attr:`timesteps` with ``generator``.
        Returns:
            ``{"loss", "ce", "acc"}`` (and ``"mse"`` with a regression head): cross-entropy and token accuracy
            over the positions that still hold noise in ``X_t`` (every one weighted equally).
        """
        noise = self.check_noise(noise)
        B = noise.shape[0]
        tokens = self.flat_tokens(tokens, B).to(noise.device)
        if t is None:
            t = self.draw_timesteps(B, generator)
        t = self._t(t, B, noise.device)
        if bool((t >= self.num_states).any()):
            raise ValueError(f"t must be < {self.num_states}: a state with every {self.state_unit[:-1]} fixed has "
                             "nothing to predict")
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

    def loss(self, tokens: Any, cond: Condition, noise: torch.Tensor | None = None,
             t: torch.Tensor | int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scalar :meth:`training_loss` (the teacher pair is ``(noise, tokens)``; ``noise`` is required)."""
        if noise is None:
            raise ValueError("a distilled student trains on (noise, teacher tokens) pairs: give noise=[B, L, C] "
                             "(made by `visar distill-data`)")
        return self.training_loss(noise, tokens, cond, t, generator)["loss"]


def student_class_for(teacher: Any) -> type[DistilledStudent]:
    """The registered student class whose :attr:`~DistilledStudent.teacher_family` is ``teacher.family``."""
    from visar.registry import items

    family = getattr(teacher, "family", None)
    classes = [c for c in items("family").values() if isinstance(c, type) and issubclass(c, DistilledStudent)]
    for c in classes:
        if c.teacher_family and c.teacher_family == family:
            return c
    known = ", ".join(sorted(c.teacher_family for c in classes if c.teacher_family))
    raise TypeError(f"no distilled student for {type(teacher).__name__} (family {family!r}); students exist for "
                    f"the families {known}")


def student_from_teacher(teacher: str | os.PathLike, timesteps: list | None = None, *,
                         generator_name: str = "generator", tokenizer_name: str = "tokenizer",
                         **options: Any) -> DistilledStudent:
    """A student initialised from the teacher pipeline folder ``teacher`` (e.g. ``visar/assets/shapes-llamagen``
    or a VAR pipeline export): what a ``task: distill`` config names as ``model.cls``.

    The student's class follows the teacher's family (LlamaGen: :class:`~visar.generators.next_token.distilled.
    DistilledNextToken`, ``timesteps`` in tokens; VAR: :class:`~visar.generators.next_scale.distilled.
    DistilledNextScale`, ``timesteps`` in scales). ``options``: ``regression_weight`` and dropouts. The codebook
    is the one the teacher map uses (LlamaGen: the tokenizer's l2-normalised ``codebook()``; VAR: the
    quantizer's ``embedding.weight``).
    """
    from visar.tokenizers.base import Tokenizer

    gen = Generator.from_pretrained(teacher, generator_name)
    tok = Tokenizer.from_pretrained(teacher, tokenizer_name)
    gen.check_tokenizer(tok)
    cls = student_class_for(gen)
    return cls.from_teacher(gen, cls.tokenizer_codebook(tok), timesteps, **options)


__all__ = ["DistilledStudent", "check_timesteps", "check_student_options", "student_class_for",
           "student_from_teacher"]
