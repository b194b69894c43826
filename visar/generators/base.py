"""The Generator interface (the :class:`~visar.conditions.Condition` it is given is re-exported here).

A generator models tokens (of its tokenizer's ``kind``) given a :class:`Condition`:

* ``loss(tokens, cond) -> scalar`` trains it (teacher forcing);
* ``sample(cond, generator=None, **options) -> tokens`` draws with its default sampler
  (``default_sampler``, a registered :class:`~visar.samplers.base.Sampler`);
* AR families implement a step protocol of :mod:`visar.generators.protocol` that samplers drive.

``token_kind`` must equal the tokenizer's ``kind``; :meth:`check_tokenizer` enforces the pairing.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any

import torch

from visar.conditions import Condition
from visar.utils.config import Configurable
from visar.utils.validation import check_labels


class Generator(Configurable, metaclass=ABCMeta):
    """Base class of every generator family."""

    #: ``"discrete"``, ``"multiscale"`` or ``"continuous"``: the tokenizer kind it models
    token_kind: str = "?"
    num_classes: int = 0

    def check_condition(self, cond: Condition) -> None:
        """Validate class ids (``[0, num_classes)``; the null class is internal) or text features."""
        if cond.labels is not None:
            check_labels(cond.labels, self.num_classes)
        elif cond.text is None:
            raise ValueError("the Condition has neither labels nor text")

    def check_tokenizer(self, tokenizer) -> None:
        """Raise if ``tokenizer`` cannot be paired with this generator (kind, vocabulary, latent size)."""
        if tokenizer.kind != self.token_kind:
            raise ValueError(f"{type(self).__name__} models {self.token_kind} tokens but the tokenizer "
                             f"{type(tokenizer).__name__} is {tokenizer.kind}; pair discrete generators with VQ "
                             f"tokenizers and continuous ones with KL tokenizers")

    @abstractmethod
    def loss(self, tokens: Any, cond: Condition) -> torch.Tensor:
        """Training loss (scalar) of ``tokens`` given ``cond``."""

    #: registered name of the sampler that reproduces the family's official sampling
    default_sampler: str = ""

    def sample(self, cond: Condition, generator: torch.Generator | None = None, **options) -> Any:
        """Draw tokens for every row of ``cond`` with the family's default sampler (no loop lives here:
        this is ``get_sampler(self.default_sampler)(self, cond, generator, **options)``)."""
        from visar.registry import get

        if not self.default_sampler:
            raise TypeError(f"{type(self).__name__} names no default sampler")
        return get("sampler", self.default_sampler)()(self, cond, generator, **options)
