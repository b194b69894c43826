"""Per-model evaluation protocols: what the official papers/READMEs sampled with, as data.

Each generator preset carries ``Preset.eval`` (written by the family's module, with its source). The
dicts mix *sampling options* (passed to ``generator.sample``: ``cfg_scale``, ``top_k``, ``num_steps``,
...) with *protocol facts* (``image_size``, the size FID is computed at, the label scheme, the number of
samples, the reported FID, the source). :func:`resolve_protocol` separates the two, normalises the
facts, merges user overrides and logs every departure from the protocol, e.g.
``departure: cfg_scale 2.0 (protocol 4.0)``.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("visar.eval")

#: keys of ``Preset.eval`` that describe the protocol rather than sampler arguments
META_KEYS = frozenset({
    "image_size", "image_size_eval", "resize", "labels", "num_samples", "num_images", "source", "dataset",
    "fid", "fid_reported", "reported_fid", "fid_without_cfg", "temperature_without_cfg", "weights",
    "tokenizer", "seed", "text_encoder", "notes", "reference", "evaluator", "baseline", "settings_source",
})
#: option names that mean the same thing in different families (user name -> family name)
#: the ADM reference batches FID is computed against for ImageNet
ADM_REFERENCES = {256: "VIRTUAL_imagenet256_labeled.npz", 512: "VIRTUAL_imagenet512.npz"}


@dataclass
class Protocol:
    """The evaluation protocol of one preset.

    Attributes:
        preset: preset name.
        options: sampling options passed to ``generate`` (after overrides, see :func:`resolve_protocol`).
        labels: ``"balanced"``, ``"random"`` or ``None`` when the source does not say.
        num_samples: images to sample (50000 for ImageNet FID).
        image_size: side of the generated images.
        resize: side the images are resized to before FID (``None``: no resize).
        reference: ADM reference batch the published FID was computed against.
        reported_fid: the published FID (``None`` if not recorded).
        source: where the settings come from.
        notes: every other fact of ``Preset.eval`` (tokenizer, weights file, FID without CFG, ...).
        departures: what the overrides changed, as ``"departure: name value (protocol value)"``.
    """

    preset: str
    options: dict
    labels: str | None = None
    num_samples: int = 50000
    image_size: int | None = None
    resize: int | None = None
    reference: str | None = None
    reported_fid: float | None = None
    source: str = ""
    notes: dict = field(default_factory=dict)
    departures: list = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _normalise_labels(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v).lower()
    if "random" in s or "uniform" in s:
        return "random"
    if "balanced" in s or re.search(r"\d+\s*per\s*class", s):
        return "balanced"
    raise ValueError(f"cannot read the label scheme {v!r} of a protocol; write 'balanced' or 'random'")


def _sampler_parameters(preset) -> tuple[set[str], bool]:
    """Option names of the preset family's default sampler (and ``False``: it takes no others)."""
    import importlib

    from visar.registry import get

    module, _, cls = preset.cls.partition(":")
    name = getattr(getattr(importlib.import_module(module), cls), "default_sampler", "")
    if not name:
        return set(), True
    return set(get("sampler", name).defaults), False


def split_eval_dict(eval_dict: dict, sampler_params: set[str] | None = None,
                    takes_kwargs: bool = True) -> tuple[dict, dict]:
    """``(sampling options, protocol facts)`` of a ``Preset.eval`` dict.

    A key is a sampling option if ``sample`` names it, or, for a ``sample(**options)``, if it is neither a
    known fact (:data:`META_KEYS`) nor free text (a string with spaces).
    """
    options, facts = {}, {}
    for k, v in eval_dict.items():
        if sampler_params is not None and k in sampler_params:
            options[k] = v
        elif (k not in META_KEYS and not (isinstance(v, str) and " " in v.strip())
              and (sampler_params is None or takes_kwargs)):
            options[k] = v
        else:
            facts[k] = v
    return options, facts


def _fmt(v: Any) -> str:
    return "not set" if v is None else repr(v) if isinstance(v, str) else str(v)


def resolve_protocol(name: str, overrides: dict | None = None, *, labels: str | None = None,
                     num_samples: int | None = None, resize: int | None | str = "protocol",
                     log_departures: bool = True) -> Protocol:
    """The protocol of preset ``name`` with ``overrides`` merged; every departure is logged.

    Args:
        name: a generator preset with an ``eval`` dict (``visar.list_models()``).
        overrides: sampling options that replace the protocol's (``{"cfg_scale": 2.0}``), in the shared
            vocabulary (an old name such as ``cfg`` fails naming ``cfg_scale``).
        labels, num_samples: replace the protocol's label scheme / sample count.
        resize: ``"protocol"`` keeps the protocol's; an int or ``None`` replaces it.
    """
    from visar import zoo

    preset = zoo.get_preset(name)
    if not preset.eval:
        raise ValueError(f"preset {name!r} has no evaluation protocol (Preset.eval is empty); sample with explicit "
                         "settings instead")
    params, takes_kwargs = _sampler_parameters(preset)
    options, facts = split_eval_dict(preset.eval, params, takes_kwargs)
    image_size = facts.get("image_size")
    eval_size = facts.get("image_size_eval", facts.get("resize"))
    proto = Protocol(
        preset=name, options=dict(options), labels=_normalise_labels(facts.get("labels")),
        num_samples=int(facts.get("num_samples", facts.get("num_images", 50000))), image_size=image_size,
        resize=eval_size if eval_size not in (None, image_size) else None,
        reported_fid=facts.get("fid_reported", facts.get("reported_fid", facts.get("fid"))),
        source=str(facts.get("source", preset.paper)),
        notes={k: v for k, v in facts.items() if k not in ("labels", "num_samples", "num_images", "image_size",
                                                           "image_size_eval", "resize", "source")})
    dataset = str(facts.get("dataset", "imagenet")).lower()
    if "imagenet" in dataset or "dataset" not in facts:
        proto.reference = ADM_REFERENCES.get(proto.resize or image_size)
    departures = []
    if overrides and params:
        from visar.samplers.options import check_option_names

        check_option_names(overrides, params, f"the {name} protocol's sampler")
    for key, v in (overrides or {}).items():
        old = proto.options.get(key)
        if old != v:
            departures.append(f"departure: {key} {_fmt(v)} (protocol {_fmt(old)})")
        proto.options[key] = v
    if labels is not None and labels != proto.labels:
        departures.append(f"departure: labels {_fmt(labels)} (protocol {_fmt(proto.labels)})")
        proto.labels = labels
    if num_samples is not None and num_samples != proto.num_samples:
        departures.append(f"departure: num_samples {num_samples} (protocol {proto.num_samples})")
        proto.num_samples = num_samples
    if resize != "protocol" and resize != proto.resize:
        departures.append(f"departure: resize {_fmt(resize)} (protocol {_fmt(proto.resize)})")
        proto.resize = resize
    proto.departures = departures
    if log_departures:
        for d in departures:
            log.warning("%s: %s", name, d)
    return proto


def list_protocols(pattern: str = "*") -> dict[str, Protocol]:
    """Protocols of every preset matching ``pattern`` that has one (tiny test presets included)."""
    from visar import zoo

    out = {}
    for name in zoo.list_models(pattern):
        if name in zoo.BUNDLED:
            continue
        preset = zoo.get_preset(name)
        if preset.kind == "generator" and preset.eval:
            out[name] = resolve_protocol(name, log_departures=False)
    return out
