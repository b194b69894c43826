"""Safe, atomic file IO: safetensors for weights, temp-file + rename for everything written."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Atomically save a flat tensor dict (shared storage is copied, tensors made contiguous)."""
    from safetensors.torch import save

    clean = {k: v.detach().cpu().contiguous().clone() if v.data_ptr() in _shared_ptrs(tensors) else v.detach().cpu().contiguous()
             for k, v in tensors.items()}
    atomic_write_bytes(path, save(clean, metadata=metadata))


def _shared_ptrs(tensors: dict[str, torch.Tensor]) -> set[int]:
    seen, shared = set(), set()
    for v in tensors.values():
        p = v.data_ptr()
        (shared if p in seen else seen).add(p)
    return shared


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
