"""A tiny caption encoder in plain torch: the test twin of the transformers encoders.

Characters are tokens: printable ASCII (codes 32..126) map to their own ids, anything else to the unknown
token, and the end token closes every prompt (as T5's ``</s>`` does). An embedding plus learned positions
go through one pre-norm transformer layer. Its weights are random unless trained, and saved with a
pipeline (:attr:`saves_weights`). It needs no optional dependency, so the text-to-image machinery
(pipelines, caching, the CLI) is tested without ``visar[t2i]``.
"""
from __future__ import annotations

import torch
from torch import nn

from visar.registry import register
from visar.text.base import TextEncoder, TokenizedPrompts, frozen

PAD, EOS, UNK = 0, 1, 2
_FIRST, _LAST = 32, 126  # printable ASCII
VOCAB = 3 + _LAST - _FIRST + 1


def char_ids(text: str) -> tuple[list[int], list[str]]:
    """Token ids of ``text`` (no end token) and the characters that became the unknown token."""
    ids, unknown = [], []
    for c in text:
        o = ord(c)
        if _FIRST <= o <= _LAST:
            ids.append(3 + o - _FIRST)
        else:
            ids.append(UNK)
            unknown.append(c)
    return ids, unknown


@register("text_encoder", "tiny")
class TinyTextEncoder(TextEncoder):
    """Character-level encoder: ``[B, max_length, dim]`` features (left padded, see :mod:`visar.text.base`).

    Args:
        dim: feature width ``D`` (divisible by ``num_heads``).
        max_length: characters per prompt, the end token included.
        num_heads: attention heads of the one transformer layer.
    """

    kind = "tiny"
    saves_weights = True

    def __init__(self, dim: int = 16, max_length: int = 16, num_heads: int = 2):
        super().__init__()
        for name, v in dict(dim=dim, max_length=max_length, num_heads=num_heads).items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if max_length < 2 or dim % num_heads:
            raise ValueError(f"need max_length >= 2 and dim divisible by num_heads, got {max_length}, {dim}, "
                             f"{num_heads}")
        self.dim, self.max_length, self.num_heads = dim, max_length, num_heads
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        self.layer = nn.TransformerEncoderLayer(dim, num_heads, dim_feedforward=2 * dim, dropout=0.0,
                                                batch_first=True, norm_first=True)
        frozen(self)

    def config(self) -> dict:
        return {"dim": self.dim, "max_length": self.max_length, "num_heads": self.num_heads}

    def reference(self) -> dict:
        return {"weights": "model.safetensors"}

    def tokenize(self, prompts: list[str]) -> TokenizedPrompts:
        T = self.max_length
        ids = torch.full((len(prompts), T), PAD, dtype=torch.long)
        mask = torch.zeros(len(prompts), T, dtype=torch.long)
        full, unknown = [], []
        for b, p in enumerate(prompts):
            row, unk = char_ids(p)
            full.append(len(row) + 1)
            unknown.append(unk)
            row = row[:T - 1] + [EOS]  # truncation keeps the end token, as transformers does
            ids[b, :len(row)] = torch.tensor(row)
            mask[b, :len(row)] = 1
        return TokenizedPrompts(ids=ids, mask=mask, full_lengths=full, unknown=unknown)

    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        return self.layer(x, src_key_padding_mask=mask == 0)


__all__ = ["TinyTextEncoder", "char_ids", "VOCAB"]
