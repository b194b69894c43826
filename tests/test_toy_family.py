"""A new family and a new sampler added through the public interfaces only (docs/architecture.md).

The toy family is a class-conditional bigram model over a 6-token vocabulary that implements the
next-token step protocol (:class:`visar.generators.protocol.NextTokenModel`); the toy sampler is a
greedy decoder written against the same protocol. Both plug into the Pipeline with no change to visar.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from visar.conditions import Condition
from visar.generators.base import Generator
from visar.generators.protocol import NextTokenModel, StepState
from visar.nn.guidance import cfg_mix, is_guided
from visar.pipeline import Pipeline
from visar.registry import get, names, register
from visar.samplers.base import Sampler, get_sampler
from visar.tokenizers.base import Tokenizer

V, SIDE, CLASSES = 6, 2, 3


class ToyTokenizer(Tokenizer):
    """Token ``i`` decodes to a flat grey level; 4 px per token side."""

    kind, downsample, vocab_size = "discrete", 4, V

    def encode(self, images):
        return ((images[:, 0, ::4, ::4] + 1) / 2 * (V - 1)).round().long()

    def decode(self, tokens):
        x = tokens.float() / (V - 1) * 2 - 1  # [B, h, w]
        return x.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, None].expand(-1, 3, -1, -1)


@dataclass
class BigramState(StepState):
    tokens: torch.Tensor = None  # [R, L] fed tokens
    lengths: torch.Tensor = None  # [R] committed tokens per row
    labels: torch.Tensor = None  # [R] class ids (null = CLASSES)


class BigramGenerator(Generator):
    """logits of token ``t`` = ``table[label, previous token]`` (a start symbol for token 0)."""

    family, token_kind, emits, default_sampler = "toy-bigram", "discrete", "logits", "autoregressive"

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(3 * torch.randn(CLASSES + 1, V + 1, V, generator=g))
        self.num_classes, self.num_tokens, self.vocab_size, self.grid_size = CLASSES, SIDE * SIDE, V, SIDE
        self.config = {"seed": seed}

    def loss(self, tokens, cond):
        raise NotImplementedError

    def start(self, cond: Condition, guided: bool = False):
        labels = cond.labels
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, CLASSES)])
        R = labels.shape[0]
        state = BigramState(batch=cond.batch_size, guided=guided, tokens=torch.zeros(R, self.num_tokens, dtype=torch.long),
                            lengths=torch.zeros(R, dtype=torch.long), labels=labels)
        return state, self.table[labels, V].detach()  # [R, V]: start symbol V

    def step(self, state, inputs, pos):
        R = state.rows
        if inputs.shape[0] != R:
            inputs = inputs.repeat(R // inputs.shape[0], 1)
        pos = torch.as_tensor(pos).expand(R) if torch.as_tensor(pos).dim() == 0 else torch.as_tensor(pos)
        if pos.shape[0] != R:
            pos = pos.repeat(R // pos.shape[0])
        n = inputs.shape[1]
        for j in range(n):
            state.tokens[torch.arange(R), pos + j] = inputs[:, j]
        state.lengths = pos + n
        return self.table[state.labels[:, None], inputs].detach()  # [R, n, V]

    def rewind(self, state, n):
        state.lengths = state.lengths - torch.as_tensor(n)


@register("sampler", "toy-greedy")
class GreedySampler(Sampler):
    """Greedy decoding with guidance: the argmax of the guided logits at every position."""

    name, protocol = "toy-greedy", NextTokenModel
    defaults = {"cfg_scale": 1.0}

    def run(self, model, cond, generator, cfg_scale):
        B, guided = cond.batch_size, is_guided(cfg_scale)
        state, logits = model.start(cond, guided)
        out = torch.empty(B, model.num_tokens, dtype=torch.long)
        for t in range(model.num_tokens):
            if t:
                logits = model.step(state, out[:, t - 1:t], t - 1)[:, 0]
            mixed = cfg_mix(logits[:B], logits[B:], cfg_scale) if guided else logits
            out[:, t] = mixed.argmax(-1)
        self.stats = {"model_passes": model.num_tokens}
        return out.view(B, SIDE, SIDE)


def test_toy_family_through_the_pipeline_with_two_samplers():
    pipe = Pipeline(ToyTokenizer(), BigramGenerator())
    assert pipe.sampler.name == "autoregressive"
    labels = [0, 1, 2, 1]
    a = pipe.generate(labels, seed=3, cfg_scale=2.0)
    assert a.shape == (4, 3, 8, 8) and torch.equal(a, pipe.generate(labels, seed=3, cfg_scale=2.0))
    greedy = pipe.generate(labels, seed=3, sampler="toy-greedy", cfg_scale=2.0)
    # the plain sampler with top_k=1 is greedy decoding too: the two samplers agree
    top1 = pipe.generate(labels, seed=5, cfg_scale=2.0, top_k=1)
    assert torch.equal(greedy, top1)
    assert "toy-greedy" in names("sampler") and get("sampler", "toy-greedy") is GreedySampler
    # a sampler object works the same as its name, and options go to the call
    images = pipe(labels, sampler=GreedySampler(cfg_scale=2.0))
    assert len(images) == 4 and images[0].size == (8, 8)


def test_the_plain_sampler_draws_the_toy_models_law():
    """Token 0 of class 1 follows softmax(table[1, start]) (500 draws, within 5 standard errors)."""
    gen = BigramGenerator()
    sampler = get_sampler("autoregressive")
    draws = sampler(gen, Condition.of([1] * 500), torch.Generator().manual_seed(0))[:, 0, 0]
    p = torch.softmax(gen.table[1, V].detach(), -1)
    freq = torch.bincount(draws, minlength=V).float() / 500
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / 500).sqrt() + 1e-3).all()
    assert sampler.stats["model_passes"] == gen.num_tokens


def test_wrong_family_and_unknown_options_fail_early():
    pipe = Pipeline(ToyTokenizer(), BigramGenerator())
    with pytest.raises(TypeError, match="cfg_scale"):
        pipe.generate([0], cfg=2.0)
    with pytest.raises(KeyError, match="unknown sampler"):
        pipe.generate([0], sampler="no-such-sampler")
    with pytest.raises(TypeError, match="drives"):
        pipe.generate([0], sampler="masked")
    with pytest.raises(TypeError, match="Pipeline\\(tokenizer, generator\\)"):
        Pipeline(BigramGenerator(), ToyTokenizer())
