"""The AR sampler (visar.samplers.autoregressive) on random tiny LlamaGen models."""
from __future__ import annotations

import pytest
import torch

from visar.generators.base import Condition
from visar.generators.next_token.llamagen import NextTokenGenerator
from visar.samplers.autoregressive import guided_logits, sample_autoregressive, sample_autoregressive_naive


def tiny(seed: int = 0, **kw) -> NextTokenGenerator:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, dim=64, depth=2, num_heads=2, grid_size=4, num_classes=5)
    cfg.update(kw)
    m = NextTokenGenerator(**cfg).eval()
    with torch.no_grad():
        torch.nn.init.normal_(m.head.weight, std=0.3)
        for blk in m.trunk.blocks:
            torch.nn.init.normal_(blk.attn.qkv.weight, std=0.2)
    return m


SETTINGS = [
    dict(cfg_scale=1.0),
    dict(cfg_scale=3.0),
    dict(cfg_scale=2.0, cfg_interval=4, temperature=0.8, top_k=20, top_p=0.9),
    dict(cfg_scale=0.5, top_k=1),
]


@pytest.mark.parametrize("opts", SETTINGS)
def test_cached_equals_uncached(opts):
    m = tiny()
    cond = Condition.of([0, 2, 4])
    a = sample_autoregressive(m, cond, generator=torch.Generator().manual_seed(7), **opts)
    b = sample_autoregressive_naive(m, cond, generator=torch.Generator().manual_seed(7), **opts)
    assert torch.equal(a, b)


def test_cached_equals_uncached_text():
    m = tiny(caption_dim=16, cls_token_num=8)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, 5, 16, generator=g)  # 5 < 8 tokens: left padded inside
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.float)
    cond = Condition(text=text, text_mask=mask)
    a = sample_autoregressive(m, cond, generator=torch.Generator().manual_seed(3), cfg_scale=4.0)
    b = sample_autoregressive_naive(m, cond, generator=torch.Generator().manual_seed(3), cfg_scale=4.0)
    assert torch.equal(a, b)


def test_seeded_runs_reproduce():
    m = tiny()
    cond = Condition.of([1, 1, 1, 1])
    a = m.sample(cond, generator=torch.Generator().manual_seed(5), cfg_scale=2.0)
    b = m.sample(cond, generator=torch.Generator().manual_seed(5), cfg_scale=2.0)
    c = m.sample(cond, generator=torch.Generator().manual_seed(6), cfg_scale=2.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (4, 4, 4) and int(a.min()) >= 0 and int(a.max()) < 64


def test_no_unconditional_half_without_guidance():
    m = tiny()
    state, logits = m.start(Condition.of([0, 1]), guided=False)
    assert state.rows == 2 and logits.shape == (2, 64) and not state.guided
    state, logits = m.start(Condition.of([0, 1]), guided=True)
    assert state.rows == 4 and logits.shape == (4, 64) and state.guided


def test_cfg_interval_off_by_one():
    """LlamaGen: token t >= 1 comes from decode step t - 1, unguided when t - 1 > cfg_interval."""
    cond, uncond = torch.ones(2, 3), torch.zeros(2, 3)
    raw = torch.cat([cond, uncond])
    for t in range(16):
        out = guided_logits(raw, 2, 4.0, t, cfg_interval=7)
        assert torch.equal(out, cond * (4.0 if t <= 8 else 1.0)), t
        assert torch.equal(guided_logits(raw, 2, 4.0, t, cfg_interval=-1), cond * 4.0)
    assert torch.equal(guided_logits(cond, 2, 4.0, 3), cond)  # no unconditional rows


def test_partial_length_and_progress():
    m = tiny()
    out = sample_autoregressive(m, Condition.of([3]), num_tokens=5, progress=True)
    assert out.shape == (1, 5)
    with pytest.raises(ValueError, match="num_tokens"):
        sample_autoregressive(m, Condition.of([3]), num_tokens=17)


@pytest.mark.slow
def test_compiled_step_matches_eager():
    """One small torch.compile smoke test: the compiled decode step samples the same tokens.

    Slow: a cold inductor compile takes 18-90 s on the shared 2-core CPU (run with ``-m slow``).
    """
    m = tiny()
    cond = Condition.of([0, 3])
    eager = m.sample(cond, generator=torch.Generator().manual_seed(1), cfg_scale=2.0)
    compiled = m.sample(cond, generator=torch.Generator().manual_seed(1), cfg_scale=2.0, compile=True)
    assert torch.equal(eager, compiled)
