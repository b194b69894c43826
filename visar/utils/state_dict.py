"""Loading state dicts strictly, with a readable report (shared by converters and ``from_pretrained``)."""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint file cannot be used for what was asked (wrong family, truncated, unsafe, ...)."""


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint",
                      ignore: Iterable[str] = ()) -> None:
    """``load_state_dict(strict=True)`` with dtype casting and a readable report of mismatches.

    Keys in ``ignore`` are dropped from ``state`` first. Tensors are cast to the dtype of the
    parameter they load into (official files may store float16).
    """
    ignore = set(ignore)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k not in ignore}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape_bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shape_bad:
        lines = [f"{source} does not match {type(model).__name__}:"]
        if missing:
            lines.append(f"  missing {len(missing)} keys, e.g. {missing[:5]}")
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)} keys, e.g. {unexpected[:5]}")
        if shape_bad:
            lines.append(f"  shape mismatches: {shape_bad[:5]}")
        lines.append("  (is this a checkpoint of another family or size? pass overrides or use the right converter)")
        raise CheckpointError("\n".join(lines))
    cast = {k: v.to(dtype=own[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(cast, strict=True)
