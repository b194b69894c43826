"""Atomic training checkpoints: a folder per step, written under a temporary name then renamed.

Layout of ``<output_dir>/checkpoints/step_00000100/``::

    model.safetensors     raw (trained) weights
    ema.safetensors       EMA weights (what sampling and the export use)
    trainer_state.pt      optimizer, grad scaler, per-rank RNG states, training buffers (below);
                          read with weights_only=True
    meta.json             step, task, model class + config, the full training config (written last)

A *sharded* checkpoint (``train.fsdp.state_dict: sharded``) holds ``sharded/`` (every rank's shards of the
model, EMA and optimizer, written with ``torch.distributed.checkpoint``) instead of the two ``.safetensors``
files. A checkpoint is *complete* when a folder named ``step_*`` holds all four files (sharded: ``sharded/``
with its ``.metadata``, ``trainer_state.pt`` and ``meta.json``). The folder is first
written as ``.tmp-step_*`` and renamed only when every file is on disk, then ``latest`` is updated,
and only then are older checkpoints beyond ``keep`` removed: an interrupted write leaves the previous
checkpoint intact and a stale ``.tmp-*`` folder that the next save removes. Resuming scans the folder
for the complete checkpoint with the highest step (:func:`find_latest`), so a kill between the rename
and the ``latest`` update loses nothing.

*Training buffers* are non-persistent buffers (absent from ``state_dict`` and from exported weights,
e.g. the multi-scale quantizer's code ages) that training updates and a bit-exact resume needs. A
module lists their names in a ``training_state_buffers`` class attribute; :func:`training_buffers`
collects them by dotted name and :func:`load_training_buffers` puts them back.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from visar.utils.io import atomic_write_bytes, load_safetensors, save_safetensors

log = logging.getLogger("visar.train")

PREFIX = "step_"


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: the files of a checkpoint; ``meta.json`` is written last
FILES = ("model.safetensors", "ema.safetensors", "trainer_state.pt", "meta.json")


#: a sharded checkpoint's folder of shards, and the file that ``torch.distributed.checkpoint`` writes last there
SHARDED_DIR, SHARDED_DONE = "sharded", ".metadata"


def is_sharded(path: Path) -> bool:
    """Whether ``path`` is a sharded checkpoint (``sharded/`` instead of the ``.safetensors`` files)."""
    return (Path(path) / SHARDED_DIR / SHARDED_DONE).is_file()


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a finished checkpoint: a ``step_*`` folder holding every file of :data:`FILES`
    (or, sharded, its shards, ``trainer_state.pt`` and ``meta.json``)."""
    path = Path(path)
    if not (path.is_dir() and path.name.startswith(PREFIX)):
        return False
    if all((path / f).is_file() for f in FILES):
        return True
    return is_sharded(path) and all((path / f).is_file() for f in ("trainer_state.pt", "meta.json"))


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def find_latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root``: the complete ``step_*`` folder with the highest step
    (found by scanning ``root``; ``None`` if there is none).

    ``latest`` is only a pointer for people and tools, not trusted: a run killed after a checkpoint's
    rename but before the pointer's update leaves ``latest`` naming the previous checkpoint, and resuming
    from it would redo (and with a different number of processes, change) the steps in between. Steps
    only grow within a run and pruning keeps the highest ones, so the highest step is the newest.
    """
    root = Path(root)
    ckpts = list_checkpoints(root)
    if not ckpts:
        return None
    newest = ckpts[-1]
    pointer = root / "latest"
    if pointer.is_file():
        try:
            named = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            named = "?"
        if named != newest.name:
            log.warning("%s names %s, but %s is the newest complete checkpoint (the run stopped after writing it, "
                        "before updating the pointer): using %s", pointer, named or "nothing", newest.name,
                        newest.name)
    return newest


def save_checkpoint(root: str | os.PathLike, step: int, model_state: dict[str, torch.Tensor],
                    ema_state: dict[str, torch.Tensor], trainer_state: dict[str, Any], meta: dict,
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically under ``root`` and prune to the newest ``keep`` complete ones."""
    tmp = begin_checkpoint(root, step)
    return finish_checkpoint(root, tmp, step, trainer_state, meta, keep, model_state, ema_state)


def begin_checkpoint(root: str | os.PathLike, step: int, shared: bool = False) -> Path:
    """Remove leftovers of interrupted saves under ``root`` and create the temporary folder of checkpoint
    ``step`` (named after this process, or with ``shared`` the same name for every rank, which then all
    write their shards into it). Returns that folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # leftovers of an interrupted save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{step_dir_name(step)}-{'shared' if shared else os.getpid()}"
    tmp.mkdir()
    return tmp


def finish_checkpoint(root: str | os.PathLike, tmp: Path, step: int, trainer_state: dict[str, Any], meta: dict,
                      keep: int = 2, model_state: dict[str, torch.Tensor] | None = None,
                      ema_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the weights (unless the shards are already in ``tmp``), ``trainer_state.pt`` and ``meta.json``
    (last) into ``tmp``, rename it to ``step_*``, point ``latest`` at it and prune to ``keep`` checkpoints."""
    root = Path(root)
    name = step_dir_name(step)
    try:
        if model_state is not None:
            save_safetensors(model_state, tmp / "model.safetensors")
            save_safetensors(ema_state, tmp / "ema.safetensors")
        buf = io.BytesIO()
        torch.save(trainer_state, buf)
        atomic_write_bytes(tmp / "trainer_state.pt", buf.getvalue())
        atomic_write_bytes(tmp / "meta.json", json.dumps({**meta, "step": step}, indent=1).encode())
        _fsync_dir(tmp)
        final = root / name
        if final.exists():  # re-saving the same step: move the old copy aside first
            old = root / f".tmp-old-{name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_bytes(root / "latest", name.encode())
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict | None, dict | None, dict]:
    """``(meta, model_state, ema_state, trainer_state)`` of a complete checkpoint folder (no pickled code);
    a sharded checkpoint gives ``None`` for the two states (see :func:`visar.train.fsdp.load_sharded`)."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete visar checkpoint (a step_* folder with meta.json); "
                                "checkpoints are written under <output_dir>/checkpoints")
    meta = json.loads((path / "meta.json").read_text())
    sharded = not (path / "model.safetensors").is_file()
    model_state = None if sharded else load_safetensors(path / "model.safetensors")
    ema_state = None if sharded else load_safetensors(path / "ema.safetensors")
    try:
        trainer_state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path / 'trainer_state.pt'} is unreadable (truncated, or not written by visar): {e}") from e
    return meta, model_state, ema_state, trainer_state


def _listed_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{dotted name: buffer}`` of the buffers every submodule lists in ``training_state_buffers``."""
    out = {}
    for prefix, mod in model.named_modules():
        for name in getattr(mod, "training_state_buffers", ()):
            buf = getattr(mod, name, None)
            if not isinstance(buf, torch.Tensor):
                raise TypeError(f"{type(mod).__name__}.training_state_buffers names {name!r}, which is not a buffer")
            out[f"{prefix}.{name}" if prefix else name] = buf
    return out


def training_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{dotted name: CPU copy}`` of the model's training buffers (see the module docstring)."""
    return {k: v.detach().cpu().clone() for k, v in _listed_buffers(model).items()}


def load_training_buffers(model: torch.nn.Module, state: dict[str, torch.Tensor] | None, source: str = "") -> None:
    """Copy ``state`` (from :func:`training_buffers`) into ``model``'s training buffers in place.

    A buffer the model lists but ``state`` lacks (a checkpoint written before it was listed) keeps
    its value, with a warning naming it; an entry the model does not list, or one of another shape,
    raises ``ValueError``.
    """
    state, mine, where = dict(state or {}), _listed_buffers(model), source or "the checkpoint"
    extra = sorted(set(state) - set(mine))
    if extra:
        raise ValueError(f"{where} holds training buffers this model does not have: {extra[:5]}")
    missing = sorted(set(mine) - set(state))
    if missing:
        log.warning("%s has no saved %s: they keep their initial values, so the resumed run is not bit-exact",
                    where, ", ".join(missing))
    for k, v in state.items():
        if tuple(v.shape) != tuple(mine[k].shape):
            raise ValueError(f"{where}: training buffer {k} has shape {tuple(v.shape)}, the model's has "
                             f"{tuple(mine[k].shape)}")
        mine[k].copy_(v)
