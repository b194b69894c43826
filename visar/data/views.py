"""Index-mapped views of a map-style dataset: item ``i`` of the view is ``dataset[sources[i]]``.

:class:`IndexedView` is the one mechanism behind :class:`visar.data.token_cache.CaptionSubset` (the items
whose caption holds no held-out phrase) and :class:`visar.data.label_repeat.LabelRepeat` (some classes'
items listed several times): both only choose ``sources``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch


class IndexedView(torch.utils.data.Dataset):
    """Item ``i`` is ``dataset[sources[i]]`` (``sources``: ints or a ``LongTensor [M]``; negative ``i`` count
    from the end). ``__getitems__`` reads a batch through the wrapped dataset's own batched read (the shapes
    dataset renders or reads a batch at once) when its class has one, else item by item."""

    def __init__(self, dataset: Any, sources: Sequence[int] | torch.Tensor):
        self.dataset = dataset
        self._sources = sources

    def __len__(self) -> int:
        return len(self._sources)

    def source(self, i: int) -> int:
        """The index in ``dataset`` of view item ``i``; an ``IndexError`` that names ``i`` when it is out of range."""
        n = len(self._sources)
        if not -n <= int(i) < n:
            raise IndexError(f"index {i} out of range for {n} items")
        return int(self._sources[int(i)])

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.source(i)]

    def __getitems__(self, indices: Sequence[int]) -> list:
        src = [self.source(i) for i in indices]
        # the class's method, not an instance attribute: a view forwarding attributes must not hand back
        # the wrapped dataset's batched read with unmapped indices
        batched = getattr(type(self.dataset), "__getitems__", None)
        return batched(self.dataset, src) if batched is not None else [self.dataset[j] for j in src]
