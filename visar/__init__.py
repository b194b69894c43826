"""visar: visual autoregressive image generation.

Public API (imported lazily so that ``import visar`` stays fast)::

    import visar
    pipe = visar.load("shapes-llamagen")        # bundled default model, or a folder / zoo name
    images = pipe([0, 1, 2], cfg_scale=2.0, seed=0)   # list of PIL images
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load", "Pipeline", "Condition", "list_models", "zoo", "__version__"]


def __getattr__(name: str):
    if name == "Pipeline":
        from visar.pipeline import Pipeline

        return Pipeline
    if name == "Condition":
        from visar.conditions import Condition

        return Condition
    if name in ("load", "list_models"):
        from visar import zoo

        return getattr(zoo, name)
    if name == "zoo":  # ``import visar; visar.zoo.create("var-d16")`` as the README writes it
        import importlib

        return importlib.import_module("visar.zoo")
    raise AttributeError(f"module 'visar' has no attribute {name!r}")
