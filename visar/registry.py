"""One registry for everything visar names: families, tokenizers, samplers, training tasks, presets.

Things register themselves where they are defined (``@register("sampler", "autoregressive")``);
the CLI's choices, ``visar models``, the zoo and the trainer read from here, so no second list has to
agree by hand. Lookups import the modules in :data:`MODULES` on first use (``import visar`` stays
fast), which is the one place a new module is announced.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

#: kinds of registered things and what they are
KINDS = {
    "family": "generator classes (one per paradigm/paper)",
    "tokenizer": "tokenizer classes",
    "sampler": "sampler classes (visar.samplers.base.Sampler subclasses)",
    "task": "training tasks (visar.train.tasks)",
}

#: modules that register something; imported lazily, in this order, on the first lookup
MODULES = [
    "visar.tokenizers.vq",
    "visar.tokenizers.msvq",
    "visar.tokenizers.kl",
    "visar.generators.next_token",
    "visar.generators.next_token_continuous",
    "visar.generators.masked",
    "visar.generators.next_scale",
    "visar.generators.next_scale_flow",
    "visar.generators.next_x",
    "visar.generators.coarse_to_fine",
    "visar.eval.classifier",
    "visar.samplers.autoregressive",
    "visar.samplers.continuous_ar",
    "visar.samplers.masked",
    "visar.samplers.next_scale",
    "visar.samplers.next_scale_flow",
    "visar.samplers.next_x",
    "visar.samplers.coarse_to_fine",
    "visar.train.tasks",
]

_ENTRIES: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
_loaded = False


def register(kind: str, name: str) -> Callable[[Any], Any]:
    """Decorator: ``@register("sampler", "masked")`` records the decorated object under ``name``."""
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; one of {sorted(KINDS)}")

    def deco(obj):
        prev = _ENTRIES[kind].get(name)
        if prev is not None and prev is not obj and getattr(prev, "__qualname__", None) != obj.__qualname__:
            raise ValueError(f"{kind} {name!r} is registered twice ({prev!r} and {obj!r})")
        _ENTRIES[kind][name] = obj
        return obj

    return deco


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for mod in MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # a real missing dependency inside the module
                raise
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


__all__ = ["KINDS", "MODULES", "register", "names", "get", "items"]
