"""AdamW parameter groups, the warmup + cosine learning-rate schedule, and EMA weights."""
from __future__ import annotations

import math

import torch
from torch import nn

#: module types whose weights get no weight decay
_NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.Embedding)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay for weight matrices/kernels; none for norms, biases, embeddings and
    any 1-D parameter (gains, scales, class/position tables named ``*embed*``/``*pos*``/``*token*``)."""
    no_decay_ids = set()
    for mod in model.modules():
        is_norm = isinstance(mod, _NO_DECAY_MODULES) or "norm" in type(mod).__name__.lower()
        for name, p in mod.named_parameters(recurse=False):
            if is_norm or p.ndim < 2 or name.endswith("bias"):
                no_decay_ids.add(id(p))
    for name, p in model.named_parameters():
        low = name.lower()
        if any(s in low for s in ("embed", "pos_", "codebook", "cls_token", "mask_token")):
            no_decay_ids.add(id(p))
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if id(p) in no_decay_ids else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to ``min_ratio * base_lr``."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


class EMA:
    """Exponential moving average of a model's floating-point state (fp32 shadow copy).

    ``decay_t = min(decay, (1 + t) / (10 + t))`` so early averages are not dominated by the random init.
    Non-float buffers and frozen parameters (``requires_grad=False`` when the EMA is built, e.g. the
    encoder in decoder-only fine-tuning) are copied as they are, never averaged, so they stay bit-equal.
    The shadow lives on the model's device (moved there at the first update, since the trainer builds
    the EMA before Accelerate moves the model); :meth:`state_dict` returns CPU tensors for checkpoints.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        self.shadow = {k: (v.detach().float().clone() if v.is_floating_point() else v.detach().clone())
                       for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if s.device != v.device:
                s = self.shadow[k] = s.to(v.device)
            if v.is_floating_point() and k not in self.frozen:
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

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (cast to its dtypes)."""
        sd = model.state_dict()
        model.load_state_dict({k: self.shadow[k].to(device=sd[k].device, dtype=sd[k].dtype) for k in sd})
