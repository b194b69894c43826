"""Checks of a training config that need more than its own text, run by ``visar train`` before any
process starts (about a second; no weights are read or allocated).

:func:`preflight` raises :class:`~visar.train.config.ConfigError` naming the config key and what to do
when:

* ``model.cls`` / ``model.preset`` / ``model.kwargs`` do not build a model: the model is built on the
  ``meta`` device (shapes only, no memory), so a kwarg the class does not take or a value its constructor
  refuses fails here instead of after the data and the processes are set up;
* the frozen tokenizer (``tokenizer.path``, task ``generator``) does not fit the model: the tokenizer is
  built on ``meta`` from its JSON config and handed to the generator's own ``check_tokenizer`` (kind,
  vocabulary, latent channels, stride, scale schedule); the vocabulary is compared even where that
  check needs real weights;
* the token grid of ``data.size`` images (or of a token cache's recorded token shape) differs from the
  latent grid the generator models (``grid_size``, ``latent_side``, ``scales[-1]``, ...);
* ``train.batch_size`` does not split over ``processes x train.grad_accum``;
* ``train.resume`` names no complete checkpoint, or the checkpoint to resume (``auto``: the newest in
  ``<output_dir>/checkpoints``) holds another model;
* ``train.output_dir`` or the export folder cannot be created or written.

Checks that need real values (a CTF model's codebook hash, a token cache's tokenizer fingerprint) stay
where they are, in the trainer.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from visar.train.config import ConfigError, TrainConfig

log = logging.getLogger("visar.train")


def preflight(cfg: TrainConfig, num_processes: int = 1) -> None:
    """Raise :class:`ConfigError` for the problems listed in the module docstring (``num_processes``: the
    processes the run will use)."""
    check_batch(cfg, num_processes)
    check_paths(cfg)
    model = meta_model(cfg)
    check_resume(cfg, model)
    if cfg.task == "generator" and cfg.tokenizer.path:
        check_tokenizer(cfg, model, meta_tokenizer(cfg))


def check_batch(cfg: TrainConfig, num_processes: int) -> None:
    t = cfg.train
    k = num_processes * t.grad_accum
    if t.batch_size % k:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by processes x train.grad_accum = "
                          f"{num_processes} x {t.grad_accum} (it is the global batch of one optimizer step), e.g. "
                          f"train.batch_size={k * -(-t.batch_size // k)}")


def check_paths(cfg: TrainConfig) -> None:
    from visar.train.checkpoint import FILES, is_complete
    from visar.utils.io import check_writable_dir

    for key, path in (("train.output_dir", Path(cfg.train.output_dir)), ("export_dir", cfg.export_path())):
        try:
            check_writable_dir(path, key)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    resume = cfg.train.resume
    if resume not in ("auto", "never", ""):
        p = Path(resume)
        if not is_complete(p):
            what = ("does not exist" if not p.exists() else
                    f"is not a complete checkpoint (a step_* folder holding {', '.join(FILES)})")
            raise ConfigError(f"train.resume={resume} {what}; give a folder under <train.output_dir>/checkpoints, "
                              "train.resume=auto (the newest there) or train.resume=never")


def meta_model(cfg: TrainConfig) -> torch.nn.Module | None:
    """The model of ``cfg.model`` built on the ``meta`` device; ``None`` when its constructor needs real values
    (then only the keyword names are checked against its signature)."""
    import warnings

    from visar.train.trainer import build_model

    m = cfg.model
    if m.cls is not None and not isinstance(_target(m.cls), type):  # a factory (may read weights): names only
        _check_kwarg_names(cfg)
        return None
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on meta tensors
            return build_model(cfg)
    except KeyError as e:  # an unknown preset
        raise ConfigError(f"model.preset={m.preset}: {e.args[0] if e.args else e}") from None
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith("model.") or "model.cls" in msg else
                          f"model.kwargs do not fit {m.cls or m.preset}: {msg}") from None
    except (RuntimeError, NotImplementedError) as e:  # e.g. .item() inside a constructor: not checkable on meta
        log.debug("model not buildable on the meta device (%s); checking keyword names only", e)
        _check_kwarg_names(cfg)
        return None


def _target(cls_path: str) -> Any:
    import importlib

    module, _, name = cls_path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"config key model.cls={cls_path!r} cannot be imported: {e}") from None


def _check_kwarg_names(cfg: TrainConfig) -> None:
    import inspect

    m = cfg.model
    if m.cls is None:
        return
    try:
        inspect.signature(_target(m.cls)).bind(**m.kwargs)
    except TypeError as e:
        raise ConfigError(f"model.kwargs do not fit {m.cls}: {e}") from None


def meta_tokenizer(cfg: TrainConfig) -> torch.nn.Module | None:
    """The frozen tokenizer built on ``meta`` from its saved config (no weights read), in either layout:
    ``<tokenizer.path>/<tokenizer.name>.json`` (flat), ``<tokenizer.path>/<tokenizer.name>/config.json`` (a
    pipeline folder) or ``<tokenizer.path>/config.json`` (the component folder itself), found as
    ``Tokenizer.from_pretrained`` finds it; ``None`` when its constructor needs real values."""
    from visar.tokenizers.base import Tokenizer
    from visar.utils.config import describe_missing, find_saved, read_saved_config, resolve_class

    t = cfg.tokenizer
    found = find_saved(t.path, t.name)
    if found is None:
        raise ConfigError(f"tokenizer.path={t.path} holds {describe_missing(t.path, t.name)}")
    try:
        saved = read_saved_config(*found)
        klass = resolve_class(saved.class_path) if isinstance(saved.class_path, str) else None
        if not (isinstance(klass, type) and issubclass(klass, Tokenizer)):
            raise ValueError(f"{saved.path} describes a {saved.class_path} (family {saved.family}), not a visar "
                             "Tokenizer; give the tokenizer's folder (tokenizer.name: the component to use)")
        with torch.device("meta"):
            return klass(**saved.kwargs)
    except (ValueError, TypeError, AttributeError, ImportError) as e:
        raise ConfigError(f"tokenizer.path={t.path}: {e}") from None
    except (RuntimeError, NotImplementedError) as e:
        log.debug("tokenizer not buildable on the meta device (%s): skipping the tokenizer checks", e)
        return None


def check_tokenizer(cfg: TrainConfig, model: torch.nn.Module | None, tokenizer: torch.nn.Module | None) -> None:
    if model is None or tokenizer is None:
        return
    where = f"tokenizer.path={cfg.tokenizer.path} and the model ({type(model).__name__})"
    mine, theirs = getattr(model, "vocab_size", None), getattr(tokenizer, "vocab_size", None)
    if isinstance(mine, int) and isinstance(theirs, int) and mine != theirs:
        raise ConfigError(f"{where} do not fit: the tokenizer has {theirs} codes, the model predicts {mine}; set "
                          f"the model's vocab_size: {theirs} (model.kwargs) or use the tokenizer it was built for")
    check = getattr(model, "check_tokenizer", None)
    if callable(check):
        try:
            check(tokenizer)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where} do not fit: {e}") from None
        except (RuntimeError, NotImplementedError) as e:  # the check needs real values (e.g. a codebook hash)
            log.debug("%s.check_tokenizer needs real weights (%s); the trainer checks it", type(model).__name__, e)
    side = latent_side(model)
    if side is None:
        return
    got, source = data_latent_side(cfg, tokenizer)
    if got is not None and got != side:
        down = getattr(tokenizer, "downsample", 1)
        raise ConfigError(f"{source} gives a {got}x{got} token grid but the model ({type(model).__name__}) models "
                          f"{side}x{side}: use data.size={side * down} (the tokenizer downsamples by {down}) or "
                          f"build the model for a {got}x{got} grid")


def latent_side(model: torch.nn.Module) -> int | None:
    """Side of the tokenizer's latent grid that ``model`` models, from what the families expose
    (``latent_side``; ``scales[-1]``; ``img_size // vae_stride``; ``grid_size``); ``None`` when unknown."""
    def as_int(v: Any) -> int | None:
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    side = as_int(getattr(model, "latent_side", None))
    if side is not None:
        return side
    scales = getattr(model, "scales", None)
    if isinstance(scales, (list, tuple)) and scales and as_int(scales[-1]) is not None:
        return scales[-1]
    img, stride = as_int(getattr(model, "img_size", None)), as_int(getattr(model, "vae_stride", None))
    if img is not None and stride:
        return img // stride
    return as_int(getattr(model, "grid_size", None))


def data_latent_side(cfg: TrainConfig, tokenizer: torch.nn.Module) -> tuple[int | None, str]:
    """``(side, what gives it)`` of the token grid the data will feed: a token cache's recorded token shape,
    else ``data.size`` over the tokenizer's downsampling."""
    d = cfg.data
    if d.kind == "token_cache":
        index = Path(d.path) / "index.json"
        try:
            shapes = json.loads(index.read_text()).get("token_shape") or {}
        except (OSError, ValueError):
            return None, ""  # the dataset reports an unreadable cache itself
        sides = [s[-1] for s in shapes.values() if isinstance(s, list) and s and isinstance(s[-1], int)]
        return (max(sides), f"the token cache data.path={d.path}") if sides else (None, "")
    if d.kind not in ("shapes", "folder"):
        return None, ""
    down = getattr(tokenizer, "downsample", None)
    if not isinstance(down, int) or down < 1:
        return None, ""
    if d.size % down:
        raise ConfigError(f"data.size={d.size} is not divisible by the tokenizer's downsampling {down}")
    return d.size // down, f"data.size={d.size}"


def check_resume(cfg: TrainConfig, model: torch.nn.Module | None) -> None:
    """The checkpoint a run would resume holds the same model class and constructor config."""
    from visar.train.checkpoint import find_latest

    t = cfg.train
    if model is None or t.resume in ("never", ""):
        return
    path = find_latest(Path(t.output_dir) / "checkpoints") if t.resume == "auto" else Path(t.resume)
    if path is None:
        return
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"checkpoint {path} has an unreadable meta.json ({e}); delete that folder or set "
                          "train.resume=never") from None
    cls = f"{type(model).__module__}.{type(model).__qualname__}"
    config = getattr(model, "config", None)
    if (meta.get("model_class"), meta.get("model_config")) != (cls, _jsonable(config)):
        raise ConfigError(f"cannot resume from {path}: it holds a {meta.get('model_class')} with config "
                          f"{meta.get('model_config')}, but this config builds a {cls} with config {config}; use "
                          "another train.output_dir or train.resume=never")


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value)) if value is not None else None
