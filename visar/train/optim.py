"""AdamW parameter groups, the warmup + cosine learning-rate schedule, and EMA weights.

Weight decay (``optim.weight_decay_groups``):

* ``official`` (default): the model's own rule in timm's ``param_groups_weight_decay`` convention:
  no decay for 1-D parameters, names ending in ``.bias`` and the names ``model.no_weight_decay()``
  returns (each generator family lists what its official training code exempts). A model without
  ``no_weight_decay`` (tokenizers, classifiers, CTF, the causal continuous model) keeps ``legacy``.
* ``legacy``: visar's first rule (norm modules, embeddings, biases, 1-D parameters and any name
  containing ``embed``, ``pos_``, ``codebook``, ``cls_token``, ``mask_token``). Runs started before the
  official rule existed resume with it automatically (their optimizer state is grouped that way).

EMA (``optim.ema``, see :func:`ema_rule`): ``warmup`` (visar's default: ``min(decay, (1+t)/(10+t))``, float
buffers averaged too), ``constant`` (the official update: a constant ``train.ema_decay``, parameters only)
or ``official`` (the family's own rule, ``model.official_ema_decay``; ``0`` = no averaging).
"""
from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn

log = logging.getLogger("visar.train")

#: values of ``optim.weight_decay_groups``
DECAY_RULES = ("official", "legacy")
#: values of ``optim.ema``
EMA_RULES = ("warmup", "constant", "official")

#: module types whose weights get no weight decay (legacy rule)
_NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.Embedding)


def legacy_no_decay(model: nn.Module) -> set[str]:
    """Names exempt from weight decay under the legacy rule: parameters of norm modules and embeddings,
    biases, any 1-D parameter, and names containing ``embed``/``pos_``/``codebook``/``cls_token``/``mask_token``."""
    names = set()
    for mod_name, mod in model.named_modules():
        is_norm = isinstance(mod, _NO_DECAY_MODULES) or "norm" in type(mod).__name__.lower()
        for name, p in mod.named_parameters(recurse=False):
            if is_norm or p.ndim < 2 or name.endswith("bias"):
                names.add(f"{mod_name}.{name}" if mod_name else name)
    for name, _ in model.named_parameters():
        if any(s in name.lower() for s in ("embed", "pos_", "codebook", "cls_token", "mask_token")):
            names.add(name)
    return names


def official_no_decay(model: nn.Module) -> set[str] | None:
    """Names exempt from weight decay under the model's official rule (timm's convention: 1-D parameters,
    ``*.bias`` and ``model.no_weight_decay()``), or ``None`` when the model declares no rule."""
    declared = getattr(model, "no_weight_decay", None)
    if not callable(declared):
        return None
    listed = set(declared())
    named = list(model.named_parameters(remove_duplicate=False))
    unknown = listed - {n for n, _ in named}
    if unknown:
        raise ValueError(f"{type(model).__name__}.no_weight_decay() names parameters the model does not have: "
                         f"{sorted(unknown)[:5]}")
    return {n for n, p in named if p.ndim <= 1 or n.endswith(".bias") or n in listed}


def no_decay_names(model: nn.Module, rule: str = "official") -> set[str]:
    """Names of the parameters that get no weight decay under ``rule`` (one of :data:`DECAY_RULES`)."""
    if rule not in DECAY_RULES:
        raise ValueError(f"optim.weight_decay_groups must be one of {', '.join(DECAY_RULES)}, got {rule!r}")
    names = official_no_decay(model) if rule == "official" else None
    return legacy_no_decay(model) if names is None else names


def param_groups(model: nn.Module, weight_decay: float, rule: str = "official") -> list[dict]:
    """Two AdamW groups of the trainable parameters, in model order: ``[decay, no decay]``, split by
    :func:`no_decay_names` (``rule``: ``"official"`` or ``"legacy"``, see the module docstring)."""
    exempt = no_decay_names(model, rule)
    ids = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in exempt}  # tied weights: any name
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if id(p) in ids else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_ratio * base_lr``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def ema_rule(model: nn.Module, rule: str, decay: float) -> dict:
    """Keyword arguments of :class:`EMA` for ``optim.ema = rule`` and ``train.ema_decay = decay``.

    * ``warmup``: ``decay`` capped by ``(1 + t) / (10 + t)``, float buffers averaged too (visar's default);
    * ``constant``: ``decay`` from the first step, parameters only (buffers follow the model), the update
      of the official MAR / FlowAR / xAR trainers and of LlamaGen's ``--ema``;
    * ``official``: ``constant`` with the family's decay ``model.official_ema_decay`` (``0``: no averaging,
      the exported weights are the trained ones, as VAR's and LlamaGen's documented runs); ``train.ema_decay``
      is not used.
    """
    if rule not in EMA_RULES:
        raise ValueError(f"optim.ema must be one of {', '.join(EMA_RULES)}, got {rule!r}")
    if rule == "warmup":
        return dict(decay=decay, warmup=True, average_buffers=True)
    if rule == "official":
        official = getattr(model, "official_ema_decay", None)
        if official is None:
            raise ValueError(f"optim.ema=official: {type(model).__name__} declares no official EMA rule "
                             "(official_ema_decay); use optim.ema=warmup or optim.ema=constant with train.ema_decay")
        decay = float(official)
    return dict(decay=decay, warmup=False, average_buffers=False)


class EMA:
    """Exponential moving average of a model's floating-point state (fp32 shadow copy).

    ``decay_t = min(decay, (1 + t) / (10 + t))`` with ``warmup`` (so early averages are not dominated by the
    random init), else ``decay`` from the first step; ``decay = 0`` keeps a plain copy of the weights.
    Floating-point buffers are averaged with ``average_buffers``, else copied like non-float buffers.
    Frozen parameters (``requires_grad=False`` when the EMA is built, e.g. the encoder in decoder-only
    fine-tuning) are copied as they are, never averaged, so they stay bit-equal.
    The shadow lives on the model's device (moved there at the first update, since the trainer builds
    the EMA before Accelerate moves the model); :meth:`state_dict` returns CPU tensors for checkpoints.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True, average_buffers: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.average_buffers = decay, warmup, average_buffers
        self.frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        self.params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        self.shadow = {k: (v.detach().float().clone() if v.is_floating_point() else v.detach().clone())
                       for k, v in model.state_dict().items()}

    def decay_at(self, step: int) -> float:
        """The decay used by the update after optimizer step ``step`` (0-based)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = self.decay_at(step)
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if s.device != v.device:
                s = self.shadow[k] = s.to(v.device)
            averaged = v.is_floating_point() and k not in self.frozen and (self.average_buffers or k in self.params)
            if averaged and d > 0:
                s.mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}")
        for k in self.shadow:
            self.shadow[k] = state[k].clone()

    def with_shadow(self, shadow: dict[str, torch.Tensor]) -> "EMA":
        """A copy of this EMA (same rule) holding ``shadow`` (e.g. the whole tensors assembled from FSDP shards)."""
        other = copy.copy(self)
        other.shadow = shadow
        return other

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (cast to its dtypes)."""
        sd = model.state_dict()
        model.load_state_dict({k: self.shadow[k].to(device=sd[k].device, dtype=sd[k].dtype) for k in sd})
