"""CTF training: a few optimiser steps on a toy token dataset lower both stage losses."""
from __future__ import annotations

import torch

from visar.generators.base import Condition
from visar.generators.coarse_to_fine.ctf import CoarseToFineGenerator
from visar.generators.coarse_to_fine.kmeans import build_cluster_map

V, M, K, G = 64, 8, 4, 4


def _toy_batch(n: int, gen: torch.Generator, patterns: torch.Tensor) -> tuple[torch.Tensor, Condition]:
    """Class ``k`` -> its fixed token grid, with 10% of the tokens replaced by random codewords."""
    labels = torch.randint(K, (n,), generator=gen)
    tokens = patterns[labels].clone()
    noise = torch.rand(tokens.shape, generator=gen) < 0.1
    tokens[noise] = torch.randint(V, (int(noise.sum()),), generator=gen)
    return tokens, Condition.of(labels)


def test_a_few_steps_reduce_both_losses():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    patterns = torch.randint(V, (K, G, G), generator=gen)
    model = CoarseToFineGenerator(vocab_size=V, num_clusters=M, num_classes=K, grid_size=G,
                                  coarse=dict(dim=32, depth=2, num_heads=2),
                                  aux=dict(dim=32, depth=2, num_heads=2, ffn_hidden=64))
    model.set_clusters(*build_cluster_map(torch.randn(V, 8, generator=gen), M, seed=0, iters=10))
    eval_tokens, eval_cond = _toy_batch(32, torch.Generator().manual_seed(1), patterns)

    def held_out():
        model.eval()
        with torch.no_grad():
            d = model.loss_dict(eval_tokens, eval_cond)
        model.train()
        return {k: float(v) for k, v in d.items()}

    before = held_out()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(40):
        tokens, cond = _toy_batch(16, gen, patterns)
        loss = model.loss(tokens, cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = held_out()
    assert after["coarse"] < 0.6 * before["coarse"], (before, after)
    assert after["fine"] < 0.6 * before["fine"], (before, after)
    assert abs(after["loss"] - after["coarse"] - after["fine"]) < 1e-5
