"""Named configurations (presets) and where their weights come from.

Every family module that has presets defines ``PRESETS: dict[str, Preset]``; this module only
collects them (lazily, on first use) from the registering modules of :mod:`visar.registry`. Weights are never downloaded: a preset is built with random
weights (``create``), loaded from the bundled assets, from a saved folder, or from an official
checkpoint through ``visar.convert``.
"""
from __future__ import annotations

import fnmatch
import importlib
from pathlib import Path
from typing import Any

from visar import registry
from visar.registry import Preset  # noqa: F401  (re-exported: presets are data, defined below the families)

ASSETS = Path(__file__).parent / "assets"
#: bundled pipelines: name -> folder under visar/assets
BUNDLED = {"shapes-llamagen": "shapes-llamagen"}
DEFAULT_MODEL = "shapes-llamagen"


_REGISTRY: dict[str, Preset] | None = None


def _registry() -> dict[str, Preset]:
    global _REGISTRY
    if _REGISTRY is None:
        reg: dict[str, Preset] = {}
        for m in registry.modules():  # the one list of registering modules
            reg.update(getattr(m, "PRESETS", {}))
        _REGISTRY = reg
    return _REGISTRY


def list_models(pattern: str = "*") -> list[str]:
    """Names of presets and bundled pipelines matching a glob ``pattern`` (e.g. ``"var-*"``)."""
    names = sorted(set(_registry()) | set(BUNDLED))
    return [n for n in names if fnmatch.fnmatch(n, pattern)]


def get_preset(name: str) -> Preset:
    reg = _registry()
    if name not in reg:
        close = [n for n in reg if name.split("-")[0] in n][:8]
        raise KeyError(f"unknown preset {name!r}; similar: {close or list_models()[:12]}")
    return reg[name]


def create(name: str, **overrides: Any):
    """Build preset ``name`` with random weights (``overrides`` replace constructor arguments)."""
    p = get_preset(name)
    module, _, cls = p.cls.partition(":")
    klass = getattr(importlib.import_module(module), cls)
    return klass(**{**p.kwargs, **overrides})


def load(name_or_path: str | Path = DEFAULT_MODEL, device: str = "cpu"):
    """Load a :class:`~visar.pipeline.Pipeline` from a bundled name or a saved folder.

    Official checkpoints are loaded with the family converters (``visar.convert.<family>``) and
    wrapped with ``Pipeline(tokenizer, generator)``.
    """
    from visar.pipeline import Pipeline

    name = str(name_or_path)
    if name in BUNDLED:
        folder = ASSETS / BUNDLED[name]
        if not (folder / "pipeline.json").is_file():
            raise FileNotFoundError(f"bundled model {name!r} is missing from {folder}; reinstall visar")
        return Pipeline.from_pretrained(folder, device=device)
    path = Path(name)
    if path.is_dir():
        return Pipeline.from_pretrained(path, device=device)
    raise FileNotFoundError(f"{name!r} is neither a bundled model ({sorted(BUNDLED)}) nor a pipeline folder. "
                            "Official checkpoints: load them with visar.convert.<family>.load_tokenizer / "
                            "load_generator and wrap them in visar.Pipeline, or run `visar convert`.")
