"""Self-speculative Jacobi decoding (visar.samplers.jacobi): the output law is the plain sampler's.

Same battery as tests/test_speculative_discrete.py: ~9k images per case from the Markov and the tiny
LlamaGen toys (V = 5, L = 4, CFG with a null class), a chi-square test of the joint against the plain
sampler's exact law at alpha = 1e-3 Bonferroni-split over the cases; planted bugs must fail it.
"""
from __future__ import annotations

import pytest
import torch

from law_battery import MarkovToy, bonferroni, class_joints, law_test, tiny_llamagen
from visar.conditions import Condition
from visar.samplers.autoregressive import AutoregressiveSampler
from visar.samplers.jacobi import JacobiSampler

V, L, CLASSES = 5, 4, 3
TOYS = {"markov": MarkovToy(V, L, CLASSES, seed=0), "llamagen": tiny_llamagen(V, 2, seed=0)}
PER_LABEL = {"markov": 3000, "llamagen": 2000}

# (name, toy, window, options, labels per batch)
CASES = [
    ("markov-plain-w2", "markov", 2, {}, [0, 1, 2]),
    ("markov-cfg-temperature-w3", "markov", 3, dict(cfg_scale=2.5, temperature=0.8), [0, 1, 2]),
    ("markov-topk-w1", "markov", 1, dict(cfg_scale=2.0, top_k=3), [2, 0, 1]),
    ("markov-topp-w>L", "markov", 8, dict(cfg_scale=2.0, top_p=0.85), [1, 2, 0]),
    ("markov-interval-w=L", "markov", L, dict(cfg_scale=3.0, cfg_interval=1, temperature=1.3), [0, 1, 2]),
    ("llamagen-cfg-w3", "llamagen", 3, dict(cfg_scale=2.0, temperature=1.1, top_p=0.95), [0, 1, 2]),
    ("llamagen-topk-interval-w=L", "llamagen", L, dict(cfg_scale=2.5, cfg_interval=0, top_k=3), [2, 1, 0]),
]
ALPHA = bonferroni(1e-3, len(CASES) + 1)  # + the batch-of-one case


def draw(sampler, toy, labels, seed, **options):
    lab = torch.tensor(labels).repeat(PER_LABEL[toy])
    out = sampler(TOYS[toy], Condition.of(lab), torch.Generator().manual_seed(seed), **options)
    return out.flatten(1), lab, sampler.stats


def check_stats(stats, window, batch):
    assert stats["draft_passes"] == 0
    assert stats["target_passes"] == 1 + stats["iterations"] == 1 + stats["rounds"]
    assert stats["tokens_per_target_pass"] == pytest.approx(L / stats["target_passes"])
    assert stats["acceptance_rate"] == pytest.approx(stats["accepted"] / stats["proposed"])
    rows = stats["row_target_passes"] - 1  # iterations of each row
    assert rows.shape == (batch,) and int(rows.max()) == stats["iterations"]
    assert ((rows >= -(-L // (window + 1))) & (rows <= L)).all()
    # every iteration emits its accepted drafts plus one token, except a last one that completes the
    # image on accepted drafts alone
    extra = stats["row_accepted"] + rows - L
    assert ((extra == 0) | (extra == 1)).all()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_output_law_is_the_plain_samplers(case):
    name, toy, window, options, labels = case
    tokens, lab, stats = draw(JacobiSampler(window=window), toy, labels, seed=CASES.index(case), **options)
    gof = law_test(tokens, lab, class_joints(TOYS[toy], labels, L, **options), V)
    assert gof.pvalue > ALPHA, (name, gof)
    check_stats(stats, window, len(lab))


def test_batch_of_one():
    sampler, markov = JacobiSampler(window=2), TOYS["markov"]
    g = torch.Generator().manual_seed(11)
    rows = [sampler(markov, Condition.of([1]), g, cfg_scale=2.0).flatten(1) for _ in range(400)]
    check_stats(sampler.stats, 2, 1)
    gof = law_test(torch.cat(rows), torch.ones(400, dtype=torch.long), class_joints(markov, [1], L, cfg_scale=2.0), V)
    assert gof.pvalue > ALPHA, gof


class ResidualFromTarget(JacobiSampler):
    """Bug: the correction after a rejection is drawn from p instead of (p - q)+."""

    def _residual(self, p, q):
        return p.double()


class NoRollback(JacobiSampler):
    """Bug: the cache keeps the rejected draft where the correction belongs."""

    def _rollback(self, feeder, position, target):
        pass


@pytest.mark.parametrize("bug", [ResidualFromTarget, NoRollback], ids=lambda b: b.__name__)
def test_planted_bugs_fail_the_law_test(bug):
    options = dict(cfg_scale=3.0, temperature=1.2)
    tokens, lab, _ = draw(bug(window=3), "markov", [0, 1, 2], seed=5, **options)
    assert law_test(tokens, lab, class_joints(TOYS["markov"], [0, 1, 2], L, **options), V).pvalue < ALPHA


@pytest.mark.parametrize("window", [1, 5, 16])
def test_greedy_equals_the_plain_sampler(window):
    target = tiny_llamagen(64, 4, seed=3, dim=64, head_std=0.3, classes=5)
    cond = Condition.of([0, 1, 2, 3, 4, 0])
    plain = AutoregressiveSampler()(target, cond, torch.Generator().manual_seed(0), cfg_scale=2.0, top_k=1)
    sampler = JacobiSampler(window=window)
    assert torch.equal(sampler(target, cond, torch.Generator().manual_seed(1), cfg_scale=2.0, top_k=1), plain)
    check_stats_16 = sampler.stats
    assert check_stats_16["iterations"] <= 16 and check_stats_16["tokens"] == 16
    assert sampler(target, Condition.of([2]), num_tokens=5).shape == (1, 5)


def test_bad_window_fails_early():
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        JacobiSampler(window=0)
    with pytest.raises(TypeError, match="window must be an integer"):
        JacobiSampler(window=2.0)
    with pytest.raises(TypeError, match="has no option 'k'"):
        JacobiSampler(k=3)
    with pytest.raises(ValueError, match="window"):
        JacobiSampler()(TOYS["markov"], Condition.of([0]), window=-2)
