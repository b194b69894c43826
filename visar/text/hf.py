"""Text encoders read through ``transformers``: a tokenizer plus an encoder whose ``last_hidden_state`` are
the caption features. Shared by :mod:`visar.text.minilm` and :mod:`visar.text.t5`.

``transformers`` is an optional dependency (``pip install "visar[t2i]"``), imported only when an encoder is
built. Everything is read from a local folder: nothing is downloaded.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from visar.text.base import TextEncoder, TokenizedPrompts, frozen, require

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


class HFTextEncoder(TextEncoder):
    """A transformers tokenizer + encoder model loaded from ``folder``.

    Args:
        folder: local folder holding the tokenizer files and the model (``config.json`` + weights).
        model_class: name of the transformers class that loads the encoder (``"AutoModel"``,
            ``"T5EncoderModel"``).
        max_length: tokens per prompt ``T`` (special tokens included); longer prompts are truncated.
        dtype: the encoder's weights dtype; features are returned as float32.
    """

    def __init__(self, folder: Path, model_class: str, max_length: int, dtype: str = "float32"):
        super().__init__()
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (special tokens included), got {max_length!r}")
        torch_dtype = check_dtype(dtype)
        transformers = require("transformers", f"the {self.kind} text encoder")
        self.hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        loader = getattr(transformers, model_class)
        major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
        key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56
        hf_logging = transformers.utils.logging
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar on every pipeline load
        try:
            self.model = frozen(loader.from_pretrained(str(folder), **{key: torch_dtype}))
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        cfg = self.model.config
        self.dim = int(getattr(cfg, "d_model", None) or cfg.hidden_size)
        limit = getattr(cfg, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            raise ValueError(f"max_length={max_length} exceeds the {self.kind} encoder's {limit} positions")
        self.max_length = max_length
        self.dtype_name = dtype

    def tokenize(self, prompts: list[str]) -> TokenizedPrompts:
        tok = self.hf_tokenizer
        full = tok(prompts, add_special_tokens=True, truncation=False, return_offsets_mapping=tok.is_fast,
                   verbose=False)
        unk = tok.unk_token_id
        unknown = []
        for i, ids in enumerate(full["input_ids"]):
            pieces = []
            if unk is not None and unk in ids:
                offsets = full["offset_mapping"][i] if tok.is_fast else None
                for j, t in enumerate(ids):
                    if t == unk:
                        pieces.append(prompts[i][offsets[j][0]:offsets[j][1]] if offsets else "?")
            unknown.append(pieces)
        enc = tok(prompts, max_length=self.max_length, padding="max_length", truncation=True,
                  add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        return TokenizedPrompts(ids=enc["input_ids"].long(), mask=enc["attention_mask"].long(),
                                full_lengths=[len(x) for x in full["input_ids"]], unknown=unknown)

    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state


__all__ = ["HFTextEncoder", "check_dtype"]
