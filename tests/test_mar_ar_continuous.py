"""Causal continuous next-token generator: cache == no cache, step/rewind, training, errors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from visar.generators.base import Condition
from visar.generators.next_token.continuous import NextTokenContinuousGenerator


def tiny(**kw) -> NextTokenContinuousGenerator:
    torch.manual_seed(0)
    m = NextTokenContinuousGenerator(**{**dict(token_channels=4, grid_size=4, dim=32, depth=2, num_heads=2,
                                               num_classes=5, head_width=32, head_depth=1,
                                               num_sampling_steps=5), **kw})
    # the head's output layer starts at zero (MAR init): give it weights so z matters in the tests
    for mod in m.head.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=0.05)
    return m.eval()


def test_step_matches_teacher_forcing():
    m = tiny()
    x = torch.randn(3, 16, 4)
    cond = Condition.of([0, 1, 4])
    with torch.no_grad():
        full = m(x, cond)  # [B, L, D]
        state, z0 = m.start(cond)
        zs = [z0[:, None]]
        for i in range(0, 15, 5):  # chunks of several tokens at once
            zs.append(m.step(state, x[:, i:i + 5], i))
    torch.testing.assert_close(torch.cat(zs, 1)[:, :16], full, atol=1e-5, rtol=1e-5)
    assert state.token_lengths.tolist() == [15, 15, 15]


@pytest.mark.parametrize("cfg,schedule", [(1.0, "constant"), (2.5, "linear")])
def test_cached_sampling_equals_uncached(cfg, schedule):
    m = tiny()
    cond = Condition.of([2, 3])
    a = m.sample(cond, generator=torch.Generator().manual_seed(0), cfg_scale=cfg, cfg_schedule=schedule)
    b = m.sample(cond, generator=torch.Generator().manual_seed(0), cfg_scale=cfg, cfg_schedule=schedule, use_cache=False)
    assert a.shape == (2, 4, 4, 4) and torch.isfinite(a).all()
    assert (a - b).abs().max() <= 1e-4 * max(1.0, float(b.abs().max()))


def test_rewind_recomputes_the_same_conditioning():
    m = tiny()
    x = torch.randn(2, 16, 4)
    cond = Condition.of([0, 1])
    with torch.no_grad():
        state, _ = m.start(cond, guided=True)
        first = m.step(state, x[:, :6], 0)
        m.rewind(state, 4)
        assert state.token_lengths.tolist() == [2, 2, 2, 2]
        again = m.step(state, x[:, 2:6], 2)
        torch.testing.assert_close(again, first[:, 2:6], atol=1e-5, rtol=1e-5)
        # a different continuation after the rollback overwrites the stale entries
        other = m.step(state, torch.zeros(2, 1, 4), torch.tensor([6, 3]))
    assert other.shape == (4, 1, 32)
    with pytest.raises(ValueError, match="committed"):
        m.step(state, x[:, :1], 10)
    with pytest.raises(ValueError, match="rewind"):
        m.rewind(state, 20)


def test_training_reduces_loss():
    m = tiny(class_dropout=0.0, diffusion_batch_mul=2).train()
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(4, 4, 4, 4, generator=g) * 0.5
    cond = Condition.of([0, 1, 2, 3])
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)

    def eval_loss():
        return sum(m.loss(lat, cond, generator=torch.Generator().manual_seed(s)).item() for s in range(3)) / 3

    before = eval_loss()
    for i in range(30):
        loss = m.loss(lat, cond, generator=torch.Generator().manual_seed(50 + i))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.8 * before


def test_flow_head_variant_and_save_load(tmp_path):
    m = tiny(head="flow")
    m.save_pretrained(tmp_path, "generator")
    again = NextTokenContinuousGenerator.from_pretrained(tmp_path, "generator").eval()
    cond = Condition.of([1])
    a = m.sample(cond, generator=torch.Generator().manual_seed(3), num_steps=3)
    b = again.sample(cond, generator=torch.Generator().manual_seed(3), num_steps=3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_input_and_tokenizer_pairing():
    m = tiny()
    cond = Condition.of([0])
    with pytest.raises(ValueError, match="latents must have shape"):
        m.loss(torch.randn(1, 3, 4, 4), cond)
    with pytest.raises(ValueError, match="latents must have shape"):
        m.loss(torch.randn(1, 4, 8, 8), cond)
    with pytest.raises(ValueError, match="temperature"):
        m.sample(cond, temperature=0)
    with pytest.raises(ValueError, match="num_sampling_steps"):
        m.sample(cond, num_steps=0)
    with pytest.raises(ValueError, match="head"):
        tiny(head="vq")

    class Discrete:
        kind, downsample = "discrete", 16

    with pytest.raises(ValueError, match="continuous"):
        m.check_tokenizer(Discrete())


def test_sampler_options_stats_and_protocol():
    from visar.registry import get
    from visar.samplers.continuous_ar import ContinuousARSampler

    m = tiny()
    cond = Condition.of([1, 2])
    assert m.default_sampler == "continuous_ar" and get("sampler", "continuous_ar") is ContinuousARSampler
    sampler = ContinuousARSampler(num_steps=2)
    a = sampler(m, cond, torch.Generator().manual_seed(1), cfg_scale=2.0)
    assert sampler.stats == {"model_passes": 16, "head_calls": 16}
    torch.testing.assert_close(a, m.sample(cond, torch.Generator().manual_seed(1), cfg_scale=2.0, num_steps=2),
                               rtol=0, atol=0)
    with pytest.raises(TypeError, match="'cfg_scale'"):
        m.sample(cond, cfg=2.0)
    with pytest.raises(TypeError, match="'num_steps'"):
        m.sample(cond, num_sampling_steps=3)
    with pytest.raises(TypeError, match="logits|autoregressive"):
        get("sampler", "autoregressive")()(m, cond)
