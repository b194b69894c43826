"""``x0_clip`` of the diffusion head (clamp of the predicted clean token while sampling).

Default ``None`` is MAR's sampler bit for bit; a clip makes a briefly trained head sample its data
(a 3-class Gaussian toy); the option threads through MAR, the causal generator and the Pipeline, is
saved with the model config and is validated.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from visar.generators.base import Condition
from visar.generators.components.heads import DiffusionHead, FlowHead, HeadNoise
from visar.generators.masked.mar import MaskedGenerator
from visar.generators.next_token.continuous import NextTokenContinuousGenerator
from visar.samplers.heads import sample_head

MAR_TINY = dict(img_size=32, vae_stride=4, vae_embed_dim=16, encoder_embed_dim=32, encoder_depth=1,
                encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, buffer_size=4,
                diffloss_d=1, diffloss_w=32, num_sampling_steps=10, class_num=10)
CAUSAL_TINY = dict(token_channels=16, grid_size=8, dim=32, depth=1, num_heads=2, num_classes=10, head_width=32,
                   head_depth=1, num_sampling_steps=5)


def _loud_head(head: DiffusionHead) -> DiffusionHead:
    """Random (not zero-initialised) layers: eps is off, so the predicted x0 is huge at t = 999."""
    torch.manual_seed(0)
    for mod in head.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=0.05)
    return head.eval()


def _mar(**kw) -> MaskedGenerator:
    torch.manual_seed(0)
    m = MaskedGenerator(**{**MAR_TINY, **kw})
    _loud_head(m.head)
    return m.eval()


def _causal(**kw) -> NextTokenContinuousGenerator:
    torch.manual_seed(0)
    m = NextTokenContinuousGenerator(**{**CAUSAL_TINY, **kw})
    _loud_head(m.head)
    return m.eval()


# ---------------------------------------------------------------------------------------------- head
def test_none_is_the_default_and_a_wide_clip_changes_nothing():
    head = _loud_head(DiffusionHead(4, 8, width=32, depth=2, num_sampling_steps=10))
    z = torch.randn(6, 8)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    ref = sample_head(head, z, generator=g())
    assert torch.equal(sample_head(head, z, generator=g(), x0_clip=None), ref)
    assert torch.equal(sample_head(head, z, generator=g(), x0_clip="model"), ref)
    # the clamp only acts where |x0| > x0_clip: a range nothing reaches is the identity, bit for bit
    assert torch.equal(sample_head(head, z, generator=g(), x0_clip=1e30), ref)
    clipped = sample_head(head, z, generator=g(), x0_clip=0.5)
    assert not torch.equal(clipped, ref) and torch.isfinite(clipped).all()


def test_constructor_default_and_per_call_override():
    head = _loud_head(DiffusionHead(4, 8, width=32, depth=2, num_sampling_steps=10))
    clip_head = _loud_head(DiffusionHead(4, 8, width=32, depth=2, num_sampling_steps=10, x0_clip=0.5))
    assert clip_head.x0_clip == 0.5 and head.x0_clip is None
    z = torch.randn(6, 8)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(sample_head(clip_head, z, generator=g()), sample_head(head, z, generator=g(), x0_clip=0.5))
    assert torch.equal(sample_head(clip_head, z, generator=g(), x0_clip=None), sample_head(head, z, generator=g()))


def test_step_gaussian_drives_the_clipped_chain():
    """The chain run by hand with ``step_gaussian(x0_clip=...)`` reproduces ``sample_head(x0_clip=...)`` (guided)."""
    head = _loud_head(DiffusionHead(4, 8, width=32, depth=2, num_sampling_steps=10))
    steps, n, cfg = 6, 3, 2.5
    z = torch.randn(2 * n, 8)
    noise = HeadNoise(torch.randn(n, 4), torch.randn(steps, n, 4))
    ref = sample_head(head, z, steps, cfg=cfg, noise=noise, return_density=True, x0_clip=1.0)
    x = torch.cat([noise.start, noise.start])
    for k, i in enumerate(range(steps - 1, -1, -1)):
        mean, std = head.step_gaussian(x, i, z, steps=steps, cfg=cfg, x0_clip=1.0)
        e = torch.cat([noise.steps[k], noise.steps[k]])
        x = mean + (1.0 if i > 0 else 0.0) * std * e
    torch.testing.assert_close(x[:n], ref.tokens, rtol=0, atol=0)
    unclipped, _ = head.step_gaussian(torch.cat([noise.start] * 2), steps - 1, z, steps=steps, cfg=cfg)
    clipped, _ = head.step_gaussian(torch.cat([noise.start] * 2), steps - 1, z, steps=steps, cfg=cfg, x0_clip=1.0)
    assert not torch.equal(unclipped, clipped)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, math.inf, math.nan, True, "auto", [5.0]])
def test_bad_x0_clip(bad):
    head = DiffusionHead(4, 8, width=16, depth=1, num_sampling_steps=4)
    z = torch.randn(2, 8)
    with pytest.raises(ValueError, match="x0_clip"):
        sample_head(head, z, x0_clip=bad)
    with pytest.raises(ValueError, match="x0_clip"):
        head.step_gaussian(torch.randn(2, 4), 0, z, x0_clip=bad)
    with pytest.raises(ValueError, match="x0_clip"):
        DiffusionHead(4, 8, width=16, depth=1, x0_clip=bad)


def test_toy_fit_samples_its_data_only_with_a_clip():
    """3 classes of 3-dim Gaussians ``mu(c) + 0.1 N(0, I)``, 200 AdamW steps with a cosine LR: the
    training loss is fine, but MAR's unclipped sampler misses by hundreds (the t=999 step multiplies the
    noise error by ~2e4); ``x0_clip=4`` recovers the class means and the 0.1 std."""
    torch.manual_seed(0)
    mus = torch.tensor([[1.5, -1.0, 0.5]]) * torch.tensor([[-1.0], [0.0], [1.0]])  # [3, 3]
    emb = nn.Embedding(3, 32)
    head = DiffusionHead(token_dim=3, cond_dim=32, width=64, depth=2, num_sampling_steps=50)
    opt = torch.optim.AdamW(list(head.parameters()) + list(emb.parameters()), lr=3e-3)
    steps = 200  # 8 seeds: class means within 0.05, per-dim std 0.09-0.17 (true 0.1)
    for it in range(steps):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * it / steps))
        c = torch.randint(0, 3, (128,))
        loss = head.loss(mus[c] + 0.1 * torch.randn(128, 3), emb(c))
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        c = torch.arange(3).repeat_interleave(256)
        z = emb(c)
        x = sample_head(head, z, generator=torch.Generator().manual_seed(1), x0_clip=4.0)
        raw = sample_head(head, z, generator=torch.Generator().manual_seed(1))
    means = torch.stack([x[c == k].mean(0) for k in range(3)])
    stds = torch.stack([x[c == k].std(0) for k in range(3)])
    assert (means - mus).abs().max() < 0.1, means
    assert 0.07 < stds.min() and stds.max() < 0.2, stds
    assert (raw - mus[c]).abs().mean() > 10  # the official sampler on the same head and noise


# ---------------------------------------------------------------------------------------------- generators
@pytest.mark.parametrize("make", [_mar, _causal])
def test_generators_take_x0_clip_and_save_it(make, tmp_path):
    cond = Condition.of([1, 2])
    opts = dict(num_iter=2) if make is _mar else {}
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain, clipped = make(), make(x0_clip=0.5)
    assert plain.config["x0_clip"] is None and clipped.config["x0_clip"] == 0.5
    ref = plain.sample(cond, generator=g(), cfg_scale=2.0, **opts)
    out = clipped.sample(cond, generator=g(), cfg_scale=2.0, **opts)
    assert not torch.equal(out, ref) and torch.isfinite(out).all()
    assert torch.equal(plain.sample(cond, generator=g(), cfg_scale=2.0, x0_clip=0.5, **opts), out)
    assert torch.equal(clipped.sample(cond, generator=g(), cfg_scale=2.0, x0_clip=None, **opts), ref)
    clipped.save_pretrained(tmp_path, "generator")
    again = type(clipped).from_pretrained(tmp_path, "generator").eval()  # MAR has dropout
    assert again.head.x0_clip == 0.5
    assert torch.equal(again.sample(cond, generator=g(), cfg_scale=2.0, **opts), out)
    with pytest.raises(ValueError, match="x0_clip"):
        clipped.sample(cond, x0_clip=-1.0, **opts)
    with pytest.raises(ValueError, match="x0_clip"):
        make(x0_clip=0.0)
    with pytest.raises(ValueError, match="diffusion head only"):
        make(head="flow", x0_clip=5.0)
    flow = make(head="flow") if make is _causal else MaskedGenerator(**{**MAR_TINY, "head": "flow"}).eval()
    assert isinstance(flow.head, FlowHead)
    assert flow.sample(cond, generator=g(), **opts).shape == ref.shape  # "model" default: nothing to clip
    with pytest.raises(ValueError, match="diffusion head only"):
        flow.sample(cond, x0_clip=5.0, **opts)


def test_pipeline_passes_x0_clip(tmp_path):
    from visar import zoo
    from visar.pipeline import Pipeline

    tok = zoo.create("kl-tiny")
    for make, opts in ((_mar, dict(num_iter=2, num_steps=5)), (_causal, dict(num_steps=5))):
        pipe = Pipeline(tok, make(), sampling_defaults={"x0_clip": 0.5, **opts})
        a = pipe.generate([1, 2], seed=0)
        b = pipe.generate([1, 2], seed=0, x0_clip=None)
        assert a.shape == (2, 3, 32, 32) and not torch.equal(a, b)
        pipe.save_pretrained(tmp_path / make.__name__)
        again = Pipeline.from_pretrained(tmp_path / make.__name__)
        assert torch.equal(again.generate([1, 2], seed=0), a)
        with pytest.raises(ValueError, match="x0_clip"):
            pipe.generate([1], seed=0, x0_clip=float("inf"))
