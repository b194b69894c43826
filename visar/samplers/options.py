"""The sampling option vocabulary shared by every sampler, the Pipeline and the CLI.

One name per knob and one meaning across families (table in ``docs/architecture.md``):

============== =============================================================================
``cfg_scale``  guidance ``u + s (c - u)``; **1 = no guidance** (no unconditional rows are run)
``cfg_schedule`` ``"constant"`` or ``"linear"`` (ramp ``1 + (s - 1) f`` over the fraction done)
``cfg_interval`` LlamaGen: guide tokens up to this decode step only (-1 = every token)
``temperature`` ``> 0``; divides logits (discrete) or scales the head's noise (continuous)
``top_k``      ``>= 0``; 0 disables
``top_p``      in ``(0, 1]``; 1 disables
``num_steps``  denoising / ODE / SDE steps of a token head, per token, scale or entity
``num_iter``   masked (MAR) generation iterations
``progress``   show a tqdm bar (by step)
``compile``    ``torch.compile`` the per-step function (:mod:`visar.samplers.compiled`); the first
               call of each shape compiles (``stats["compile_s"]``)
``fast_linear`` CPU float32: linear layers over 2-7 rows as ``mm(W, x^T)`` (:mod:`visar.ops.linear`);
               every sampler takes it; off by default (last-bit differences, ~2e-6 relative)
============== =============================================================================

Old or family-specific spellings fail with a message naming the right one (:data:`RENAMED`). Other
libraries' names are accepted as aliases (:data:`ALIASES`: diffusers' ``guidance_scale`` is ``cfg_scale``).
"""
from __future__ import annotations

import difflib
import math
from typing import Iterable

#: options that were spelled differently before one vocabulary existed -> their name now
RENAMED = {
    "cfg": "cfg_scale",
    "guidance": "cfg_scale",
    "num_sampling_steps": "num_steps",
    "sampling_steps": "num_steps",
    "steps": "num_steps",
    "topk": "top_k",
    "topp": "top_p",
    "temp": "temperature",
}

#: other libraries' names of an option, accepted as that option (``guidance_scale``: diffusers' name of
#: ``cfg_scale``, same meaning: 1 = no guidance); :func:`apply_aliases` maps them
ALIASES = {"guidance_scale": "cfg_scale"}

#: options every sampler takes (handled by :class:`visar.samplers.base.Sampler` around its run) -> default
UNIVERSAL = {"fast_linear": False}

#: one-line meanings, for help texts and error messages
MEANINGS = {
    "cfg_scale": "guidance scale s in u + s (c - u); 1 disables guidance",
    "cfg_schedule": "'constant' or 'linear' (ramp 1 + (s - 1) f over the fraction of the image done)",
    "cfg_interval": "LlamaGen: guide decode steps <= this index only (-1: every token)",
    "temperature": "> 0; divides logits (discrete) or scales the head noise (continuous)",
    "top_k": "keep the k most likely tokens (0 disables)",
    "top_p": "nucleus filter in (0, 1] (1 disables)",
    "num_steps": "denoising / ODE / SDE steps of the token head per token, scale or entity",
    "num_iter": "masked generation iterations (MAR)",
    "progress": "show a progress bar",
    "compile": "torch.compile the per-step function over fixed shapes (CUDA graphs on CUDA); the first call "
               "compiles (tens of seconds per graph on a CPU), later calls with the same shapes reuse it",
    "fast_linear": "CPU float32: compute linear layers over 2-7 rows (batch 1-3 with guidance) as mm(W, x^T), "
                   "faster there; results differ in the last bits (~2e-6 relative) from the default",
}

#: options only some samplers take -> why the others refuse them
NOT_EVERYWHERE = {
    "compile": "the compile option is not supported by {where}: only the families' default samplers "
               "(autoregressive, coarse_to_fine, continuous_ar, next_scale, next_scale_flow, next_x, masked) "
               "and flow_map_scale compile their step (docs/compile.md)",
}


def check_option_names(given: Iterable[str], accepted: Iterable[str], where: str) -> None:
    """Raise a ``TypeError`` for names ``where`` does not take, naming the right spelling."""
    accepted = set(accepted)
    for name in given:
        if name in accepted:
            continue
        if name in NOT_EVERYWHERE:
            raise TypeError(NOT_EVERYWHERE[name].format(where=where))
        if name in RENAMED:
            new = RENAMED[name]
            if new in accepted:
                raise TypeError(f"{where}: option {name!r} is now called {new!r}")
            raise TypeError(f"{where} has no option {name!r} (the old name of {new!r}, which it does not take "
                            f"either). It takes: {', '.join(sorted(accepted))}")
        close = difflib.get_close_matches(name, sorted(accepted), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"{where} has no option {name!r}{hint} It takes: {', '.join(sorted(accepted))}")


def apply_aliases(options: dict, where: str = "sampling", accepted: Iterable[str] = ()) -> dict:
    """``options`` with every alias of :data:`ALIASES` renamed to its option (a new dict; the input is kept).

    Giving an alias and its option with different values is an error (a ``TypeError`` naming both); with
    equal values the alias is dropped. A name in ``accepted`` (what ``where`` itself takes) is left alone.
    """
    accepted = set(accepted)
    out = dict(options)
    for alias, name in ALIASES.items():
        if alias not in out or alias in accepted:
            continue
        value = out.pop(alias)
        if name in out and out[name] != value:
            raise TypeError(f"{where}: {alias}={value!r} and {name}={out[name]!r} name the same option "
                            f"({alias} is diffusers' name of {name}); give one of them")
        out[name] = value
    return out


def _number(name: str, value, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_cfg_scale(value) -> float:
    if _number("cfg_scale", value) < 0:
        raise ValueError(f"cfg_scale must be >= 0 (1 disables guidance), got {value}")
    return float(value)


def check_temperature(value) -> float:
    if _number("temperature", value) <= 0:
        raise ValueError(f"temperature must be > 0, got {value}; use top_k=1 for greedy decoding")
    return float(value)


def check_top_k(value) -> int:
    if _number("top_k", value, integer=True) < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {value}")
    return int(value)


def check_top_p(value) -> float:
    if not 0 < _number("top_p", value) <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {value}")
    return float(value)


def check_positive_int(name: str, value, low: int = 1, high: int | None = None) -> int:
    _number(name, value, integer=True)
    if value < low or (high is not None and value > high):
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {rng}, got {value}")
    return int(value)


def check_choice(name: str, value, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_flag(name: str, value) -> bool:
    """A boolean option (``compile``, ``progress``): exactly ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_common(options: dict) -> None:
    """Validate the shared knobs present in ``options`` (others are the sampler's business)."""
    checks = {"cfg_scale": check_cfg_scale, "temperature": check_temperature, "top_k": check_top_k,
              "top_p": check_top_p, "cfg_schedule": lambda v: check_choice("cfg_schedule", v, ("constant", "linear")),
              "compile": lambda v: check_flag("compile", v), "fast_linear": lambda v: check_flag("fast_linear", v)}
    for name, fn in checks.items():
        if name in options and options[name] is not None:
            fn(options[name])


__all__ = ["RENAMED", "ALIASES", "UNIVERSAL", "MEANINGS", "NOT_EVERYWHERE", "apply_aliases", "check_option_names",
           "check_cfg_scale", "check_temperature", "check_top_k", "check_top_p", "check_positive_int", "check_choice",
           "check_flag", "check_common"]
