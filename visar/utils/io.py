"""Safe, atomic file IO: safetensors for weights, temp-file + rename for everything written.

Every file appears whole or not at all (a temporary file in the same folder, then ``os.replace``) and
gets the mode an ordinary ``open()`` would give it (``0o666`` less the umask, e.g. ``0644``), not the
``0600`` of a temporary file, so a model folder on a shared volume stays readable by the team.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

import torch


def _umask() -> int:
    """The process umask, read without changing it where Linux exposes it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # portable fallback: read by setting, then restore
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """Mode of a new regular file: ``0o666 & ~umask`` (``0o644`` under the usual umask 022)."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, fsync: bool = True) -> Iterator[BinaryIO]:
    """``with atomic_file(path) as f: f.write(...)``: write to a temporary file next to ``path``, then
    give it the default file mode and ``os.replace`` it onto ``path``. On any error (or a kill) ``path``
    keeps its old content and the temporary file is removed (a kill may leave a ``.NAME.*.tmp``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    with atomic_file(path) as f:
        f.write(data)


def default_dir_mode() -> int:
    """Mode of a new folder: ``0o777 & ~umask`` (``0o755`` under the usual umask 022)."""
    return 0o777 & ~_umask()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_dir(folder) as tmp: <write files into tmp>``: the folder ``path`` appears whole.

    The files are written into a temporary folder next to ``path`` (``.NAME.*.tmp``); on success it gets
    the default folder mode (``0755`` under umask 022, not the ``0700`` of a temporary folder) and takes
    the place of ``path``: an existing ``path`` is first renamed aside, then removed, so a reader sees the
    old folder or the new one (a kill between the two renames leaves the old one as ``.NAME.*.old``). On
    any error ``path`` is left as it was and the temporary folder is removed.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; a folder is to be written there")
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, default_dir_mode())
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------ safetensors
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code


#: the order in which safetensors lays out dtypes (widest first; then by name), so files match its own
_ST_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2", "I8",
             "U8", "BOOL")


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of one tensor (made contiguous on the CPU: one tensor's memory at a time)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Atomically save a flat ``{name: tensor}`` dict in the safetensors format, streaming.

    The header is written first, then each tensor's bytes in turn, straight into the temporary file:
    memory beyond the tensors themselves is one tensor's CPU copy (at most), not the whole file (a 3B
    model in float32 would otherwise need 12 GB more). Tensors that share storage are written once each
    under their own names, as ``safetensors.torch.save`` requires of clones. The layout (tensors sorted
    by dtype, widest first, then name; header padded to 8 bytes) is the one ``safetensors`` writes itself:
    the bytes equal ``safetensors.torch.save``'s for the same tensors.
    """
    if not isinstance(tensors, dict) or not all(isinstance(k, str) for k in tensors):
        raise TypeError("tensors must be a dict {name (str): torch.Tensor}")
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"tensors[{k!r}] is a {type(v).__name__}, not a torch.Tensor")
        if v.dtype not in _ST_DTYPES:
            raise TypeError(f"tensors[{k!r}] has dtype {v.dtype}, which safetensors cannot store")
        if v.is_sparse:
            raise TypeError(f"tensors[{k!r}] is sparse; save its dense form")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata must map str to str")
    order = sorted(tensors, key=lambda k: (_ST_ORDER.index(_ST_DTYPES[tensors[k].dtype]), k))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for k in order:
        t = tensors[k]
        size = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for k in order:
            f.write(_tensor_bytes(tensors[k]))


def load_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a .safetensors weights file")
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e


# ------------------------------------------------------------------------------------------ where files go
def package_root() -> Path:
    """The folder of the installed ``visar`` package (nothing a user runs writes inside it)."""
    return Path(__file__).resolve().parents[1]


def inside_package(path: str | os.PathLike) -> bool:
    """Whether ``path`` (existing or not) lies inside the installed ``visar`` package."""
    p = Path(path).expanduser().resolve()
    root = package_root()
    return p == root or root in p.parents


def check_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Fail early (``ValueError`` naming ``what``) if a folder cannot be created or written at ``path``.

    Nothing is created: the nearest existing ancestor must be a writable folder (checked with
    ``os.access`` and, since ``os.access`` says yes to root everywhere, by its type). Returns ``path``.
    """
    p = Path(path).expanduser()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"{what} {p} cannot be created: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {p} is not writable (no write permission on {probe}); choose another place")
    return p
