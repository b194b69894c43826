"""Deepen a trained residual network: load a shallower model's weights into a deeper one.

A pre-norm residual block computes ``x + f(x)``; with its output projections set to zero it is the
identity, so a deeper model that holds every trained block plus such zero-output copies computes the
same function as the trained one (same loss at step 0) and can keep training with more capacity
(progressive stacking with function-preserving new blocks). Used by ``model.init_deepen`` of the
trainer config (:mod:`visar.train.config`).

Placement: old block ``i`` of ``d`` goes to index ``floor(i * D / d)`` of the ``D`` new blocks; every
free index gets a copy of the nearest trained block before it, with the parameters named by ``zero``
(suffixes inside a block, e.g. ``attn.proj.weight``) set to zero. For 6 -> 9 blocks the new ones sit
after old blocks 1, 3 and 5.
"""
from __future__ import annotations

from typing import Mapping

import torch


def block_depth(state: Mapping[str, torch.Tensor], blocks: str) -> int:
    """Number of blocks ``{blocks}.{i}.*`` in ``state`` (indices must run 0..n-1)."""
    from visar.convert.common import block_indices

    idx = block_indices(state, blocks)
    if not idx:
        raise ValueError(f"no parameters named {blocks}.<i>.* in the weights; model.init_deepen.blocks must be "
                         "the dotted name of the model's list of residual blocks (e.g. trunk.blocks)")
    if idx != set(range(len(idx))):
        raise ValueError(f"block indices under {blocks} are not 0..{len(idx) - 1}: {sorted(idx)}")
    return len(idx)


def deepen_state(state: Mapping[str, torch.Tensor], new_depth: int, blocks: str,
                 zero: list[str]) -> dict[str, torch.Tensor]:
    """Weights of a ``new_depth``-block model from ``state`` of a shallower one (see the module doc).

    ``state``: the trained weights; ``blocks``: dotted prefix of the block list; ``zero``: parameter
    suffixes inside a block that make its residual branch output zero. Returns a new dict; keys outside
    the blocks are copied unchanged. Raises ``ValueError`` if ``new_depth`` is not larger, or a ``zero``
    suffix names no parameter of a block.
    """
    old_depth = block_depth(state, blocks)
    if new_depth <= old_depth:
        raise ValueError(f"model.init_deepen: the model has {new_depth} blocks under {blocks} but the weights "
                         f"already have {old_depth}; deepening needs more blocks (or drop init_deepen)")
    if not zero:
        raise ValueError("model.init_deepen.zero must list the block parameters that zero a block's output "
                         "(e.g. [attn.proj.weight, mlp.w2.weight]); without them the new blocks change the function")
    block0 = {k[len(f"{blocks}.0."):] for k in state if k.startswith(f"{blocks}.0.")}
    bad = [z for z in zero if z not in block0]
    if bad:
        raise ValueError(f"model.init_deepen.zero names {bad}, which are not parameters of {blocks}.0; "
                         f"they are: {', '.join(sorted(block0))}")
    placed = {i * new_depth // old_depth: i for i in range(old_depth)}
    out = {k: v.clone() for k, v in state.items() if not k.startswith(blocks + ".")}
    source = 0
    for j in range(new_depth):
        fresh = j not in placed
        source = source if fresh else placed[j]
        for name in block0:
            t = state[f"{blocks}.{source}.{name}"].clone()
            out[f"{blocks}.{j}.{name}"] = torch.zeros_like(t) if fresh and name in zero else t
    return out
