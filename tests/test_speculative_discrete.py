"""Lossless speculative decoding (visar.samplers.speculative): the output law is the plain sampler's.

Each law case draws ~9k images in big batches from a toy target (an order-2 Markov table or a 2-layer
random LlamaGen with a KV cache, V = 5, L = 4, CFG with a null class) and a toy draft, and runs a
chi-square test of the joint (class x sequence, 625 cells per class, pooled to expected >= 5) against the
exact law of the plain sampler with the same options, at alpha = 1e-3 Bonferroni-split over the cases.
The counted target passes and accepted drafts per image must match their exact expectations (|z| < 4).
Planted-bug variants of the sampler must fail the same test.
"""
from __future__ import annotations

import pytest
import torch

from law_battery import (MarkovToy, all_sequences, bonferroni, class_joints, law_test, mean_z, perturbed,
                         plain_laws, prefix_laws, speculative_cost, tiny_llamagen)
from visar.conditions import Condition
from visar.registry import get, names
from visar.samplers.autoregressive import AutoregressiveSampler
from visar.samplers.base import get_sampler
from visar.samplers.speculative import SpeculativeSampler

V, L, CLASSES = 5, 4, 3
MARKOV = MarkovToy(V, L, CLASSES, seed=0)
MARKOV_DRAFT = MarkovToy(V, L, CLASSES, seed=1, base=MARKOV, noise=1.0)
LLAMA = tiny_llamagen(V, 2, seed=0)
TOYS = {"markov": (MARKOV, MARKOV_DRAFT), "llamagen": (LLAMA, perturbed(LLAMA, 0.4, seed=1)),
        "llamagen-small-draft": (LLAMA, tiny_llamagen(V, 2, seed=1, dim=16))}

# (name, toy, k, options, draft_options, labels per batch, batches)
CASES = [
    ("markov-plain-k2", "markov", 2, {}, None, [0, 1, 2], 1),
    ("markov-cfg-temperature-k3", "markov", 3, dict(cfg_scale=2.5, temperature=0.8), None, [0, 1, 2], 1),
    ("markov-topk-k1", "markov", 1, dict(cfg_scale=2.0, top_k=3), None, [2, 0, 1], 1),
    ("markov-topp-k=L", "markov", L, dict(cfg_scale=2.0, top_p=0.85), None, [1, 2, 0], 1),
    ("markov-k>L", "markov", 7, dict(temperature=1.3), None, [0, 1, 2], 1),
    ("markov-interval-own-draft-options", "markov", 2, dict(cfg_scale=3.0, cfg_interval=1),
     dict(cfg_scale=1.0, temperature=1.2, top_k=4), [0, 1, 2], 1),
    ("llamagen-cfg-k3", "llamagen", 3, dict(cfg_scale=2.0, temperature=1.1, top_p=0.95), None, [0, 1, 2], 1),
    ("llamagen-topk-k1", "llamagen-small-draft", 1, dict(top_k=3), None, [2, 1, 0], 1),
    ("llamagen-interval-k=L", "llamagen", L, dict(cfg_scale=2.5, cfg_interval=0), None, [0, 1, 2], 1),
]
ALPHA = bonferroni(1e-3, len(CASES) + 1)  # + the batch-of-one case
PER_LABEL = {"markov": 3000, "llamagen": 2000, "llamagen-small-draft": 2000}  # 9000 / 6000 images per case


def draw(sampler, toy, labels, per_label, seed, **options):
    """``per_label`` images of each of ``labels`` in one batch: ``(tokens [N, L], labels [N], stats)``."""
    lab = torch.tensor(labels).repeat(per_label)
    out = sampler(toy, Condition.of(lab), torch.Generator().manual_seed(seed), **options)
    return out.flatten(1), lab, sampler.stats


def expected_costs(target, draft, labels, k, options, draft_options):
    """Exact ``{label: (E[target passes], E[accepted])}`` per image (the prefill counts one pass)."""
    seqs = all_sequences(V, L)
    dopts = {**options, **(draft_options or {})}
    out = {}
    for c in labels:
        p = prefix_laws(plain_laws(target, seqs, c, **options), seqs)
        q = prefix_laws(plain_laws(draft, seqs, c, **dopts), seqs)
        rounds, accepted = speculative_cost(p, q, L, k)
        out[c] = (1 + rounds, accepted)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_output_law_and_cost_are_exact(case):
    name, toy, k, options, draft_options, labels, _ = case
    target, draft = TOYS[toy]
    sampler = SpeculativeSampler(draft=draft, k=k, draft_options=draft_options)
    tokens, lab, stats = draw(sampler, target, labels, PER_LABEL[toy], seed=CASES.index(case), **options)
    gof = law_test(tokens, lab, class_joints(target, labels, L, **options), V)
    assert gof.pvalue > ALPHA, (name, gof)
    exp = expected_costs(target, draft, labels, k, options, draft_options)
    z_pass = mean_z(stats["row_target_passes"], torch.tensor([exp[int(c)][0] for c in lab]))
    z_acc = mean_z(stats["row_accepted"], torch.tensor([exp[int(c)][1] for c in lab]))
    assert abs(z_pass) < 4 and abs(z_acc) < 4, (name, z_pass, z_acc)
    # bookkeeping: every round emits its accepted drafts plus one token, except a last round that
    # completes the image on accepted drafts alone
    extra = stats["row_accepted"] + stats["row_target_passes"] - 1 - L
    assert ((extra == 0) | (extra == 1)).all()
    assert stats["target_passes"] == 1 + stats["rounds"] == int(stats["row_target_passes"].max())
    assert stats["acceptance_rate"] == pytest.approx(stats["accepted"] / stats["proposed"])
    assert stats["tokens_per_target_pass"] == pytest.approx(L / stats["target_passes"])
    assert stats["draft_passes"] <= stats["rounds"] * k


def test_batch_of_one():
    sampler = SpeculativeSampler(draft=MARKOV_DRAFT, k=2)
    g = torch.Generator().manual_seed(11)
    rows = [sampler(MARKOV, Condition.of([1]), g, cfg_scale=2.0).flatten(1) for _ in range(400)]
    assert sampler.stats["target_passes"] == 1 + sampler.stats["rounds"]
    gof = law_test(torch.cat(rows), torch.ones(400, dtype=torch.long), class_joints(MARKOV, [1], L, cfg_scale=2.0), V)
    assert gof.pvalue > ALPHA, gof


# -- planted bugs: the same test must reject them ---------------------------------------------------


class ResidualFromTarget(SpeculativeSampler):
    """Bug: the correction after a rejection is drawn from p instead of (p - q)+."""

    def _residual(self, p, q):
        return p.double()


class NoTargetRollback(SpeculativeSampler):
    """Bug: the target's cache is not rolled back after a rejection (the rejected token's K/V and the
    logits that followed it are reused)."""

    def _rollback(self, feeder, position, target):
        if not target:
            feeder.forget_from(position)


class UnguidedDraftRatio(SpeculativeSampler):
    """Bug: the draft samples from its guided law but the ratio uses its unguided (conditional) law."""

    def _ratio_law(self, drawn, raw, token_index, options):
        from visar.samplers.acceptance import processed_laws

        B = drawn.shape[0]
        return processed_laws(raw[:B], B, token_index, **options)


class AdvanceByK(SpeculativeSampler):
    """Bug: every round advances by k + 1 tokens whatever was accepted."""

    def _emitted(self, n, accepted, proposed, length):
        return torch.minimum(proposed + 1, length - n)


@pytest.mark.parametrize("bug", [ResidualFromTarget, NoTargetRollback, UnguidedDraftRatio, AdvanceByK],
                         ids=lambda b: b.__name__)
def test_planted_bugs_fail_the_law_test(bug):
    options = dict(cfg_scale=3.0, temperature=1.2)
    tokens, lab, _ = draw(bug(draft=MARKOV_DRAFT, k=2), MARKOV, [0, 1, 2], PER_LABEL["markov"], seed=5, **options)
    gof = law_test(tokens, lab, class_joints(MARKOV, [0, 1, 2], L, **options), V)
    assert gof.pvalue < ALPHA, gof
    # the honest sampler passes on the same case
    honest = SpeculativeSampler(draft=MARKOV_DRAFT, k=2)
    tokens, lab, _ = draw(honest, MARKOV, [0, 1, 2], PER_LABEL["markov"], seed=5, **options)
    assert law_test(tokens, lab, class_joints(MARKOV, [0, 1, 2], L, **options), V).pvalue > ALPHA


# -- greedy, pipeline, folders, bad input ------------------------------------------------------------

def big_pair():
    target = tiny_llamagen(64, 4, seed=3, dim=64, head_std=0.3, classes=5)
    draft = tiny_llamagen(64, 4, seed=4, dim=32, head_std=0.3, classes=5)
    return target, draft


@pytest.mark.parametrize("k", [1, 3, 16])
def test_greedy_equals_the_plain_sampler(k):
    target, draft = big_pair()
    cond = Condition.of([0, 1, 2, 3, 4, 0])
    plain = AutoregressiveSampler()(target, cond, torch.Generator().manual_seed(0), cfg_scale=2.0, top_k=1)
    for d, dopts in ((draft, None), (draft, dict(top_k=0, cfg_scale=1.0)), (target, None)):
        s = SpeculativeSampler(draft=d, k=k, draft_options=dopts)
        out = s(target, cond, torch.Generator().manual_seed(1), cfg_scale=2.0, top_k=1)
        assert torch.equal(out, plain)
    assert s.stats["acceptance_rate"] == 1.0  # the target drafting for itself


class ProtocolOnly:
    """A model seen only through ``NextTokenModel`` (no ``decode_step``, ``vocab_size`` or ``grid_size``)."""

    emits = "logits"

    def __init__(self, model):
        self.model, self.num_tokens = model, model.num_tokens

    def start(self, cond, guided=False):
        return self.model.start(cond, guided)

    def step(self, state, inputs, pos):
        return self.model.step(state, inputs, pos)

    def rewind(self, state, n):
        self.model.rewind(state, n)


def test_any_next_token_model_works():
    target, draft = big_pair()
    cond = Condition.of([4, 2, 0])
    plain = AutoregressiveSampler()(target, cond, cfg_scale=1.5, top_k=1).flatten(1)
    s = SpeculativeSampler(draft=ProtocolOnly(draft), k=3)
    assert torch.equal(s(ProtocolOnly(target), cond, cfg_scale=1.5, top_k=1), plain)
    with pytest.raises(ValueError, match="draft emits 32 logits"):
        SpeculativeSampler(draft=ProtocolOnly(tiny_llamagen(32, 4, seed=0, classes=5)))(ProtocolOnly(target), cond)


def test_prefix_and_output_shapes():
    target, draft = big_pair()
    s = SpeculativeSampler(draft=draft, k=3)
    assert s(target, Condition.of([1, 2]), num_tokens=7).shape == (2, 7)
    assert s(target, Condition.of([1]), progress=True).shape == (1, 4, 4)
    assert s.stats["tokens"] == 16


def test_through_the_pipeline_and_the_registry():
    import visar

    pipe = visar.load("shapes-llamagen")
    g = pipe.generator
    draft = tiny_llamagen(g.vocab_size, g.grid_size, seed=0, dim=32, head_std=0.3, classes=g.num_classes)
    greedy = pipe.generate([3], seed=0, top_k=1)
    sampler = SpeculativeSampler(draft=draft, k=2)
    assert torch.equal(pipe.generate([3], seed=1, sampler=sampler, top_k=1), greedy)
    assert sampler.stats["target_passes"] == 1 + sampler.stats["rounds"]
    assert torch.equal(pipe.generate([3], seed=1, sampler="jacobi", window=8, top_k=1), greedy)
    assert "speculative" in names("sampler") and get("sampler", "speculative") is SpeculativeSampler


def test_draft_from_a_folder(tmp_path):
    target, draft = big_pair()
    draft.save_pretrained(tmp_path, "generator")
    by_folder = get_sampler("speculative", draft=str(tmp_path), k=2)
    by_object = SpeculativeSampler(draft=draft, k=2)
    cond = Condition.of([1, 4])
    a = by_folder(target, cond, torch.Generator().manual_seed(2), cfg_scale=2.0)
    assert torch.equal(a, by_object(target, cond, torch.Generator().manual_seed(2), cfg_scale=2.0))
    assert by_folder.stats["draft_passes"] == by_object.stats["draft_passes"]
    with pytest.raises(FileNotFoundError, match="generator.json"):
        SpeculativeSampler(draft=str(tmp_path / "missing"))


def test_bad_input_fails_early():
    target, draft = big_pair()
    other_vocab = tiny_llamagen(32, 4, seed=0, classes=5)
    other_grid = tiny_llamagen(64, 2, seed=0, classes=5)
    cond = Condition.of([0])
    for bad in (other_vocab, other_grid):
        with pytest.raises(ValueError, match="same tokenizer"):
            SpeculativeSampler(draft=bad, k=2)(target, cond)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        SpeculativeSampler(draft=draft, k=0)
    for k in (2.5, True, "4"):
        with pytest.raises(TypeError, match="k must be an integer"):
            SpeculativeSampler(draft=draft, k=k)
    with pytest.raises(ValueError, match="k must be"):
        SpeculativeSampler(draft=draft)(target, cond, k=-1)
    from visar import zoo

    for not_a_draft in (object(), zoo.create("mar-ar-tiny")):
        with pytest.raises(TypeError, match="draft must be a next-token generator that emits logits"):
            SpeculativeSampler(draft=not_a_draft)
    with pytest.raises(TypeError, match="needs a draft model"):
        SpeculativeSampler(k=2)(target, cond)
    with pytest.raises(TypeError, match="draft_options: option 'cfg' is now called 'cfg_scale'"):
        SpeculativeSampler(draft=draft, draft_options=dict(cfg=2.0))
    with pytest.raises(ValueError, match="temperature"):
        SpeculativeSampler(draft=draft, draft_options=dict(temperature=0.0))
    with pytest.raises(TypeError, match="drives"):
        SpeculativeSampler(draft=draft)(zoo.create("mar-tiny"), cond)
