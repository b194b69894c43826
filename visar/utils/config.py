"""Constructor-as-config: modules remember the keyword arguments they were built with.

``save_pretrained`` writes them as JSON next to a safetensors file; ``from_pretrained`` rebuilds the
module from the JSON and loads the weights strictly. No network, no pickle.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visar.utils.io import atomic_write_bytes, load_safetensors, save_safetensors


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    raise TypeError(f"config value {v!r} of type {type(v).__name__} is not JSON-serialisable")


def register_config(init):
    """Decorator for ``__init__``: stores every argument (defaults included) in ``self.config``."""
    sig = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        cfg = {k: v for k, v in bound.arguments.items() if k != "self"}
        extra = cfg.pop("kwargs", None) if "kwargs" in sig.parameters else None
        if extra:
            cfg.update(extra)
        init(self, *args, **kwargs)
        object.__setattr__(self, "config", _jsonable(cfg))

    return wrapper


class Configurable(nn.Module):
    """Base for tokenizers and generators: a JSON config plus safetensors weights."""

    config: dict
    #: short family name written into the saved config (``"llamagen"``, ``"var"``, ...)
    family: str = "?"

    def config_dict(self) -> dict:
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}", "family": self.family,
                "config": self.config}

    def save_pretrained(self, directory: str | os.PathLike, name: str = "model") -> Path:
        """Write ``{name}.json`` and ``{name}.safetensors`` into ``directory`` atomically."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {k: v for k, v in self.state_dict().items()}
        save_safetensors(state, d / f"{name}.safetensors")
        atomic_write_bytes(d / f"{name}.json", json.dumps(self.config_dict(), indent=1).encode())
        return d

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, name: str = "model",
                        map_location: str | torch.device = "cpu") -> "Configurable":
        """Rebuild from ``{name}.json`` and load ``{name}.safetensors`` strictly."""
        d = Path(directory)
        cfg_path = d / f"{name}.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path} not found: a visar folder holds {name}.json + {name}.safetensors "
                                    "(written by save_pretrained)")
        meta = read_json(cfg_path, "a visar model config")
        if not isinstance(meta, dict) or not isinstance(meta.get("class"), str) or not isinstance(
                meta.get("config"), dict):
            raise ValueError(f"{cfg_path} is not a visar model config: it needs a \"class\" string and a \"config\" "
                             "object (written by save_pretrained)")
        target = resolve_class(meta["class"])
        if not (isinstance(target, type) and issubclass(target, cls)):
            raise TypeError(f"{cfg_path} describes a {meta['class']} (family {meta.get('family')}), "
                            f"which is not a {cls.__name__}")
        model = target(**meta["config"])
        weights = d / f"{name}.safetensors"
        state = load_safetensors(weights, device=map_location)
        check_finite_state(state, str(weights))
        from visar.utils.state_dict import load_state_strict
        load_state_strict(model, state, source=str(weights))
        return model


def read_json(path: str | os.PathLike, what: str = "JSON") -> Any:
    """Parse a JSON file; a syntax error or an unreadable file raises a ``ValueError`` naming ``path``."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); it should hold {what}: restore it from where the "
                         "folder came from or save the model again") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a text file ({e}); it should hold {what}") from e


def check_finite_state(state: dict, source: str) -> None:
    """Refuse weights holding NaN or infinite values (a broken training run or a corrupt file), naming the
    file and the first tensors affected: such weights load silently and decode to black images."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{source} holds NaN or infinite weights in {len(bad)} tensor(s), e.g. {bad[:3]}; the "
                         "file is corrupt or comes from a diverged training run: use an earlier checkpoint")


def resolve_class(path: str):
    import importlib

    module, _, qual = path.rpartition(".")
    if not module.startswith("visar."):
        raise ValueError(f"refusing to import {path!r}: saved visar models name classes inside visar")
    obj = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj
