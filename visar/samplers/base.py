"""The Sampler interface: an object that owns one sampling loop and drives a generator's step protocol.

``sampler(model, cond, generator=None, **options) -> tokens``; options given to the constructor are
defaults, options given to the call override them for that call. After every call ``sampler.stats``
holds what the run counted (model passes and anything sampler-specific). Option names come from the
shared vocabulary (:mod:`visar.samplers.options`); an unknown or old name fails before any work.

Samplers register themselves (``@register("sampler", name)``), so ``get_sampler("masked", num_iter=64)``,
the Pipeline's ``sampler="..."`` and the CLI's ``--sampler`` all resolve through one table.
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch

from visar.conditions import Condition
from visar.registry import get, names
from visar.samplers.options import UNIVERSAL, apply_aliases, check_common, check_option_names


class Sampler(abc.ABC):
    """Base class of every sampler.

    Subclasses set :attr:`name`, :attr:`protocol` (the step protocol the model must implement, from
    :mod:`visar.generators.protocol`), :attr:`emits` where the protocol serves both token kinds, :attr:`defaults` (every option it takes, with its default) and
    implement :meth:`run`. ``validate`` may check sampler-specific options (the shared ones are checked).
    """

    name: ClassVar[str] = "?"
    protocol: ClassVar[Any] = object
    #: what the model's steps must emit (``"logits"`` / ``"condition"``); ``None``: no requirement
    emits: ClassVar[str | None] = None
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any):
        options = apply_aliases(options, type(self).__name__, self.defaults)  # guidance_scale -> cfg_scale
        check_option_names(options, {**UNIVERSAL, **self.defaults}, f"{type(self).__name__}")
        self.options = dict(options)
        check_common(self.options)
        #: what the last call counted (filled by :meth:`run`)
        self.stats: dict[str, Any] = {}

    def check_model(self, model: Any) -> None:
        """Raise a ``TypeError`` if ``model`` does not implement :attr:`protocol`."""
        if not isinstance(model, self.protocol):
            kind = getattr(self.protocol, "__name__", str(self.protocol))
            raise TypeError(f"the {self.name!r} sampler drives {kind} generators; {type(model).__name__} is not one. "
                            f"Use its own default sampler (sampler=None) or one of: {', '.join(names('sampler'))}")
        if self.emits is not None and getattr(model, "emits", None) != self.emits:
            what = "discrete tokens from logits" if self.emits == "logits" else "continuous tokens with a token head"
            raise TypeError(f"the {self.name!r} sampler draws {what}; {type(model).__name__} emits "
                            f"{getattr(model, 'emits', None)!r}: use its own default sampler (sampler=None)")

    def resolve(self, options: dict[str, Any]) -> dict[str, Any]:
        """Constructor options, then call options, over :attr:`defaults`; validated."""
        options = apply_aliases(options, type(self).__name__, self.defaults)
        check_option_names(options, {**UNIVERSAL, **self.defaults}, f"{type(self).__name__}")
        opts = {**self.defaults, **self.options, **options}
        check_common(opts)
        self.validate(opts)
        return opts

    def validate(self, options: dict[str, Any]) -> None:
        """Sampler-specific checks of the merged options (shared ones are already checked)."""

    def __call__(self, model: Any, cond: Condition | Any, generator: torch.Generator | None = None,
                 **options: Any) -> Any:
        self.check_model(model)
        opts = self.resolve(options)
        cond = Condition.of(cond)
        if hasattr(model, "check_condition"):
            model.check_condition(cond)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator (for seeded draws) or None, got "
                            f"{type(generator).__name__}")
        self.stats = {}
        if opts.pop("fast_linear", False):  # every sampler's option: the small-row linear route around the run
            from visar.ops import fast_small_linear

            with fast_small_linear():
                return self.run(model, cond, generator, **opts)
        return self.run(model, cond, generator, **opts)

    @abc.abstractmethod
    def run(self, model: Any, cond: Condition, generator: torch.Generator | None, **options: Any) -> Any:
        """Draw the tokens (the sampler's loop); ``options`` are resolved and validated."""

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"


def get_sampler(sampler: "str | Sampler", **options: Any) -> Sampler:
    """A sampler object from a registered name (built with ``options``) or a sampler given as is."""
    if isinstance(sampler, Sampler):
        if options:
            raise TypeError("give options either to the sampler's constructor or to the call, not both here")
        return sampler
    if not isinstance(sampler, str):
        raise TypeError(f"sampler must be a registered name or a visar Sampler, got {type(sampler).__name__}")
    return get("sampler", sampler)(**options)


class OwnSampler(Sampler):
    """Adapter for a generator that samples itself: a class (outside visar's families, e.g. a one-shot
    model or a test double) that overrides ``sample(cond, generator=None, **options)`` and speaks no step
    protocol. The options are that method's keyword arguments, with its defaults.
    """

    name = "own"

    def __init__(self, model: Any, **options: Any):
        import inspect

        params = inspect.signature(model.sample).parameters.values()
        self.defaults = {p.name: p.default for p in params if p.name not in ("cond", "generator")
                         and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty}
        self.model_class = type(model)
        super().__init__(**options)

    def check_model(self, model: Any) -> None:
        if not isinstance(model, self.model_class):
            raise TypeError(f"this sampler wraps {self.model_class.__name__}.sample, not {type(model).__name__}")

    def run(self, model: Any, cond: Condition, generator: torch.Generator | None, **options: Any) -> Any:
        return model.sample(cond, generator=generator, **options)


def default_sampler(model: Any) -> Sampler:
    """The sampler that reproduces ``model``'s official sampling: its class's ``default_sampler`` (a
    registered name), or :class:`OwnSampler` for a generator that only overrides ``sample``."""
    name = getattr(model, "default_sampler", None)
    if name:
        return get("sampler", name)()
    from visar.generators.base import Generator

    if type(model).sample is not Generator.sample:
        return OwnSampler(model)
    raise TypeError(f"{type(model).__name__} names no default sampler: set the class attribute default_sampler to a "
                    f"registered sampler ({', '.join(names('sampler'))}) or override sample()")


__all__ = ["Sampler", "OwnSampler", "get_sampler", "default_sampler"]
