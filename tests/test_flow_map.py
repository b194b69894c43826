"""Distilled Decoding's teacher map (visar.samplers.flow_map): law-preserving, deterministic, prefix-consistent."""
from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from visar import zoo
from visar.conditions import Condition
from visar.samplers.autoregressive import guided_logits
from visar.samplers.flow_map import FlowMapSampler, flow_map
from visar.samplers.logits import process_logits

ALPHA = 1e-3
P6 = torch.tensor([0.4, 0.2, 0.15, 0.1, 0.1, 0.05], dtype=torch.float64)


def _counts(tokens: torch.Tensor, V: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=V).double()


def _gof_pvalue(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Chi-square p-value of ``counts`` against ``expected`` (same total); cells expecting < 5 are pooled.
    Asserts first that nothing fell outside the support (cells expecting 0)."""
    keep = expected > 0
    assert counts[~keep].sum() == 0, "samples outside the support"
    e, c = expected[keep], counts[keep]
    big = e >= 5
    obs, exp = c[big], e[big]
    if (~big).any():
        obs, exp = torch.cat([obs, c[~big].sum()[None]]), torch.cat([exp, e[~big].sum()[None]])
    return chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_heun_16_preserves_the_law_and_coarse_euler_does_not(seed):
    g = torch.Generator().manual_seed(seed)
    V, C, n = 6, 4, 50_000
    codebook = torch.randn(V, C, generator=g)
    noise = torch.randn(n, C, generator=g)
    probs = P6.expand(n, V)
    heun = _counts(flow_map(noise, probs, codebook), V)
    assert chisquare(heun.numpy(), (P6 * n).numpy()).pvalue > ALPHA / 3  # Bonferroni over the three codebooks
    euler = _counts(flow_map(noise, probs, codebook, steps=16, solver="euler"), V)
    assert chisquare(euler.numpy(), (P6 * n).numpy()).pvalue < 1e-6  # over-selects likely tokens


def test_support_and_determinism():
    g = torch.Generator().manual_seed(3)
    codebook = torch.randn(6, 4, generator=g)
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0, 0.0]], dtype=torch.float64).expand(2000, 6)
    noise = torch.randn(2000, 4, generator=g)
    tok = flow_map(noise, probs, codebook)
    assert set(tok.tolist()) <= {1, 3}
    assert torch.equal(tok, flow_map(noise.clone(), probs, codebook))
    one_hot = torch.zeros(5, 6, dtype=torch.float64)
    one_hot[:, 2] = 1
    assert (flow_map(torch.randn(5, 4, generator=g), one_hot, codebook) == 2).all()


def _tiny(vocab=6, seed=0):
    torch.manual_seed(seed)
    m = zoo.create("llamagen-gpt-tiny", vocab_size=vocab, grid_size=2, num_classes=3).eval()
    torch.nn.init.normal_(m.head.weight, std=0.5)  # LlamaGen starts the logits head at zero
    return m


def _exact_joint(m, label, opts):
    """Processed joint law of the first two tokens of the plain sampler, by enumeration: ``[V, V]``."""
    V = m.vocab_size
    cond = Condition.of([label] * V)
    null = Condition.of([m.null_class] * V)
    seqs = torch.stack([torch.arange(V), torch.zeros(V, dtype=torch.long)], 1)  # token 0 = i, token 1 unused
    with torch.no_grad():
        lc, lu = m(seqs, cond), m(seqs, null)  # [V, 2, V]
    p = []
    for t in range(2):
        both = torch.cat([lc[:, t], lu[:, t]])
        logits = guided_logits(both, V, opts["cfg_scale"], t)
        p.append(torch.softmax(process_logits(logits, opts["temperature"], opts["top_k"], 1.0), -1).double())
    return p[0][0][:, None] * p[1]  # p(x0) p(x1 | x0)


@pytest.mark.parametrize("opts", [dict(cfg_scale=1.0, temperature=1.0, top_k=0),
                                  dict(cfg_scale=3.0, temperature=0.8, top_k=4)])
def test_sequence_map_reproduces_the_models_joint(opts):
    m, V, n = _tiny(), 6, 20_000
    codebook = torch.randn(V, 4, generator=torch.Generator().manual_seed(5))
    out = FlowMapSampler(codebook=codebook)(m, Condition.of([1] * n), torch.Generator().manual_seed(0),
                                            num_tokens=2, **opts)
    counts = torch.bincount(out[:, 0] * V + out[:, 1], minlength=V * V).double()
    assert _gof_pvalue(counts, (_exact_joint(m, 1, opts) * n).flatten()) > ALPHA / 2


def test_same_noise_same_image_and_prefix_consistency():
    m = _tiny()
    codebook = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    s = FlowMapSampler(codebook=codebook, cfg_scale=2.0)
    noise = torch.randn(8, 4, 4, generator=torch.Generator().manual_seed(1))
    a = s(m, Condition.of([0, 1, 2, 0, 1, 2, 0, 1]), noise=noise).flatten(1)
    assert torch.equal(a, s(m, Condition.of([0, 1, 2, 0, 1, 2, 0, 1]), noise=noise.clone()).flatten(1))
    for j in range(4):
        changed = noise.clone()
        changed[:, j] = torch.randn(8, 4, generator=torch.Generator().manual_seed(10 + j))
        b = s(m, Condition.of([0, 1, 2, 0, 1, 2, 0, 1]), noise=changed).flatten(1)
        assert torch.equal(a[:, :j], b[:, :j])  # tokens before j never depend on later noise


def test_flow_map_sampler_bad_input():
    m = _tiny()
    cb = torch.randn(6, 4)
    with pytest.raises(ValueError, match="codebook"):
        FlowMapSampler()(m, Condition.of([0]))
    with pytest.raises(ValueError, match=r"noise must be a float tensor \[B, L, C\]"):
        FlowMapSampler(codebook=cb)(m, Condition.of([0]), noise=torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="codebook has 7 vectors"):
        FlowMapSampler(codebook=torch.randn(7, 4))(m, Condition.of([0]))
    with pytest.raises(ValueError, match="num_flow_steps"):
        FlowMapSampler(codebook=cb, num_flow_steps=0)(m, Condition.of([0]))
    with pytest.raises(ValueError, match="probs must be"):
        flow_map(torch.randn(2, 4), torch.full((2, 6), 0.5, dtype=torch.float64), cb)
    with pytest.raises(ValueError, match="shapes disagree"):
        flow_map(torch.randn(2, 3), torch.full((2, 6), 1 / 6), cb)


def _var_tiny():
    torch.manual_seed(0)
    m = zoo.create("var-tiny").eval()
    m.bind_tokenizer(zoo.create("var-vqvae-tiny"))
    return m


def test_next_scale_flow_map_reproduces_vars_first_scale_law_and_is_prefix_consistent():
    from visar.samplers.flow_map import NextScaleFlowMapSampler

    m, n = _var_tiny(), 3_000
    record = {}
    s = NextScaleFlowMapSampler(cfg_scale=3.0, top_k=20)
    out = s(m, Condition.of([2] * n), torch.Generator().manual_seed(0), record=record)
    p = torch.softmax(record["filtered_logits"][0][0, 0].double(), -1)  # scale 0: one token, same law per row
    counts = torch.bincount(out[0].flatten(), minlength=p.numel()).double()
    assert _gof_pvalue(counts, p * n) > ALPHA
    # noise of scale 2 changes nothing at scales 0 and 1
    L, C = sum(pn * pn for pn in m.scales), m.quantizer.embedding.weight.shape[1]
    noise = torch.randn(4, L, C, generator=torch.Generator().manual_seed(1))
    a = s(m, Condition.of([0, 1, 2, 3]), noise=noise)
    changed = noise.clone()
    changed[:, 5:14] = torch.randn(4, 9, C, generator=torch.Generator().manual_seed(2))  # scale 2 (3x3) = tokens 5..13
    b = s(m, Condition.of([0, 1, 2, 3]), noise=changed)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(x, y) for x, y in zip(a, s(m, Condition.of([0, 1, 2, 3]), noise=noise.clone())))
    with pytest.raises(ValueError, match="more_smooth"):
        s(m, Condition.of([0]), more_smooth=True)
