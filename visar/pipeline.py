"""Pipeline: tokenizer + generator + sampler (+ text encoder) -> PIL images. What users call.

``Pipeline(tokenizer, generator, sampler=None)``: the sampler is a :class:`~visar.samplers.base.Sampler`
object or a registered name (``None``: the generator family's default sampler, which reproduces the
official sampling). ``pipe(class_ids, seed=0, sampler=..., **options)`` may swap it for one call.
Options resolve as: the call's, then the pipeline's ``sampling_defaults``, then the sampler's own.

Text-to-image: ``Pipeline(tokenizer, generator, text_encoder=encoder)`` with a text-conditional generator
and a :class:`~visar.text.base.TextEncoder` of its caption width; ``pipe(prompts=["a red circle"], seed=0,
cfg_scale=4.0)``. The encoder is saved with the pipeline as the component folder ``text_encoder/``
(named in ``pipeline.json``).
"""
from __future__ import annotations

import json
import numbers
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from visar.conditions import Condition
from visar.generators.base import Generator
from visar.samplers.base import Sampler, default_sampler, get_sampler
from visar.tokenizers.base import Tokenizer
from visar.utils.images import to_pil, to_uint8  # noqa: F401  (to_uint8 re-exported)
from visar.utils.io import atomic_write_bytes


#: version 2: one sampling vocabulary (``cfg_scale`` 1 = no guidance everywhere, ``top_p`` 1 disables)
PIPELINE_VERSION = 2
#: component folder of a text-to-image pipeline's text encoder
TEXT_ENCODER_DIR = "text_encoder"


def check_text_encoder(text_encoder: Any, generator: Generator) -> None:
    """A text encoder must be a :class:`~visar.text.base.TextEncoder` whose features fit the generator:
    width ``dim == caption_dim`` and ``max_length <= cls_token_num`` caption tokens."""
    if text_encoder is None:
        return
    from visar.text.base import TextEncoder

    if not isinstance(text_encoder, TextEncoder):
        raise TypeError(f"text_encoder must be a visar TextEncoder (visar.text), got {type(text_encoder).__name__}")
    if not getattr(generator, "text_conditional", False):
        raise ValueError(f"a text encoder was given but {type(generator).__name__} is class-conditional; text-to-image "
                         "needs a text-conditional generator (e.g. LlamaGen with caption_dim=...)")
    dim, tokens = getattr(generator, "caption_dim", None), getattr(generator, "cls_token_num", None)
    if text_encoder.dim != dim:
        raise ValueError(f"the {text_encoder.kind} text encoder gives {text_encoder.dim}-d features but the generator "
                         f"reads {dim}-d captions (caption_dim); pair the generator with the encoder it was trained on")
    if tokens is not None and text_encoder.max_length > tokens:
        raise ValueError(f"the text encoder's max_length={text_encoder.max_length} exceeds the generator's "
                         f"{tokens} caption tokens (cls_token_num); build the encoder with max_length <= {tokens}")


def migrate_sampling_defaults(defaults: dict | None, version: int, family: str) -> dict:
    """Stored sampling defaults of a version-1 folder in today's vocabulary.

    Version 1 spelled MAR's options ``cfg`` / ``num_sampling_steps`` and VAR's guidance as its official
    ``cfg`` (``t`` ramping to ``cfg``, 0 = none) with ``top_p=0`` disabling the filter; version 2 has one
    ``cfg_scale`` (1 = none; VAR's ``cfg_scale = 1 + cfg``) and ``top_p=1`` disabling.
    """
    out = dict(defaults or {})
    if version >= 2:
        return out
    for old, new in (("cfg", "cfg_scale"), ("num_sampling_steps", "num_steps")):
        if old in out and new not in out:
            out[new] = out.pop(old)
    if family == "var":
        if "cfg_scale" in out:
            out["cfg_scale"] = 1.0 + float(out["cfg_scale"])
        if out.get("top_p") == 0:
            out["top_p"] = 1.0
    return out


class Pipeline:
    """A tokenizer, a generator that models its tokens, and the sampler that draws them.

    ``pipe(class_ids, seed=0, sampler=None, **sampling_options) -> list[PIL.Image]``; the options are
    the sampler's (``cfg_scale``, ``temperature``, ``top_k``, ``top_p``, ``num_steps``, ... see
    ``docs/architecture.md`` for the shared vocabulary).

    Args:
        tokenizer: a :class:`~visar.tokenizers.base.Tokenizer`.
        generator: a :class:`~visar.generators.base.Generator` of the tokenizer's token kind.
        sampler: a :class:`~visar.samplers.base.Sampler`, a registered sampler name, or ``None`` for the
            generator's default sampler.
        text_encoder: caption encoder of text-to-image pipelines (a :class:`~visar.text.base.TextEncoder`
            whose ``dim`` is the generator's ``caption_dim`` and whose ``max_length`` fits its caption tokens).
        sampling_defaults: options used when the caller does not give them (e.g. the cfg a model was
            tuned for); saved with the pipeline.
    """

    def __init__(self, tokenizer: Tokenizer, generator: Generator, sampler: "Sampler | str | None" = None,
                 text_encoder: Any = None, sampling_defaults: dict | None = None):
        if not isinstance(tokenizer, Tokenizer):
            hint = " (the arguments are Pipeline(tokenizer, generator))" if isinstance(tokenizer, Generator) else ""
            raise TypeError(f"tokenizer must be a visar Tokenizer, got {type(tokenizer).__name__}{hint}")
        if not isinstance(generator, Generator):
            raise TypeError(f"generator must be a visar Generator, got {type(generator).__name__}")
        generator.check_tokenizer(tokenizer)
        check_text_encoder(text_encoder, generator)
        self.tokenizer, self.generator, self.text_encoder = tokenizer.eval(), generator.eval(), text_encoder
        self.sampler = default_sampler(generator) if sampler is None else get_sampler(sampler)
        self.sampler.check_model(generator)
        #: sampling options used when the caller does not give them (e.g. the cfg a model was tuned for)
        self.sampling_defaults = dict(sampling_defaults or {})

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Pipeline":
        self.tokenizer.to(device=device, dtype=dtype)
        self.generator.to(device=device, dtype=dtype)
        if self.text_encoder is not None and device is not None:
            self.text_encoder.to(device=device)  # keeps its own dtype; its features are float32
        return self

    @property
    def text_conditional(self) -> bool:
        """Whether the generator draws from caption features (``pipe(prompts=[...])``) instead of class ids."""
        return bool(getattr(self.generator, "text_conditional", False))

    def condition(self, class_ids: Any = None, prompts: Sequence[str] | None = None) -> Condition:
        """The generator's condition: class ids, or the text encoder's features of ``prompts`` (a ready
        :class:`Condition` given as ``class_ids`` passes through)."""
        if prompts is not None and class_ids is not None:
            raise ValueError("give class_ids or prompts, not both")
        if prompts is not None:
            if not self.text_conditional:
                raise ValueError(f"this pipeline's generator is class-conditional ({self.generator.num_classes} "
                                 "classes): give class ids, e.g. pipe([0, 3]); prompts need a text-to-image "
                                 "pipeline (a text-conditional generator and a text encoder, see "
                                 "docs/text_to_image.md)")
            if self.text_encoder is None:
                raise ValueError("this text-to-image pipeline has no text encoder: build it with Pipeline(tokenizer, "
                                 "generator, text_encoder=...) or pass caption features as Condition(text=..., "
                                 "text_mask=...)")
            return self.text_encoder(prompts)
        if class_ids is None:
            raise ValueError("give prompts=[...] (this is a text-to-image pipeline)" if self.text_conditional else
                             "give class ids, e.g. pipe([0, 3])")
        if isinstance(class_ids, Condition):
            return class_ids
        if self.text_conditional:
            raise ValueError(f"this pipeline's generator is text-conditional: give prompts=[...] instead of class ids "
                             f"(got {class_ids!r:.60})")
        return Condition.of(class_ids, "class_ids")

    def resolve_sampler(self, sampler: "Sampler | str | None" = None) -> Sampler:
        """The sampler a call uses: ``sampler`` if given (object or registered name), else the pipeline's."""
        if sampler is None:
            return self.sampler
        s = get_sampler(sampler)
        s.check_model(self.generator)
        return s

    def options_for(self, sampler: Sampler, options: dict) -> dict:
        """The call's options over the stored ``sampling_defaults`` (only those the sampler takes, so a
        default tuned for the family's sampler does not break a swapped-in one)."""
        stored = {k: v for k, v in self.sampling_defaults.items() if k in sampler.defaults}
        return {**stored, **options}

    @torch.inference_mode()
    def generate(self, class_ids: Any = None, prompts: Sequence[str] | None = None, seed: int | None = 0,
                 generator: torch.Generator | None = None, sampler: "Sampler | str | None" = None,
                 **options) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` (clamped), drawn by ``sampler`` (default: the pipeline's)."""
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed must be an int (or None to use generator=), got {type(seed).__name__} {seed!r}")
        s = self.resolve_sampler(sampler)
        cond = self.condition(class_ids, prompts).to(self.device)
        self.generator.check_condition(cond)
        if generator is None and seed is not None:
            generator = torch.Generator(self.device).manual_seed(int(seed))
        tokens = s(self.generator, cond, generator, **self.options_for(s, options))
        return self.tokenizer.decode(tokens).clamp(-1, 1)

    def __call__(self, class_ids: Any = None, prompts: Sequence[str] | None = None, seed: int | None = 0,
                 sampler: "Sampler | str | None" = None, **options) -> list:
        return to_pil(self.generate(class_ids, prompts, seed=seed, sampler=sampler, **options))

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """``tokenizer.{json,safetensors}``, ``generator.{json,safetensors}``, ``pipeline.json`` and, for
        text-to-image pipelines, the component folder ``text_encoder/`` (a reference to the MiniLM package or
        to a local T5 folder, or the weights of an encoder visar owns)."""
        d = Path(directory)
        self.tokenizer.save_pretrained(d, "tokenizer")
        self.generator.save_pretrained(d, "generator")
        meta = {"format": "visar-pipeline", "version": PIPELINE_VERSION}
        if self.text_encoder is not None:
            self.text_encoder.save_pretrained(d / TEXT_ENCODER_DIR)
            meta["text_encoder"] = {"component": TEXT_ENCODER_DIR, "kind": self.text_encoder.kind}
        if self.sampler.name != getattr(self.generator, "default_sampler", None) or self.sampler.options:
            meta["sampler"] = {"name": self.sampler.name, "options": self._save_sampler_options(d)}
        if self.sampling_defaults:
            meta["sampling_defaults"] = self.sampling_defaults
        atomic_write_bytes(d / "pipeline.json", json.dumps(meta).encode())
        return d

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu",
                        text_encoder: Any = None) -> "Pipeline":
        """Load a saved pipeline; ``text_encoder`` (a :class:`~visar.text.base.TextEncoder`) replaces the saved
        one (e.g. a T5 encoder whose folder moved)."""
        d = Path(directory)
        if not (d / "pipeline.json").is_file():
            raise FileNotFoundError(f"{d} is not a visar pipeline folder (no pipeline.json); "
                                    "create one with Pipeline.save_pretrained")
        from visar.utils.config import read_json

        meta = read_json(d / "pipeline.json", "a visar pipeline description")
        if not isinstance(meta, dict) or meta.get("format", "visar-pipeline") != "visar-pipeline":
            raise ValueError(f"{d / 'pipeline.json'} is not a visar pipeline description (expected an object with "
                             "\"format\": \"visar-pipeline\")")
        tok = Tokenizer.from_pretrained(d, "tokenizer", map_location=device)
        gen = Generator.from_pretrained(d, "generator", map_location=device)
        defaults = migrate_sampling_defaults(meta.get("sampling_defaults"), int(meta.get("version", 1)),
                                             getattr(gen, "family", ""))
        spec = meta.get("sampler")
        sampler = None
        if spec:
            options = {k: cls._load_sampler_option(d, v, device) for k, v in spec.get("options", {}).items()}
            sampler = get_sampler(spec["name"], **options)
        if text_encoder is None and meta.get("text_encoder"):
            from visar.text.base import load_text_encoder

            text_encoder = load_text_encoder(d / meta["text_encoder"]["component"], device=device)
        return cls(tok, gen, sampler=sampler, text_encoder=text_encoder, sampling_defaults=defaults)

    def _save_sampler_options(self, d: Path) -> dict:
        """The sampler's options as JSON: a model option (a speculative draft, a distilled student, a
        tokenizer whose codebook a flow-map sampler reads) is saved as its own component ``sampler_<name>``."""
        import torch.nn as nn

        out = {}
        for k, v in self.sampler.options.items():
            if isinstance(v, nn.Module) and callable(getattr(v, "save_pretrained", None)):
                v.save_pretrained(d, f"sampler_{k}")
                out[k] = {"component": f"sampler_{k}", "kind": "tokenizer" if isinstance(v, Tokenizer) else "generator"}
            elif isinstance(v, (str, int, float, bool, type(None), list, dict)):
                out[k] = v
            else:
                raise TypeError(f"the sampler option {k}={type(v).__name__} cannot be saved with the pipeline; give a "
                                "saved model folder path or a visar model instead, or save the pipeline without this "
                                "sampler (Pipeline(tokenizer, generator))")
        return out

    @staticmethod
    def _load_sampler_option(d: Path, value: Any, device) -> Any:
        if isinstance(value, dict) and set(value) == {"component", "kind"}:
            base = Tokenizer if value["kind"] == "tokenizer" else Generator
            return base.from_pretrained(d, value["component"], map_location=device)
        return value
