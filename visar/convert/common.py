"""Shared checkpoint reading, container unwrapping and strict loading for all converters."""
from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import torch

from visar.utils.state_dict import CheckpointError, load_state_strict  # noqa: F401  (re-exported)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a ``.pt/.pth/.ckpt`` (``weights_only=True``) or ``.safetensors`` file into a dict.

    Raises:
        FileNotFoundError: the file does not exist.
        IsADirectoryError: ``path`` is a folder.
        CheckpointError: the file is truncated/corrupt or not a checkpoint at all ("not a valid
            checkpoint"), or holds pickled non-tensor objects (a training checkpoint with e.g. an
            ``argparse.Namespace``; the message names the object and says how to extract the weights).
    """
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".pt", ".pth", ".ckpt", ".bin", ".safetensors"))
        hint = f" (it holds {', '.join(inside[:6])})" if inside else ""
        raise IsADirectoryError(f"checkpoint {path} is a folder, not a file: give the checkpoint file itself{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from visar.utils.io import load_safetensors

        return load_safetensors(path)
    try:
        with warnings.catch_warnings():  # bytes that merely look like a pickle header: the error below says it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unsupported_global(str(e))
        if detail is None:  # not an object pickle: bytes that are no checkpoint at all
            raise CheckpointError(f"{path} is not a valid checkpoint (corrupt or another format): PyTorch cannot read "
                                  "it as a tensor file. If it should be one, it is truncated or corrupt: check that "
                                  "the download or copy is complete") from e
        raise CheckpointError(
            f"{path} holds pickled Python objects besides tensors ({detail}; typical of training checkpoints with "
            f"'args'/'optimizer' entries), which visar refuses to execute. If you trust the file, extract "
            f"the weights once with:\n  python -c \"import torch; c = torch.load('{path}', weights_only=False); "
            f"torch.save(c['model'], 'weights_only.pt')\"\n(use the key that holds the weights: model / "
            f"model_ema / state_dict / module).") from e
    except Exception as e:  # torch raises many types for corrupt files (RuntimeError, EOFError, IndexError, ...)
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a valid checkpoint (corrupt or another format): PyTorch stops with "
                              f"{type(e).__name__} {detail!r}. If it should be one, it is truncated or corrupt: "
                              "check that the download or copy is complete") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors")
    return dict(obj)


def _unsupported_global(message: str) -> str | None:
    """The ``GLOBAL module.name`` torch's weights-only unpickler refused, or None when it refused no global
    (then the bytes were not a pickle of objects but garbage)."""
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if m:
        return f"GLOBAL {m.group(1)}"
    return "a pickled object" if "Unsupported global" in message else None


def unwrap_state_dict(obj: Mapping, keys: Iterable[str] = ("model", "module", "state_dict"),
                      path: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Return the first of ``obj[key]`` for ``key`` in ``keys`` that is a dict of tensors, else ``obj``."""
    for key in keys:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no weights: top-level keys are {sorted(obj)[:10]}; expected a state "
                              f"dict or one of {list(keys)} (a file with only optimizer state cannot be loaded)")
    return tensors


def require_keys(state: Mapping[str, torch.Tensor], keys: Iterable[str], family: str, path: str) -> None:
    """Raise a :class:`CheckpointError` naming the family if any marker key is absent."""
    missing = [k for k in keys if k not in state]
    if missing:
        sample = ", ".join(sorted(state)[:6])
        raise CheckpointError(f"{path} is not a {family} checkpoint: it lacks {missing[:3]} (its keys start "
                              f"with: {sample}). Use the converter of the family that produced it.")


def block_indices(state: Mapping[str, torch.Tensor], prefix: str) -> set[int]:
    """Indices ``N`` of the ``{prefix}.N.*`` keys in ``state`` (``prefix`` e.g. ``trunk.blocks``)."""
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return {int(m.group(1)) for k in state if (m := pat.match(k))}


def count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of ``{prefix}.N.`` blocks in ``state`` (highest index + 1; 0 if none)."""
    idx = block_indices(state, prefix)
    return max(idx) + 1 if idx else 0


def rename_keys(state: Mapping[str, torch.Tensor], rules: Iterable[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Apply regex substitutions ``(pattern, replacement)`` in order to every key."""
    import re

    compiled = [(re.compile(p), r) for p, r in rules]
    out = {}
    for k, v in state.items():
        for p, r in compiled:
            k = p.sub(r, k)
        out[k] = v
    return out


class Converter(NamedTuple):
    """How ``visar convert FAMILY`` reads a family's official files (registered as ``"converter"``)."""

    load_tokenizer: Callable[..., Any]
    load_generator: Callable[..., Any]
