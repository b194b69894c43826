"""What an image is generated from: :class:`Condition` (class ids or caption features).

This module sits below generators and samplers (both import it; it imports neither), so every
layer can build, batch and move conditions without reaching into a family.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch


@dataclass
class Condition:
    """What an image is generated from.

    Attributes:
        labels: ``LongTensor [B]`` class ids (class-conditional models). The value ``num_classes``
            is the null class used for classifier-free guidance.
        text: ``FloatTensor [B, T, D]`` caption features (text-conditional models), left padded.
        text_mask: ``[B, T]`` 1 on valid caption positions, 0 on padding.
    """

    labels: torch.Tensor | None = None
    text: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        for t in (self.labels, self.text):
            if t is not None:
                return t.shape[0]
        raise ValueError("empty Condition: give class labels or text features")

    def to(self, device: torch.device | str) -> "Condition":
        return replace(self, **{k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                                for k, v in self.__dict__.items()})

    @classmethod
    def of(cls, labels: Any) -> "Condition":
        """Condition from class ids given as an int, a list or a tensor."""
        if isinstance(labels, Condition):
            return labels
        if isinstance(labels, int):
            labels = [labels]
        return cls(labels=torch.as_tensor(labels, dtype=torch.long).reshape(-1))


def cat_conditions(a: Condition, b: Condition) -> Condition:
    """Stack two conditions along the batch: rows ``[a; b]`` (e.g. ``[cond; null]`` for guidance)."""
    def cat(x, y):
        return None if x is None else torch.cat([x, y.to(x.device, x.dtype)])
    return Condition(labels=cat(a.labels, b.labels), text=cat(a.text, b.text),
                     text_mask=cat(a.text_mask, b.text_mask) if a.text_mask is not None else None)


__all__ = ["Condition", "cat_conditions"]
