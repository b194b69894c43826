"""Pipeline: tokenizer + generator + sampler (+ text encoder) -> PIL images. What users call.

``Pipeline(tokenizer, generator, sampler=None)``: the sampler is a :class:`~visar.samplers.base.Sampler`
object or a registered name (``None``: the generator family's default sampler, which reproduces the
official sampling). ``pipe(class_ids, seed=0, sampler=..., **options)`` may swap it for one call.
Options resolve as: the call's, then the pipeline's ``sampling_defaults``, then the sampler's own.

Text-to-image: ``Pipeline(tokenizer, generator, text_encoder=encoder)`` with a text-conditional generator
and a :class:`~visar.text.base.TextEncoder` of its caption width; ``pipe(prompts=["a red circle"], seed=0,
cfg_scale=4.0)``. The encoder is saved with the pipeline as the component folder ``text_encoder/``
(named in ``pipeline.json``).

Results: ``pipe(...)`` returns a :class:`PipelineOutput` whose ``.images`` are PIL images
(``output_type="pil"``, the default), a float tensor ``[N, 3, H, W]`` in ``[0, 1]`` (``"pt"``) or a float32
array ``[N, H, W, 3]`` in ``[0, 1]`` (``"np"``), as diffusers' pipelines return them; the output is also the
sequence of its images (``len(out)``, ``out[0]``, ``for im in out``). ``guidance_scale`` is accepted as
diffusers' name of ``cfg_scale``.

Saving (``docs/saving.md``): ``save_pretrained(folder)`` writes one component folder per part
(``tokenizer/``, ``generator/``, ``text_encoder/``, ``sampler_<option>/``), each ``config.json`` + weights, which
``<Class>.from_pretrained(folder / part)`` loads alone, and the index ``pipeline.json`` (format version 3)
naming the parts and their classes. Folders of versions 1 and 2 (flat ``tokenizer.json`` +
``tokenizer.safetensors`` ... side by side) still load.
"""
from __future__ import annotations

import json
import numbers
import os
from collections import abc
from pathlib import Path
from typing import Any, Sequence

import torch

from visar.conditions import Condition
from visar.generators.base import Generator
from visar.samplers.base import Sampler, default_sampler, get_sampler
from visar.samplers.options import apply_aliases
from visar.tokenizers.base import Tokenizer
from visar.utils.config import as_torch_dtype, read_json
from visar.utils.images import to_pil, to_uint8  # noqa: F401  (to_uint8 re-exported)
from visar.utils.io import atomic_dir, atomic_write_bytes

#: format version of ``pipeline.json``. 1: flat files, MAR/VAR's old option names; 2: one sampling vocabulary
#: (``cfg_scale`` 1 = no guidance everywhere, ``top_p`` 1 disables); 3: one component folder per part
#: (``config.json`` + weights) named in ``"components"``
PIPELINE_VERSION = 3
#: the index file of a pipeline folder
INDEX_NAME = "pipeline.json"
#: component folder of a text-to-image pipeline's text encoder
TEXT_ENCODER_DIR = "text_encoder"
#: what ``pipe(..., output_type=...)`` returns in ``.images``
OUTPUT_TYPES = ("pil", "pt", "np")


class PipelineOutput(abc.Sequence):
    """What ``pipe(...)`` returns: ``.images`` in the requested ``output_type``, and the sequence of them.

    ``output_type="pil"``: a list of ``N`` RGB ``PIL.Image``; ``"pt"``: a float32 tensor ``[N, 3, H, W]`` in
    ``[0, 1]`` on the pipeline's device; ``"np"``: a float32 ``numpy`` array ``[N, H, W, 3]`` in ``[0, 1]``.
    ``len(out)``, ``out[i]`` and iteration give the images, so ``images = pipe([0, 1]); images[0].save(...)``
    works as it did when the pipeline returned a plain list. (Unlike diffusers' output objects, ``out[0]`` is
    the first image, not the ``images`` field.)
    """

    def __init__(self, images: Any, output_type: str = "pil"):
        self.images = images
        self.output_type = output_type

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]

    def __iter__(self):
        return iter(self.images)

    def __repr__(self) -> str:
        return f"PipelineOutput(output_type={self.output_type!r}, {len(self)} images)"


def check_output_type(output_type: Any) -> str:
    """``output_type`` if it is one of :data:`OUTPUT_TYPES` (lower case, as diffusers spells them; diffusers
    does not read ``"PIL"`` as PIL images either); a ``ValueError`` naming the argument otherwise."""
    if output_type not in OUTPUT_TYPES:
        hint = ""
        if isinstance(output_type, str) and output_type.lower() in OUTPUT_TYPES:
            hint = f"; the names are lower case: output_type={output_type.lower()!r}"
        raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))} (PIL images, a float "
                         f"tensor [N, 3, H, W] or a float32 array [N, H, W, 3] in [0, 1]), got {output_type!r}{hint}")
    return output_type


def convert_images(images: torch.Tensor, output_type: str) -> Any:
    """``[N, 3, H, W]`` in ``[-1, 1]`` -> PIL images, or float32 ``[0, 1]`` tensor / array (see :class:`PipelineOutput`)."""
    output_type = check_output_type(output_type)
    if output_type == "pil":
        return to_pil(images)
    unit = ((images.float() + 1) / 2).clamp(0, 1)  # [N, 3, H, W] in [0, 1]
    if output_type == "pt":
        return unit
    return unit.permute(0, 2, 3, 1).cpu().numpy()


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


def _dtype_name(text: str) -> torch.dtype | None:
    """The floating dtype ``text`` names (``"bfloat16"``, ``"torch.float16"``), or ``None`` (e.g. a device)."""
    try:
        return as_torch_dtype(text)
    except TypeError:
        return None


class Pipeline:
    """A tokenizer, a generator that models its tokens, and the sampler that draws them.

    ``pipe(class_ids, seed=0, sampler=None, output_type="pil", **sampling_options) -> PipelineOutput``
    (``.images``: PIL images, or ``output_type="pt"`` / ``"np"`` arrays in ``[0, 1]``); the options are
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

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the generator's floating weights (``torch.float32`` unless moved with :meth:`to`)."""
        return next((p.dtype for p in self.generator.parameters() if p.is_floating_point()), torch.float32)

    def to(self, *args: Any, device: str | torch.device | None = None,
           dtype: torch.dtype | str | None = None) -> "Pipeline":
        """Move the tokenizer, the generator and the sampler's model options (a speculative draft, a distilled
        student): ``pipe.to("cuda")``, ``pipe.to(torch.bfloat16)``, ``pipe.to("cuda", torch.bfloat16)``
        (positional, as diffusers) or ``pipe.to(device=..., dtype=...)``. A dtype may also be given by its name
        (``pipe.to("bfloat16")``, ``dtype="float16"``), as ``from_pretrained(torch_dtype=...)`` takes it.

        In bfloat16 / float16 the generators still return float32 logits, so guidance, temperature, top-k/p and
        the categorical draw run in float32. The text encoder moves to ``device`` but keeps its dtype (its
        features are float32). Returns the pipeline.
        """
        if len(args) > 2:
            raise TypeError(f"Pipeline.to takes a device and/or a dtype, got {len(args)} positional arguments")
        for a in args:
            if isinstance(a, str) and _dtype_name(a) is not None:
                a = _dtype_name(a)  # "bfloat16" / "torch.float16": a dtype, not a device
            if isinstance(a, torch.dtype):
                if dtype is not None and as_torch_dtype(dtype, "dtype") != a:
                    raise TypeError(f"Pipeline.to got two dtypes: {a} and dtype={dtype}")
                dtype = a
            elif isinstance(a, (str, torch.device)):
                if device is not None and torch.device(device) != torch.device(a):
                    raise TypeError(f"Pipeline.to got two devices: {a!r} and device={device!r}")
                device = a
            else:
                raise TypeError(f"Pipeline.to takes a device (str or torch.device) and/or a torch dtype, got "
                                f"{type(a).__name__} {a!r}")
        dtype = as_torch_dtype(dtype, "dtype")
        if device is not None:
            from visar.utils.validation import check_device

            try:
                device = check_device(device, "device")
            except ValueError as e:
                if not any(a is device for a in args):
                    raise
                raise ValueError(f"Pipeline.to({device!r}): {e}; a dtype goes as torch.bfloat16 or its name "
                                 "('bfloat16', 'float16', 'float32')") from None
        self.tokenizer.to(device=device, dtype=dtype)
        self.generator.to(device=device, dtype=dtype)
        for module in self._sampler_modules():
            module.to(device=device, dtype=dtype)
        if self.text_encoder is not None and device is not None:
            self.text_encoder.to(device=device)  # keeps its own dtype; its features are float32
        return self

    def _sampler_modules(self) -> list[torch.nn.Module]:
        """The model-valued options of the pipeline's sampler (what ``save_pretrained`` writes as
        ``sampler_<name>/``), other than the tokenizer and generator themselves."""
        own = (self.tokenizer, self.generator)
        return [v for v in self.sampler.options.values()
                if isinstance(v, torch.nn.Module) and not any(v is m for m in own)]

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
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` (clamped), drawn by ``sampler`` (default: the pipeline's).

        ``options`` are the sampler's (``guidance_scale`` is read as ``cfg_scale``)."""
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed must be an int (or None to use generator=), got {type(seed).__name__} {seed!r}")
        s = self.resolve_sampler(sampler)
        options = apply_aliases(options, type(s).__name__, s.defaults)  # before the stored defaults join in
        cond = self.condition(class_ids, prompts).to(self.device)
        self.generator.check_condition(cond)
        if generator is None and seed is not None:
            generator = torch.Generator(self.device).manual_seed(int(seed))
        tokens = s(self.generator, cond, generator, **self.options_for(s, options))
        return self.tokenizer.decode(tokens).clamp(-1, 1)

    def __call__(self, class_ids: Any = None, prompts: Sequence[str] | None = None, seed: int | None = 0,
                 sampler: "Sampler | str | None" = None, output_type: str = "pil", **options) -> PipelineOutput:
        """Draw images: a :class:`PipelineOutput` (``.images``; also the sequence of the images).

        Args:
            class_ids: class ids (class-conditional pipelines), e.g. ``[0, 3]``.
            prompts: prompts (text-to-image pipelines).
            seed: seed of a ``torch.Generator`` on the pipeline's device.
            sampler: a sampler for this call (object or registered name); default: the pipeline's.
            output_type: ``"pil"`` (list of PIL images), ``"pt"`` (float32 ``[N, 3, H, W]`` in ``[0, 1]``) or
                ``"np"`` (float32 ``[N, H, W, 3]`` in ``[0, 1]``).
            **options: sampling options (``cfg_scale`` or its diffusers name ``guidance_scale``, ``top_k``, ...).
        """
        output_type = check_output_type(output_type)  # before any sampling
        images = self.generate(class_ids, prompts, seed=seed, sampler=sampler, **options)
        return PipelineOutput(convert_images(images, output_type), output_type)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the pipeline folder (format version 3, ``docs/saving.md``).

        One component folder per part, each written whole (a temporary folder renamed into place):
        ``tokenizer/`` and ``generator/`` (``config.json`` + ``model.safetensors``; the KL tokenizer's folder is
        a diffusers ``AutoencoderKL`` folder), ``text_encoder/`` for text-to-image pipelines (a reference to the
        MiniLM package or to a local T5 folder, or the weights of an encoder visar owns) and
        ``sampler_<option>/`` for model-valued sampler options; then the index ``pipeline.json``, last. Files
        of an older flat pipeline saved in the same folder are removed after the index is written.
        """
        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise NotADirectoryError(f"{d} is a file; save_pretrained writes a folder")
        d.mkdir(parents=True, exist_ok=True)
        components: dict[str, dict] = {}
        meta: dict[str, Any] = {"format": "visar-pipeline", "version": PIPELINE_VERSION}
        for name, module in (("tokenizer", self.tokenizer), ("generator", self.generator)):
            components[name] = self._save_component(d, name, module)
        if self.text_encoder is not None:
            with atomic_dir(d / TEXT_ENCODER_DIR) as tmp:
                self.text_encoder.save_pretrained(tmp)
            enc = type(self.text_encoder)
            components[TEXT_ENCODER_DIR] = {"kind": "text_encoder", "class": f"{enc.__module__}.{enc.__qualname__}",
                                            "encoder": self.text_encoder.kind}
            meta["text_encoder"] = {"component": TEXT_ENCODER_DIR, "kind": self.text_encoder.kind}  # as in version 2
        if self.sampler.name != getattr(self.generator, "default_sampler", None) or self.sampler.options:
            meta["sampler"] = {"name": self.sampler.name, "options": self._save_sampler_options(d, components)}
        meta["components"] = components
        if self.sampling_defaults:
            meta["sampling_defaults"] = self.sampling_defaults
        atomic_write_bytes(d / INDEX_NAME, json.dumps(meta, indent=1).encode())
        for name in components:  # a flat (version 1 / 2) pipeline saved here before: its files are now stale
            for suffix in (".json", ".safetensors"):
                stale = d / f"{name}{suffix}"
                if stale.is_file():
                    stale.unlink()
        return d

    @staticmethod
    def _save_component(d: Path, name: str, module: Any) -> dict:
        """Write ``module`` as the component folder ``d/name`` (whole or not at all); its index entry."""
        with atomic_dir(d / name) as tmp:
            module.save_pretrained(tmp)
        kind = "tokenizer" if isinstance(module, Tokenizer) else "generator"
        return {"kind": kind, "class": module.config_dict()["class"], "family": module.family}

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu",
                        text_encoder: Any = None, torch_dtype: torch.dtype | str | None = None) -> "Pipeline":
        """Load a saved pipeline folder (format version 3, or the flat folders of versions 1 and 2).

        Args:
            directory: the folder ``save_pretrained`` wrote.
            device: where the weights go (``"cpu"``, ``"cuda"``, ...).
            text_encoder: a :class:`~visar.text.base.TextEncoder` replacing the saved one (e.g. a T5 encoder
                whose folder moved).
            torch_dtype: dtype of the tokenizer's, the generator's and the sampler's model options' floating
                weights (``torch.bfloat16``, ``torch.float16`` or its name; default: as saved, float32); logits
                stay float32.
        """
        dtype = as_torch_dtype(torch_dtype)
        d = Path(directory)
        if not (d / INDEX_NAME).is_file():
            raise FileNotFoundError(f"{d} is not a visar pipeline folder (no {INDEX_NAME}); "
                                    "create one with Pipeline.save_pretrained")
        meta = read_json(d / INDEX_NAME, "a visar pipeline description")
        if not isinstance(meta, dict) or meta.get("format", "visar-pipeline") != "visar-pipeline":
            raise ValueError(f"{d / INDEX_NAME} is not a visar pipeline description (expected an object with "
                             "\"format\": \"visar-pipeline\")")
        version = meta.get("version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"{d / INDEX_NAME}: \"version\" must be a positive integer, got {version!r}")
        if version > PIPELINE_VERSION:
            raise ValueError(f"{d / INDEX_NAME} has format version {version}; this visar reads up to "
                             f"{PIPELINE_VERSION}: upgrade visar")
        if version >= 3:
            comps = meta.get("components")
            if not isinstance(comps, dict) or not {"tokenizer", "generator"} <= set(comps):
                raise ValueError(f"{d / INDEX_NAME} names no tokenizer and generator components (\"components\")")
            for name in comps:
                if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or "\\" in name:
                    raise ValueError(f"{d / INDEX_NAME} names the component {name!r}: a component is a folder "
                                     "inside the pipeline folder")
                if not (d / name).is_dir():
                    raise FileNotFoundError(f"{d / name}: the component folder {name!r} named in {d / INDEX_NAME} is "
                                            "missing; copy the whole pipeline folder")
            tok = Tokenizer.from_pretrained(d / "tokenizer", map_location=device)
            gen = Generator.from_pretrained(d / "generator", map_location=device)
            enc_dir = d / TEXT_ENCODER_DIR if TEXT_ENCODER_DIR in comps else None
        else:  # versions 1 and 2: flat tokenizer.json + tokenizer.safetensors, ... side by side
            tok = Tokenizer.from_pretrained(d, "tokenizer", map_location=device)
            gen = Generator.from_pretrained(d, "generator", map_location=device)
            enc = meta.get("text_encoder")
            enc_dir = d / enc["component"] if isinstance(enc, dict) and enc.get("component") else None
        defaults = migrate_sampling_defaults(meta.get("sampling_defaults"), version, getattr(gen, "family", ""))
        spec = meta.get("sampler")
        sampler = None
        if spec:
            options = {k: cls._load_sampler_option(d, v, device) for k, v in spec.get("options", {}).items()}
            sampler = get_sampler(spec["name"], **options)
        if text_encoder is None and enc_dir is not None:
            from visar.text.base import load_text_encoder

            text_encoder = load_text_encoder(enc_dir, device=device)
        pipe = cls(tok, gen, sampler=sampler, text_encoder=text_encoder, sampling_defaults=defaults)
        return pipe.to(dtype=dtype) if dtype is not None else pipe

    def _save_sampler_options(self, d: Path, components: dict) -> dict:
        """The sampler's options as JSON: a model option (a speculative draft, a distilled student, a
        tokenizer whose codebook a flow-map sampler reads) is saved as its own component folder ``sampler_<name>``
        (and named in ``components``)."""
        import torch.nn as nn

        out = {}
        for k, v in self.sampler.options.items():
            if isinstance(v, nn.Module) and callable(getattr(v, "save_pretrained", None)):
                entry = self._save_component(d, f"sampler_{k}", v)
                components[f"sampler_{k}"] = entry
                out[k] = {"component": f"sampler_{k}", "kind": entry["kind"]}
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
