"""Training tasks: thin ``nn.Module`` wrappers whose ``forward(batch)`` returns a dict with ``loss``.

The trainer wraps a task (not the bare model) with Accelerate/DDP, so the forward pass that DDP sees
is the loss computation whatever method the family exposes:

* ``tokenizer``: ``model.training_loss(images) -> {"loss": ..., ...}``;
* ``generator``: ``model.loss(tokens, Condition(labels)) -> scalar``; tokens come from the batch
  (token cache) or from the frozen tokenizer's ``encode(images)``;
* ``classifier``: ``model.training_loss(images, labels) -> {"loss": ..., ...}``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from visar.conditions import Condition
from visar.registry import get, register


def _as_loss_dict(out: Any, where: str) -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        out = {"loss": out}
    if not isinstance(out, dict) or "loss" not in out:
        raise TypeError(f"{where} must return a dict with key 'loss' (or a scalar tensor), got {type(out).__name__}")
    if out["loss"].dim() != 0:
        raise ValueError(f"{where} returned a loss of shape {tuple(out['loss'].shape)}; it must be a scalar")
    return out


@register("task", "tokenizer")
class TokenizerTask(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        if not callable(getattr(model, "training_loss", None)):
            raise TypeError(f"{type(model).__name__} cannot be trained as a tokenizer: it has no "
                            "training_loss(images) -> dict with key 'loss'")
        self.model = model

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return _as_loss_dict(self.model.training_loss(batch["image"]), f"{type(self.model).__name__}.training_loss")


@register("task", "classifier")
class ClassifierTask(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        if not callable(getattr(model, "training_loss", None)):
            raise TypeError(f"{type(model).__name__} cannot be trained as a classifier: it has no "
                            "training_loss(images, labels) -> dict with key 'loss'")
        self.model = model

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return _as_loss_dict(self.model.training_loss(batch["image"], batch["label"]),
                             f"{type(self.model).__name__}.training_loss")


@register("task", "generator")
class GeneratorTask(nn.Module):
    """Generator loss on tokens of a frozen tokenizer (kept out of the module tree: never trained or synced)."""

    def __init__(self, model: nn.Module, tokenizer: nn.Module | None):
        super().__init__()
        if not callable(getattr(model, "loss", None)):
            raise TypeError(f"{type(model).__name__} cannot be trained as a generator: it has no loss(tokens, cond)")
        self.model = model
        object.__setattr__(self, "frozen_tokenizer", tokenizer)
        if tokenizer is not None:
            tokenizer.requires_grad_(False).eval()
            if hasattr(model, "check_tokenizer"):
                model.check_tokenizer(tokenizer)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        tokens = batch.get("tokens")
        if tokens is None:
            if self.frozen_tokenizer is None:
                raise ValueError("the batch has images but no tokenizer was given to encode them")
            with torch.no_grad():
                tokens = self.frozen_tokenizer.encode(batch["image"])
        cond = Condition(labels=batch["label"]) if "label" in batch else None
        return _as_loss_dict(self.model.loss(tokens, cond), f"{type(self.model).__name__}.loss")


def make_task(task: str, model: nn.Module, tokenizer: nn.Module | None = None) -> nn.Module:
    """The registered task ``task`` wrapping ``model`` (generator tasks also take the frozen tokenizer)."""
    try:
        cls = get("task", task)
    except KeyError as e:
        raise ValueError(str(e).strip('"')) from None
    return cls(model, tokenizer) if task == "generator" else cls(model)
