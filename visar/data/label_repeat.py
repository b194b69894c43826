"""Oversampling of chosen classes by whole factors (``data.label_repeat`` in a training config).

``LabelRepeat(dataset, {label: k})`` is ``dataset`` with every item of class ``label`` listed ``k`` times
(``k >= 1``; classes not named stay once). Training draws its batches from a random permutation of all
listed items per epoch (:class:`visar.train.trainer.StepBatches`), so a class repeated twice is seen twice
as often, spread over the epoch, and its share of each batch doubles. Use it to give classes a model draws
badly (on shapes: diamonds, hexagons, hearts) more of the training signal.

Item labels come from :func:`item_labels`: a token cache's stored ``labels``, the shapes dataset's
``index % 10`` and an image folder's class indices, without loading any image. Keys may be class indices,
or class names where the dataset has a ``classes`` list (shapes, image folders).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from visar.data.views import IndexedView


def item_labels(dataset: Any) -> torch.Tensor:
    """``LongTensor [len(dataset)]``: the class index of every item, read without loading images.

    Raises a ``ValueError`` for a dataset that stores no labels.
    """
    fn = getattr(dataset, "item_labels", None)
    if callable(fn):
        labels = torch.as_tensor(fn(), dtype=torch.long)
    elif isinstance(getattr(dataset, "labels", None), (list, tuple, torch.Tensor)):
        labels = torch.as_tensor(dataset.labels, dtype=torch.long)  # one label per item
    else:
        raise ValueError(f"{type(dataset).__name__} items carry no class labels that can be read without loading "
                         "them; data.label_repeat works with data.kind shapes, folder and token_cache")
    if labels.shape != (len(dataset),):
        raise ValueError(f"{type(dataset).__name__} gave {tuple(labels.shape)} labels for {len(dataset)} items")
    return labels


def resolve_repeats(repeats: Mapping[Any, Any], classes: Any = None) -> dict[int, int]:
    """``{class index: factor}`` from ``{index or class name: factor}``, checked: factors are ints >= 1, names
    are in ``classes`` (when given) and no class is named twice."""
    if not isinstance(repeats, Mapping):
        raise ValueError(f"data.label_repeat must map class -> repeat factor, e.g. {{6: 2, 7: 2}}, got {repeats!r}")
    names = list(classes) if classes is not None else None
    out: dict[int, int] = {}
    for key, k in repeats.items():
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise ValueError(f"data.label_repeat key {key!r} must be a class index or a class name")
        if isinstance(key, str):
            if names is None:
                raise ValueError(f"data.label_repeat key {key!r} is a class name, but this dataset has no class "
                                 "names; use the class index")
            if key not in names:
                raise ValueError(f"data.label_repeat key {key!r} is not a class of this dataset; classes: "
                                 f"{', '.join(map(str, names))}")
            label = names.index(key)
        else:
            label = key
            if label < 0 or (names is not None and label >= len(names)):
                raise ValueError(f"data.label_repeat key {label} is not a class index of this dataset "
                                 f"(0 .. {len(names) - 1 if names else 'N - 1'})")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"data.label_repeat[{key!r}] must be a whole repeat factor >= 1, got {k!r}")
        if label in out:
            raise ValueError(f"data.label_repeat names class {label} twice")
        out[label] = k
    return out


class LabelRepeat(IndexedView):
    """``dataset`` with the items of some classes listed several times (see the module docstring).

    Args:
        dataset: a map-style dataset whose labels :func:`item_labels` can read.
        repeats: ``{class index or name: whole factor >= 1}``.

    ``positions`` (``LongTensor [M]``) maps each listed position to its item in ``dataset``; items keep their
    order, repeats sit next to each other (training permutes them).
    """

    def __init__(self, dataset: Any, repeats: Mapping[Any, int]):
        labels = item_labels(dataset)
        self.repeats = resolve_repeats(repeats, getattr(dataset, "classes", None))
        present = set(torch.unique(labels).tolist())
        missing = sorted(set(self.repeats) - present)
        if missing:
            raise ValueError(f"data.label_repeat names class(es) {missing} that no item of the dataset has "
                             f"(its labels: {sorted(present)})")
        counts = torch.ones_like(labels)
        for label, k in self.repeats.items():
            counts[labels == label] = k
        self.positions = torch.repeat_interleave(torch.arange(len(labels)), counts)
        super().__init__(dataset, self.positions)
        self._labels = labels[self.positions]
        for attr in ("classes", "num_classes"):
            if hasattr(dataset, attr):
                setattr(self, attr, getattr(dataset, attr))

    def item_labels(self) -> torch.Tensor:
        """The label of every listed position, ``LongTensor [len(self)]``."""
        return self._labels

    def __getattr__(self, name: str) -> Any:
        # the wrapped dataset's other public attributes (a token cache's check_tokenizer, has_text, ...);
        # never dunder or private names, so that protocol lookups do not bypass the index map
        if name.startswith("_") or name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
