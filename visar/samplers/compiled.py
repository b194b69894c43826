"""Compiled sampler steps (the ``compile=True`` option): ``torch.compile`` of a family's per-step function.

The sampling loop, every random draw and every data-dependent choice stay eager; only a step's network
pass is compiled, over fixed shapes (``dynamic=False``), so seeded runs draw the same random numbers:

==================  ===================================================  =====================================
sampler             compiled                                             graphs (per model, dtype, device)
==================  ===================================================  =====================================
autoregressive      ``decode_step`` over the whole static KV cache       one per row count
coarse_to_fine      the coarse stage's ``decode_step`` (as above)        one per row count
continuous_ar       ``decode_step`` and the token head's network          one each per row count
next_scale (VAR)    the cached per-scale step ``forward_scale``          one per scale
flow_map_scale      VAR's per-scale step, as ``next_scale``              one per scale
next_scale_flow     the flow head's velocity (``head_velocity``)         one per scale
next_x (xAR)        the transformer call of ``velocity``                 two per entity (its first call also
                                                                         writes the previous entity)
masked (MAR)        the diffusion head's network, rows padded to the     one (the largest iteration's rows)
                    largest iteration of the schedule
==================  ===================================================  =====================================

MAR's transformer pass stays eager: its encoder runs on the visible tokens only, a length that changes at
every iteration (one graph per iteration, or a padded encoder with a key mask, which is a model change).

Backend: inductor, ``mode="reduce-overhead"`` (CUDA graphs) on CUDA, inductor's C++ CPU backend (a C++
compiler on ``PATH``) on the CPU. :func:`check_compile_support` raises a clear error where neither works.
On CUDA the outputs of a step are cloned (a graph replay overwrites its outputs); whether inductor records
CUDA graphs for steps that write a KV cache passed as an argument has not been checked on a GPU.

Cache: compiled functions live in a table weakly keyed by the module they belong to (the generator, or its
head network), under the step's name, the signature of its arguments (shapes, strides, dtypes and devices of
the tensors, values of the other arguments), the parameters' dtypes and devices, the backend and mode, and
the grad / inference / autocast state. A second sample with the same settings reuses them; they go when the
module is garbage-collected. Every entry compiles a fresh copy of the function's code object, so dynamo's
per-code cache (and its recompile limit of 8) holds one graph per entry: VAR's 10 scales, or several models
of one class, never reach the limit and fall back to eager.

Time: the first call of each new entry is timed (wall clock: inductor compiles in child processes) and
logged as ``compiling <what> (first call)...``; :attr:`StepCompiler.stats` gives ``compile_s`` (seconds of
those first calls, one execution of the step included) and ``compiled_graphs`` (entries created).
"""
from __future__ import annotations

import contextlib
import logging
import time
import types
import weakref
from dataclasses import fields, is_dataclass
from typing import Any, Callable, Iterator

import torch

log = logging.getLogger(__name__)

#: private test hook (:func:`_use_backend`): a ``torch.compile`` backend used instead of inductor, e.g.
#: ``"eager"`` (dynamo traces the step, nothing is code-generated); ``None`` = inductor
_BACKEND: str | None = None

#: compiled entries per module: ``{module: {key: callable(module, *args, **kwargs)}}``
_TABLE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _use_backend(backend: str | None) -> Iterator[None]:
    """Private test hook: compile with ``backend`` (e.g. ``"eager"``) inside the block."""
    global _BACKEND
    old, _BACKEND = _BACKEND, backend
    try:
        yield
    finally:
        _BACKEND = old


def check_compile_support(device: torch.device | str) -> None:
    """Raise a ``RuntimeError`` naming what is missing when ``compile=True`` cannot run on ``device``:
    torch < 2 (no ``torch.compile``), no C++ compiler for inductor's CPU backend, no Triton on CUDA."""
    major = str(torch.__version__).split(".")[0]
    if not major.isdigit() or int(major) < 2 or not hasattr(torch, "compile"):
        raise RuntimeError(f"compile=True needs torch >= 2.0 (torch.compile); this is torch {torch.__version__}. "
                           "Upgrade torch, or sample with compile=False")
    if _BACKEND is not None:
        return
    dev = torch.device(device)
    if dev.type == "cpu":
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except Exception as e:  # InvalidCxxCompiler, or a failed probe
            raise RuntimeError("compile=True on the CPU needs a C++ compiler for torch.compile's inductor backend "
                               "(g++ or clang++ on PATH, or set CXX); none was found. Install one (e.g. apt-get "
                               "install g++) or sample with compile=False") from e
    elif dev.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise RuntimeError("compile=True on CUDA needs Triton (pip install triton); sample with compile=False "
                               "without it")
    else:
        raise RuntimeError(f"compile=True supports CPU and CUDA devices, not {dev.type!r}; sample with compile=False")


def signature(obj: Any, memo: dict | None = None) -> Any:
    """A hashable description of an argument: what ``torch.compile`` with ``dynamic=False`` specialises on.

    Tensors: shape, stride, dtype, device; modules: their buffers; dataclasses, lists, tuples, dicts: their
    items; ``None``, bools, numbers and strings: their values; anything else: its type and identity.
    ``memo`` (``{id: (module, signature)}``) describes each module once (a KV cache keeps its buffers'
    shapes while it is filled; the memo holds the module, so its id is not reused)."""
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), obj.stride(), obj.dtype, str(obj.device))
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return (type(obj).__name__, obj)
    if isinstance(obj, torch.nn.Module):
        if memo is not None and id(obj) in memo:
            return memo[id(obj)][1]
        sig = (type(obj).__qualname__, tuple((n, signature(b)) for n, b in obj.named_buffers()))
        if memo is not None:
            memo[id(obj)] = (obj, sig)
        return sig
    if is_dataclass(obj) and not isinstance(obj, type):
        return (type(obj).__qualname__, tuple((f.name, signature(getattr(obj, f.name), memo)) for f in fields(obj)))
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(signature(x, memo) for x in obj))
    if isinstance(obj, dict):
        return ("dict", tuple((k, signature(v, memo)) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))))
    return (type(obj).__qualname__, id(obj))


def _fresh_copy(fn: Callable) -> Callable:
    """``fn`` with its own code object, so dynamo's cache of it is not shared with any other entry."""
    fn = getattr(fn, "__func__", fn)
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    return copy


def _clone_tensors(out: Any) -> Any:
    """Clone the tensors of a CUDA-graph output (a later replay would overwrite them)."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (list, tuple)):
        return type(out)(_clone_tensors(x) for x in out)
    return out


def _pad_rows(x: Any, rows: int) -> Any:
    """A tensor with zero rows appended up to ``rows`` (dim 0), contiguous either way (one stride per shape)."""
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        if x.shape[0] < rows:
            return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])
        return x.contiguous()
    return x


class StepCompiler:
    """The compiled steps of one sampler call: builds (or reuses) entries and counts the compile time.

    Args:
        device: where the model runs (picks the mode; checked by :func:`check_compile_support`).
        progress: announce compiles with ``tqdm.write`` (a bar is shown) instead of the log.
    """

    def __init__(self, device: torch.device | str, progress: bool = False):
        t0 = time.perf_counter()
        check_compile_support(device)  # imports inductor and probes the compiler on first use
        self._setup_s = time.perf_counter() - t0
        self.device = torch.device(device)
        self.backend = _BACKEND or "inductor"
        self.mode = "reduce-overhead" if self.device.type == "cuda" and self.backend == "inductor" else None
        self.progress = progress
        #: wall seconds of the first calls of entries created in this call (compilation dominates)
        self.compile_s = 0.0
        #: entries (graphs) created in this call
        self.graphs = 0

    @property
    def stats(self) -> dict[str, Any]:
        """``{"compile_s": float, "compiled_graphs": int}`` for the sampler's ``stats`` (``compile_s`` is 0 when
        every graph came from the cache; otherwise it includes the compiler check of this call)."""
        return {"compile_s": self.compile_s, "compiled_graphs": self.graphs}

    def _global_state(self) -> tuple:
        """What dynamo also guards on: grad and inference mode, autocast on the device and its dtype."""
        kind = self.device.type
        autocast = torch.is_autocast_enabled(kind)
        return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast,
                torch.get_autocast_dtype(kind) if autocast else None)

    def _announce(self, what: str) -> None:
        msg = f"compiling {what} (first call)..."
        if self.progress:
            from tqdm.auto import tqdm

            tqdm.write(msg)
        else:
            log.info(msg)

    def function(self, owner: Any, fn: Callable, what: str, pad_rows: int | None = None) -> Callable:
        """``fn(owner, *args, **kwargs)`` compiled: returns ``call(*args, **kwargs)``.

        Args:
            owner: the module ``fn`` runs on (its first argument); the cache is kept per owner.
            fn: an unbound function, e.g. ``type(model).decode_step``.
            what: what the step is, for the compile message (``"decode step"``).
            pad_rows: pad every tensor argument with zero rows (dim 0) up to this many, and cut the output
                back (row-wise functions only: a token head); one graph for every row count up to it.
        """
        # the owner's parameters (dtype, device) are part of every key: model.to(...) gets new graphs
        params = tuple(sorted({(str(p.dtype), str(p.device)) for p in owner.parameters()})) \
            if isinstance(owner, torch.nn.Module) else ()
        memo: dict = {}  # modules among the arguments (a KV cache) are described once per sampler call

        def call(*args: Any, **kwargs: Any) -> Any:
            n = None
            if pad_rows is not None:
                n = args[0].shape[0]
                rows = max(pad_rows, n)
                args = tuple(_pad_rows(a, rows) for a in args)
                kwargs = {k: _pad_rows(v, rows) for k, v in kwargs.items()}
            key = (fn.__qualname__, params, signature(args, memo), signature(kwargs, memo), self.backend, self.mode,
                   self._global_state())
            table = _TABLE.setdefault(owner, {})
            entry = table.get(key)
            if self.mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            if entry is None:  # a new graph: compiled by its first call, which is timed
                shapes = ", ".join(str(list(a.shape)) for a in args if isinstance(a, torch.Tensor))
                self._announce(f"{what} for inputs {shapes}" if shapes else what)
                t0 = time.perf_counter()
                entry = torch.compile(_fresh_copy(fn), backend=self.backend, mode=self.mode, dynamic=False,
                                      fullgraph=True)
                out = entry(owner, *args, **kwargs)
                table[key] = entry
                self.compile_s += time.perf_counter() - t0 + self._setup_s
                self._setup_s = 0.0  # counted once, with the first graph of the call
                self.graphs += 1
            else:
                out = entry(owner, *args, **kwargs)
            if self.mode == "reduce-overhead":
                out = _clone_tensors(out)
            return out if n is None else out[:n]

        return call

    @contextlib.contextmanager
    def patch(self, owner: Any, attr: str, what: str, pad_rows: int | None = None) -> Iterator[None]:
        """Inside the block, ``owner.<attr>(...)`` (a method of its class, e.g. a head network's ``forward``)
        runs compiled (:meth:`function`); the instance is restored on exit, even after an error."""
        if attr in vars(owner):
            raise RuntimeError(f"cannot compile {type(owner).__name__}.{attr}: the instance already replaces it "
                               "(a hook or another compiled sampler); sample with compile=False")
        object.__setattr__(owner, attr, self.function(owner, getattr(type(owner), attr), what, pad_rows))
        try:
            yield
        finally:
            object.__delattr__(owner, attr)


def head_network(head: Any) -> torch.nn.Module:
    """The network of a token head (``head.net``, the row-wise MLP every head step runs), which
    ``compile=True`` compiles; a ``TypeError`` for a head without one."""
    net = getattr(head, "net", None)
    if not isinstance(net, torch.nn.Module):
        raise TypeError(f"compile=True compiles the token head's network (its net module); {type(head).__name__} "
                        "has none: sample with compile=False")
    return net


def compiled_entries(owner: Any) -> int:
    """How many compiled entries ``owner`` holds (tests and diagnostics)."""
    return len(_TABLE.get(owner, {}))


__all__ = ["StepCompiler", "check_compile_support", "signature", "head_network", "compiled_entries"]
