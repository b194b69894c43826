"""Per call, choose between an op's fused Triton kernel and its PyTorch reference.

Every op in :mod:`visar.ops` has a PyTorch **reference** (the exact sequence of torch operations the
building blocks ran before the op existed, so CPU results are unchanged bit for bit) and a **Triton
kernel** (one launch; float32 arithmetic for float32 and bfloat16 inputs). :func:`use_kernel` picks one per
call from the mode:

* ``"auto"`` (default): the kernel when every tensor is on CUDA and Triton imports, the reference otherwise;
* ``"reference"``: always the reference (``VISAR_KERNELS=0``);
* ``"kernel"``: always the kernel, CPU tensors included (``VISAR_KERNELS=kernel``); CPU tensors need
  Triton's interpreter (``TRITON_INTERPRET=1`` in the environment before the first kernel is used). Tests
  use it.

In every mode the reference runs when autograd would need a backward pass (a tensor requires grad and grad
mode is on: the kernels are forward-only) and while ``torch.compile`` traces (Inductor fuses the reference
itself). The mode comes from the environment variable ``VISAR_KERNELS`` (``auto``/``1``, ``reference``/``0``,
``kernel``/``force``) read at import, and can be changed with :func:`set_kernel_mode` or the
:func:`kernel_mode_set` context manager.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
from types import ModuleType
from typing import Iterator

import torch

#: environment variable naming the mode
ENV = "VISAR_KERNELS"
#: the modes
MODES = ("auto", "reference", "kernel")
_ALIASES = {"": "auto", "auto": "auto", "1": "auto", "on": "auto", "true": "auto",
            "reference": "reference", "0": "reference", "off": "reference", "false": "reference",
            "kernel": "kernel", "force": "kernel"}


def _parse(value: str, where: str) -> str:
    mode = _ALIASES.get(str(value).strip().lower())
    if mode is None:
        raise ValueError(f"{where} must be one of auto (or 1), reference (or 0), kernel (or force); got {value!r}")
    return mode


_STATE = {"mode": _parse(os.environ.get(ENV, "auto"), f"the environment variable {ENV}")}


def kernel_mode() -> str:
    """The current mode: ``"auto"``, ``"reference"`` or ``"kernel"``."""
    return _STATE["mode"]


def set_kernel_mode(mode: str) -> str:
    """Set the mode (``"auto"``, ``"reference"``, ``"kernel"`` or an alias of :data:`ENV`); returns the previous one."""
    previous, _STATE["mode"] = _STATE["mode"], _parse(mode, "mode")
    return previous


@contextlib.contextmanager
def kernel_mode_set(mode: str) -> Iterator[None]:
    """``with kernel_mode_set("reference"): ...`` runs the block in ``mode`` and restores the previous mode."""
    previous = set_kernel_mode(mode)
    try:
        yield
    finally:
        _STATE["mode"] = previous


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether ``triton`` and ``triton.language`` import."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


def interpreting() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def use_kernel(*tensors: torch.Tensor | None) -> bool:
    """Whether an op called on ``tensors`` (``None`` entries ignored) runs its Triton kernel (module docstring)."""
    mode = _STATE["mode"]
    if mode == "reference":
        return False
    present = [t for t in tensors if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    if _compiling():
        return False
    if mode == "kernel":
        if not triton_available():
            raise RuntimeError(f"{ENV}=kernel (or set_kernel_mode('kernel')) asks for the Triton kernels, but triton "
                               "does not import; install triton or use the mode 'auto'")
        if any(not t.is_cuda for t in present) and not interpreting():
            raise RuntimeError(f"{ENV}=kernel with CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 in "
                               "the environment before the first kernel is used (or use the mode 'auto')")
        return True
    return bool(present) and all(t.is_cuda for t in present) and triton_available()


def kernels(name: str) -> ModuleType:
    """The Triton module ``visar.ops.kernels.<name>`` (imported on first use, so ``import visar`` never imports
    triton, and ``TRITON_INTERPRET`` is read when the kernels are first defined)."""
    return importlib.import_module(f"visar.ops.kernels.{name}")


def next_power_of_2(n: int) -> int:
    """Smallest power of two ``>= max(n, 1)``."""
    return 1 << max(int(n) - 1, 0).bit_length()


__all__ = ["ENV", "MODES", "kernel_mode", "set_kernel_mode", "kernel_mode_set", "triton_available", "interpreting",
           "use_kernel", "kernels", "next_power_of_2"]
