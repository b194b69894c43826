"""T5 / FLAN-T5 caption features from a local folder, with LlamaGen's convention.

LlamaGen's text-to-image models read flan-t5-xl features (2048 values per token) of up to 120 tokens
(``language/t5.py`` and ``autoregressive/sample/sample_t2i.py``): the prompts are tokenized with
``padding="max_length", truncation=True, max_length=120`` (T5 appends ``</s>``, no start token), encoded by
``T5EncoderModel`` in bfloat16 (its ``last_hidden_state``), then **left padded** (:func:`visar.text.base.left_pad`).
The empty prompt encodes to ``</s>`` alone (one valid position). So an official LlamaGen t2i checkpoint
(``visar convert llamagen``) plus a local flan-t5-xl folder runs end to end.

Nothing is downloaded: the folder must hold what ``transformers`` reads (``config.json``, the tokenizer
files, the weights). A pipeline saves the folder's path as a reference.
"""
from __future__ import annotations

import os
from pathlib import Path

from visar.registry import register
from visar.text.hf import HFTextEncoder

#: LlamaGen's text encoder and its defaults
OFFICIAL_MODEL = "google/flan-t5-xl"
OFFICIAL_MAX_LENGTH = 120


def missing_folder_message(path: Path, what: str) -> str:
    return (f"T5 text encoder folder {path} {what}. Download {OFFICIAL_MODEL} (LlamaGen's text encoder: config.json, "
            "the tokenizer files spiece.model / tokenizer.json / tokenizer_config.json / special_tokens_map.json, "
            "and the weights model*.safetensors or pytorch_model*.bin) on a machine with network access, e.g. "
            f"`huggingface-cli download {OFFICIAL_MODEL} --local-dir {path}`, and copy the folder to {path} "
            "(LlamaGen keeps it at pretrained_models/t5-ckpt/flan-t5-xl); or give T5Encoder(path=...) the folder "
            "where it already is")


@register("text_encoder", "t5")
class T5Encoder(HFTextEncoder):
    """T5 encoder features ``[B, max_length, d_model]`` (flan-t5-xl: 2048), left padded, LlamaGen's way.

    Args:
        path: local folder of a T5 / FLAN-T5 checkpoint in the transformers layout.
        max_length: tokens per prompt including ``</s>`` (LlamaGen: 120).
        dtype: the encoder's weights dtype; LlamaGen runs it in ``"bfloat16"`` (features become float32).
    """

    kind = "t5"

    def __init__(self, path: str, max_length: int = OFFICIAL_MAX_LENGTH, dtype: str = "bfloat16"):
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise TypeError(f"path must be the local folder of a T5 checkpoint, got {path!r}")
        folder = Path(path).expanduser().resolve()
        if not folder.is_dir():
            raise FileNotFoundError(missing_folder_message(folder, "does not exist"))
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(missing_folder_message(folder, "has no config.json"))
        super().__init__(folder, "T5EncoderModel", max_length, dtype)
        self.path = str(folder)

    def config(self) -> dict:
        return {"path": self.path, "max_length": self.max_length, "dtype": self.dtype_name}

    def reference(self) -> dict:
        return {"path": self.path, "note": f"a local copy of {OFFICIAL_MODEL} (or another T5 encoder); not stored "
                                           "with the pipeline"}


__all__ = ["T5Encoder", "OFFICIAL_MODEL", "OFFICIAL_MAX_LENGTH"]
