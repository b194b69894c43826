"""Counting sequential network passes: forward hooks on the first block of each block stack."""
from __future__ import annotations

from torch import nn


class PassCounter:
    """Counts forward calls of the first block of every block stack (``nn.ModuleList``) of ``module``
    that is not nested in another stack; use as a context manager, read ``counts`` ({stack name: calls})."""

    def __init__(self, module: nn.Module):
        self.stacks: list[tuple[str, nn.Module]] = []
        for name, m in module.named_modules():
            if isinstance(m, nn.ModuleList) and len(m) > 0 and not any(
                    name.startswith(s + ".") for s, _ in self.stacks):
                self.stacks.append((name, m[0]))
        self.counts = {name: 0 for name, _ in self.stacks}
        self._handles: list = []

    def __enter__(self) -> "PassCounter":
        for name, first in self.stacks:
            self._handles.append(first.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(*_):
            self.counts[name] += 1
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
