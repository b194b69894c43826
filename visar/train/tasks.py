"""Training tasks: thin ``nn.Module`` wrappers whose ``forward(batch)`` returns a dict with ``loss``.

The trainer wraps a task (not the bare model) with Accelerate/DDP, so the forward pass that DDP sees
is the loss computation whatever method the family exposes:

* ``tokenizer``: ``model.training_loss(images) -> {"loss": ..., ...}``;
* ``generator``: ``model.loss(tokens, cond) -> scalar``; tokens come from the batch
  (token cache) or from the frozen tokenizer's ``encode(images)``; ``cond`` holds the batch's caption
  features when it has them (a token cache built with a text encoder), else its class labels;
* ``classifier``: ``model.training_loss(images, labels) -> {"loss": ..., ...}``;
* ``distill``: a Distilled Decoding student's ``model.training_loss(noise, tokens, Condition(labels))`` on the
  teacher pairs of ``visar distill-data`` (``data.kind: distill_shards``).
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
        if getattr(self.model, "text_conditional", False) and "text" not in batch:
            raise ValueError(f"{type(self.model).__name__} is text-conditional but the batches hold no caption "
                             "features: train it on a token cache built with a text encoder (visar tokenize "
                             "--text-encoder minilm ...; data.kind: token_cache)")
        return _as_loss_dict(self.model.loss(tokens, batch_condition(batch)), f"{type(self.model).__name__}.loss")


def batch_condition(batch: dict) -> Condition | None:
    """A training batch's condition: caption features (``text [B, T, D]``, ``text_mask [B, T]``) when it has
    them, else class ids (``label [B]``), else ``None``."""
    if "text" in batch:
        return Condition(text=batch["text"], text_mask=batch.get("text_mask"))
    return Condition(labels=batch["label"]) if "label" in batch else None


@register("task", "distill")
class DistillTask(nn.Module):
    """Distilled Decoding student (:mod:`visar.generators.next_token.distilled`,
    :mod:`visar.generators.next_scale.distilled`) on teacher pairs: batches
    ``{"noise": [B, L, C], "tokens": [B, L], "label": [B]}`` from :class:`visar.data.distill_shards.DistillShards`.
    Each row's training state ``X_t`` is drawn uniformly from the student's ``timesteps`` (torch's global RNG,
    which the trainer seeds per process)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not callable(getattr(model, "training_loss", None)) or not hasattr(model, "timesteps"):
            raise TypeError(f"{type(model).__name__} cannot be trained with task=distill: it is not a distilled "
                            "student; build one from the teacher pipeline with model.cls: "
                            "visar.generators.next_token.distilled:student_from_teacher (next-token teachers, e.g. "
                            "LlamaGen) or visar.generators.next_scale.distilled:student_from_teacher (next-scale "
                            "teachers, VAR) and model.kwargs: {teacher: PIPELINE_DIR, timesteps: [0]}")
        self.model = model

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        missing = [k for k in ("noise", "tokens", "label") if k not in batch]
        if missing:
            raise ValueError(f"task=distill needs batches of teacher pairs (data.kind: distill_shards); this batch has "
                             f"no {', '.join(missing)}")
        out = self.model.training_loss(batch["noise"], batch["tokens"], Condition(labels=batch["label"]))
        return _as_loss_dict(out, f"{type(self.model).__name__}.training_loss")


def make_task(task: str, model: nn.Module, tokenizer: nn.Module | None = None) -> nn.Module:
    """The registered task ``task`` wrapping ``model`` (generator tasks also take the frozen tokenizer)."""
    try:
        cls = get("task", task)
    except KeyError as e:
        raise ValueError(str(e).strip('"')) from None
    return cls(model, tokenizer) if task == "generator" else cls(model)
