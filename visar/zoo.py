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
BUNDLED = {"shapes-llamagen": "shapes-llamagen", "shapes-llamagen-t2i": "shapes-llamagen-t2i"}
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


def matches(name: str, pattern: str) -> bool:
    """Whether ``name`` matches ``pattern``: a glob when it holds ``*``, ``?`` or ``[`` (``"var-*"``), else a
    substring (``"llamagen"`` matches every LlamaGen entry). ``visar models`` and ``visar eval protocols``
    filter with it."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def list_models(pattern: str = "*") -> list[str]:
    """Names of presets and bundled pipelines matching ``pattern`` (a glob such as ``"var-*"`` or a
    substring such as ``"llamagen"``, see :func:`matches`)."""
    names = sorted(set(_registry()) | set(BUNDLED))
    return [n for n in names if matches(n, pattern)]


def _safetensors_numel(path: Path) -> int:
    """Number of values stored in a safetensors file, read from its header only."""
    import json
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for k, v in header.items():
        if k != "__metadata__":
            size = 1
            for d in v["shape"]:
                size *= d
            total += size
    return total


def describe(name: str) -> dict[str, Any]:
    """What ``visar models`` prints for one entry: ``{"name", "weights", "kind", "family", "params"}``.

    ``weights`` is ``"trained"`` for a bundled pipeline (weights shipped in ``visar/assets``) and
    ``"random"`` for a preset (a configuration; ``create`` builds it with random weights). ``params`` counts
    parameters (a preset is built on the ``meta`` device, so nothing is allocated).
    """
    if name in BUNDLED:
        from visar.utils.config import find_saved, read_saved_config

        folder, family, params = ASSETS / BUNDLED[name], "?", 0
        for part in ("tokenizer", "generator"):  # flat (name.json) or component-folder layout
            found = find_saved(folder, part)
            if found is not None:
                saved = read_saved_config(*found)
                family = saved.family or family if part == "generator" else family
                params += _safetensors_numel(saved.weights)
        return {"name": name, "weights": "trained", "kind": "pipeline", "family": family, "params": params}
    import torch

    p = get_preset(name)
    with torch.device("meta"):
        model = create(name)
    return {"name": name, "weights": "random", "kind": p.kind, "family": getattr(model, "family", "?"),
            "params": sum(t.numel() for t in model.parameters())}


def format_params(n: int) -> str:
    """``4_200_000`` -> ``"4.2M"``, ``3_096_659_200`` -> ``"3.1B"``."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


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


def load(name_or_path: str | Path = DEFAULT_MODEL, device: str = "cpu", torch_dtype: Any = None):
    """Load a :class:`~visar.pipeline.Pipeline` from a bundled name or a saved folder.

    ``torch_dtype`` (``torch.bfloat16``, ``torch.float16`` or its name) casts the tokenizer's and generator's
    weights, as ``Pipeline.from_pretrained(..., torch_dtype=...)`` does (logits stay float32). Official
    checkpoints are loaded with the family converters (``visar.convert.<family>``) and wrapped with
    ``Pipeline(tokenizer, generator)``.
    """
    from visar.pipeline import Pipeline

    name = str(name_or_path)
    if name in BUNDLED:
        folder = ASSETS / BUNDLED[name]
        if not (folder / "pipeline.json").is_file():
            raise FileNotFoundError(f"bundled model {name!r} is missing from {folder}; reinstall visar")
        return Pipeline.from_pretrained(folder, device=device, torch_dtype=torch_dtype)
    path = Path(name)
    if path.is_dir():
        return Pipeline.from_pretrained(path, device=device, torch_dtype=torch_dtype)
    raise FileNotFoundError(f"{name!r} is neither a bundled model ({sorted(BUNDLED)}) nor a pipeline folder. "
                            "Official checkpoints: load them with visar.convert.<family>.load_tokenizer / "
                            "load_generator and wrap them in visar.Pipeline, or run `visar convert`.")
