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
    def of(cls, labels: Any, name: str = "class_ids") -> "Condition":
        """Condition from class ids given as an int, a sequence of ints, or an integer tensor / array.

        Raises a ``TypeError`` naming ``name`` for anything else (floats, strings, bools), and a
        ``ValueError`` for an empty batch.
        """
        if isinstance(labels, Condition):
            return labels
        if isinstance(labels, (str, bytes)):
            raise TypeError(f"{name} must be integer class ids (an int, a list of ints or an integer tensor), got "
                            f"the string {labels!r}; class names are not looked up, pass their ids")
        if isinstance(labels, bool) or (isinstance(labels, (list, tuple)) and any(isinstance(x, bool) for x in labels)):
            raise TypeError(f"{name} must be integer class ids, not booleans: got {labels!r}")
        if isinstance(labels, int):
            labels = [labels]
        try:
            t = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be integer class ids (an int, a list of ints or an integer tensor), got "
                            f"{type(labels).__name__} {labels!r:.80}") from e
        if t.numel() == 0:
            raise ValueError(f"{name} is empty: give at least one class id")
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise TypeError(f"{name} must be integer class ids, got {t.dtype} values "
                            f"{t.reshape(-1)[:4].tolist()}; pass ints (e.g. [0, 3])")
        return cls(labels=t.to(torch.long).reshape(-1))


def cat_conditions(a: Condition, b: Condition) -> Condition:
    """Stack two conditions along the batch: rows ``[a; b]`` (e.g. ``[cond; null]`` for guidance)."""
    def cat(x, y):
        return None if x is None else torch.cat([x, y.to(x.device, x.dtype)])
    return Condition(labels=cat(a.labels, b.labels), text=cat(a.text, b.text),
                     text_mask=cat(a.text_mask, b.text_mask) if a.text_mask is not None else None)


__all__ = ["Condition", "cat_conditions"]
