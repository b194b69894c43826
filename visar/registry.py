"""One registry for everything visar names: families, tokenizers, samplers, training tasks, presets.

Things register themselves where they are defined (``@register("sampler", "autoregressive")``);
the CLI's choices, ``visar models``, the zoo and the trainer read from here, so no second list has to
agree by hand. Lookups import the modules in :data:`MODULES` on first use (``import visar`` stays
fast), which is the one place a new module is announced.
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

#: kinds of registered things and what they are
KINDS = {
    "family": "generator classes (one per paradigm/paper)",
    "tokenizer": "tokenizer classes",
    "sampler": "sampler classes (visar.samplers.base.Sampler subclasses)",
    "task": "training tasks (visar.train.tasks)",
    "converter": "official checkpoint readers (visar.convert.common.Converter), one per family",
    "text_encoder": "caption encoders of text-to-image pipelines (visar.text.base.TextEncoder subclasses)",
}

#: modules that register something; imported lazily, in this order, on the first lookup
MODULES = [
    "visar.tokenizers.vq",
    "visar.tokenizers.msvq",
    "visar.tokenizers.kl",
    "visar.generators.next_token.llamagen",
    "visar.generators.next_token.continuous",
    "visar.generators.next_token.distilled",
    "visar.generators.masked.mar",
    "visar.generators.next_scale.var",
    "visar.generators.next_scale.distilled",
    "visar.generators.next_scale.flowar",
    "visar.generators.next_x.xar",
    "visar.generators.coarse_to_fine.ctf",
    "visar.eval.classifier",
    "visar.samplers.autoregressive",
    "visar.samplers.continuous_ar",
    "visar.samplers.masked",
    "visar.samplers.next_scale",
    "visar.samplers.next_scale_flow",
    "visar.samplers.next_x",
    "visar.samplers.coarse_to_fine",
    "visar.samplers.continuous_speculative",
    "visar.samplers.speculative",
    "visar.samplers.jacobi",
    "visar.samplers.flow_map",
    "visar.samplers.distilled",
    "visar.text.minilm",
    "visar.text.t5",
    "visar.text.tiny",
    "visar.train.tasks",
    "visar.convert.llamagen",
    "visar.convert.var",
    "visar.convert.mar",
    "visar.convert.flowar",
    "visar.convert.xar",
]

@dataclass(frozen=True)
class Preset:
    """A named configuration (family modules define ``PRESETS: dict[str, Preset]``; :mod:`visar.zoo` serves them).

    Attributes:
        cls: ``"module:Class"`` of the tokenizer or generator.
        kwargs: constructor arguments.
        kind: ``"generator"`` or ``"tokenizer"`` (or ``"classifier"``).
        paper: where the configuration comes from.
        eval: evaluation protocol (cfg, sampling settings, image size, resize, labels; sources cited).
    """

    cls: str
    kwargs: dict = field(default_factory=dict)
    kind: str = "generator"
    paper: str = ""
    eval: dict = field(default_factory=dict)


_ENTRIES: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
_loaded = False


def register(kind: str, name: str) -> Callable[[Any], Any]:
    """Decorator: ``@register("sampler", "masked")`` records the decorated object under ``name``."""
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; one of {sorted(KINDS)}")

    def deco(obj):
        prev = _ENTRIES[kind].get(name)
        # re-registering the same definition (a module imported twice, e.g. under reload) is fine
        same = prev is obj or (getattr(prev, "__qualname__", None) is not None
                               and getattr(prev, "__qualname__", None) == getattr(obj, "__qualname__", None))
        if prev is not None and not same:
            raise ValueError(f"{kind} {name!r} is registered twice ({prev!r} and {obj!r})")
        _ENTRIES[kind][name] = obj
        return obj

    return deco


def modules() -> list[Any]:
    """The registering modules of :data:`MODULES` that exist, imported (each once)."""
    out = []
    for mod in MODULES:
        try:
            out.append(importlib.import_module(mod))
        except ModuleNotFoundError as e:
            if e.name != mod:  # a real missing dependency inside the module
                raise
    return out


def _load_all() -> None:
    global _loaded
    if not _loaded:
        modules()
        _loaded = True


def names(kind: str) -> list[str]:
    """Sorted names registered under ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; one of {sorted(KINDS)}")
    _load_all()
    return sorted(_ENTRIES[kind])


def get(kind: str, name: str) -> Any:
    """The object registered as ``name``; an unknown name raises a ``KeyError`` listing close names."""
    known = names(kind)
    if name not in _ENTRIES[kind]:
        close = difflib.get_close_matches(str(name), known, n=3)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown {kind} {name!r}{hint} Known: {', '.join(known)}")
    return _ENTRIES[kind][name]


def items(kind: str) -> dict[str, Any]:
    """``{name: object}`` of one kind (a copy)."""
    names(kind)
    return dict(_ENTRIES[kind])


__all__ = ["KINDS", "MODULES", "Preset", "register", "modules", "names", "get", "items"]
