"""Constructor-as-config: modules remember the keyword arguments they were built with.

``save_pretrained`` writes them as JSON next to a safetensors file; ``from_pretrained`` rebuilds the
module from the JSON and loads the weights strictly. No network, no pickle.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import typing
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


#: file names of a component folder (the Hub mixin convention: ``config.json`` + ``model.safetensors``)
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
#: ``config.json["_visar"]["format"]`` of a visar component folder, and its version
COMPONENT_FORMAT, COMPONENT_VERSION = "visar-component", 1


def component_path(directory: str | os.PathLike, name: str | None = None) -> tuple[str, Path] | None:
    """Where a saved module lives: ``("folder", <directory>[/name])`` for a component folder (``config.json``
    + weights), ``("flat", <directory>/<name>.json)`` for the older flat layout (``name.json`` +
    ``name.safetensors``; ``name`` defaults to ``"model"`` there), or ``None`` when neither exists."""
    d = Path(directory)
    folder = d / name if name else d
    if (folder / CONFIG_NAME).is_file():
        return "folder", folder
    flat = d / f"{name or 'model'}.json"
    if flat.is_file():
        return "flat", flat
    return None


def find_saved(directory: str | os.PathLike, name: str | None = None) -> tuple[str, Path] | None:
    """Where ``Class.from_pretrained(directory, name)`` finds its module, in either layout: what
    :func:`component_path` finds, else ``directory`` itself when it is a component folder although ``name`` was
    given (e.g. ``tokenizer.path`` naming a pipeline's ``tokenizer/`` folder, or ``--draft`` a saved generator
    folder); ``None`` when there is nothing to load. Every consumer of a saved module (the training config's
    ``tokenizer.path``, the pre-launch checks, ``visar tokenize --tokenizer``, ``--draft``) resolves through it,
    so flat exports (``name.json`` + ``name.safetensors``) and component folders both work everywhere."""
    found = component_path(directory, name)
    if found is None and name and (Path(directory) / CONFIG_NAME).is_file():
        found = ("folder", Path(directory))
    return found


def describe_missing(directory: str | os.PathLike, name: str | None = None) -> str:
    """What :func:`find_saved` looked for, for error messages: ``"no tokenizer.json (flat layout) and no
    tokenizer/config.json (component folder)"``."""
    if not name:
        return f"no {CONFIG_NAME} (a component folder) and no flat model.json"
    return (f"no {name}.json (flat layout: {name}.json + {name}.safetensors) and no {name}/{CONFIG_NAME} "
            "(component folder)")


class SavedConfig(typing.NamedTuple):
    """A saved module's description, from either layout (see :func:`read_saved_config`)."""

    class_path: Any         #: the ``"class"`` string (validated by the loader)
    family: Any             #: the saved family name (for messages)
    kwargs: dict            #: the constructor's keyword arguments
    path: Path              #: the config file read (``name.json`` or ``folder/config.json``)
    weights: Path           #: the weights file next to it
    raw: dict               #: the whole config file (a component folder's ``config.json``: diffusers keys too)


def read_saved_config(kind: str, path: Path) -> SavedConfig:
    """Read the config of a module :func:`find_saved` found (``kind`` ``"flat"``: ``path`` is ``name.json``;
    ``"folder"``: ``path`` is the component folder) without building it; every malformed file is a
    ``ValueError`` naming it."""
    if kind == "flat":
        meta = read_json(path, "a visar model config")
        if not (isinstance(meta, dict) and isinstance(meta.get("class"), str) and isinstance(meta.get("config"), dict)):
            raise ValueError(f"{path} is not a visar model config: it needs a \"class\" string and a \"config\" "
                             "object (written by save_pretrained)")
        return SavedConfig(meta["class"], meta.get("family"), meta["config"], path, path.with_suffix(".safetensors"),
                           meta)
    cfg_path = path / CONFIG_NAME
    cfg = read_json(cfg_path, "a visar component config")
    meta = cfg.get("_visar") if isinstance(cfg, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != COMPONENT_FORMAT:
        raise ValueError(f"{cfg_path} is not a visar component config (no \"_visar\" entry with \"format\": "
                         f"\"{COMPONENT_FORMAT}\"); a diffusers VAE folder loads with "
                         "visar.convert.mar.load_tokenizer, other models with their converter (visar convert)")
    version = meta.get("version")
    if not isinstance(version, int) or version > COMPONENT_VERSION:
        raise ValueError(f"{cfg_path} has component format version {version!r}; this visar reads up to "
                         f"{COMPONENT_VERSION}: upgrade visar")
    weights = meta.get("weights", WEIGHTS_NAME)
    if not isinstance(weights, str) or "/" in weights or "\\" in weights or weights.startswith("."):
        raise ValueError(f"{cfg_path}: \"_visar\".\"weights\" must be a file name in the folder, got {weights!r}")
    kwargs = meta.get("config")
    if kwargs is None:
        kwargs = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if not isinstance(kwargs, dict):
        raise ValueError(f"{cfg_path}: \"_visar\".\"config\" must be an object of constructor arguments")
    return SavedConfig(meta.get("class"), meta.get("family"), kwargs, cfg_path, path / weights, cfg)


def as_torch_dtype(value: Any, name: str = "torch_dtype") -> torch.dtype | None:
    """``None``, a floating ``torch.dtype`` or its name (``"bfloat16"``, ``"torch.float16"``) as a dtype."""
    if value is None or isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    if isinstance(value, str):
        dt = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(dt, torch.dtype) and dt.is_floating_point:
            return dt
    raise TypeError(f"{name} must be a floating torch dtype such as torch.bfloat16 (or its name, 'bfloat16'), "
                    f"got {value!r}")


class Configurable(nn.Module):
    """Base for tokenizers and generators: a JSON config plus safetensors weights.

    ``save_pretrained(folder)`` writes a *component folder*, the convention of huggingface_hub's
    ``PyTorchModelHubMixin`` (which official LlamaGen uses): ``config.json`` holds the constructor's keyword
    arguments at top level plus a ``"_visar"`` entry (``format``, ``version``, ``class``, ``family``,
    ``weights``), next to the weights ``model.safetensors``; ``Class.from_pretrained(folder)`` rebuilds the
    module. Subclasses may write another weights file and config (the KL tokenizer writes a folder
    ``diffusers.AutoencoderKL.from_pretrained`` opens) through :meth:`component_config`,
    :meth:`component_state` and :meth:`state_from_component`.

    The older flat layout (``save_pretrained(folder, name)``: ``name.json`` + ``name.safetensors`` side by
    side, the files of pipeline folders before format version 3) is still written when a name is given and
    read by ``from_pretrained(folder, name)``, which also finds the component folder ``folder/name``.
    """

    config: dict
    #: short family name written into the saved config (``"llamagen"``, ``"var"``, ...)
    family: str = "?"

    def config_dict(self) -> dict:
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}", "family": self.family,
                "config": self.config}

    # ------------------------------------------------------------------ component folders
    def component_config(self) -> dict:
        """What ``config.json`` holds: the constructor arguments and ``"_visar"`` (class, family, weights)."""
        return {**self.config, "_visar": self._visar_meta(WEIGHTS_NAME)}

    def _visar_meta(self, weights: str, **extra: Any) -> dict:
        d = self.config_dict()
        return {"format": COMPONENT_FORMAT, "version": COMPONENT_VERSION, "class": d["class"], "family": d["family"],
                "weights": weights, **extra}

    def component_state(self) -> dict[str, torch.Tensor]:
        """The tensors of the weights file (default: the state dict)."""
        return dict(self.state_dict())

    @classmethod
    def state_from_component(cls, state: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`component_state`: the module's state dict from the file's tensors and ``config.json``."""
        return state

    def save_pretrained(self, directory: str | os.PathLike, name: str | None = None) -> Path:
        """Write the component folder ``directory`` (``config.json`` + ``model.safetensors``, each file
        atomically, the config last), or with ``name`` the flat files ``directory/name.json`` +
        ``directory/name.safetensors``. Files get the ordinary mode (``0644`` under umask 022)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if name is not None:
            save_safetensors(dict(self.state_dict()), d / f"{name}.safetensors")
            atomic_write_bytes(d / f"{name}.json", json.dumps(self.config_dict(), indent=1).encode())
            return d
        cfg = self.component_config()
        save_safetensors(self.component_state(), d / cfg["_visar"]["weights"], metadata={"format": "pt"})
        atomic_write_bytes(d / CONFIG_NAME, json.dumps(cfg, indent=1).encode())
        return d

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, name: str | None = None,
                        map_location: str | torch.device = "cpu", torch_dtype: Any = None) -> "Configurable":
        """Rebuild a saved module and load its weights strictly.

        Args:
            directory: a component folder (``config.json`` + weights), or the folder holding ``name``.
            name: a component folder ``directory/name`` (e.g. ``"generator"`` of a pipeline folder) or the
                flat files ``directory/name.json`` + ``.safetensors`` (when neither exists and ``directory`` is
                itself a component folder, that folder); ``None``: ``directory`` itself (or its flat
                ``model.json``).
            map_location: device the weights are loaded to.
            torch_dtype: cast floating weights to this dtype (``torch.bfloat16``, ...; default: as stored).
        """
        dtype = as_torch_dtype(torch_dtype)
        d = Path(directory)
        found = find_saved(d, name)  # or the component folder itself (e.g. a saved draft generator)
        if found is None:
            where = d / name if name else d
            flat = f" and no flat {d / (name + '.json')}" if name else ""
            hint = ""
            if (where / "pipeline.json").is_file():
                hint = (" It is a pipeline folder: load it with visar.Pipeline.from_pretrained, or one component "
                        f"with {cls.__name__}.from_pretrained(folder / 'generator') (or 'tokenizer').")
            raise FileNotFoundError(f"saved visar model not found at {where}: no {CONFIG_NAME} there (a component "
                                    f"folder written by save_pretrained){flat}.{hint}")
        saved = read_saved_config(*found)
        target = _check_class(cls, saved.class_path, saved.path, saved.family)
        try:
            model = target(**saved.kwargs)
        except TypeError as e:
            if found[0] == "flat":
                raise
            raise ValueError(f"{saved.path} does not fit {saved.class_path}: {e}") from e
        convert = target.state_from_component if found[0] == "folder" else None
        _load_state(model, saved.weights, map_location, convert, saved.raw)
        return model.to(dtype) if dtype is not None else model


def _check_class(cls: type, class_path: Any, where: Path, family: Any) -> type:
    if not isinstance(class_path, str):
        raise ValueError(f"{where} names no visar class (a \"class\" string, written by save_pretrained)")
    target = resolve_class(class_path)
    if not (isinstance(target, type) and issubclass(target, cls)):
        raise TypeError(f"{where} describes a {class_path} (family {family}), which is not a {cls.__name__}")
    return target


def _load_state(model: nn.Module, weights: Path, map_location: Any, convert=None, meta: dict | None = None) -> None:
    from visar.utils.state_dict import load_state_strict

    state = load_safetensors(weights, device=map_location)
    if convert is not None:
        state = convert(state, meta)
    check_finite_state(state, str(weights))
    load_state_strict(model, state, source=str(weights))


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
