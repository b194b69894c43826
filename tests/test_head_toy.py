"""Token heads on a CPU budget: the 3-class toy of ``benchmarks/head_toy.py`` (4-dim tokens, ``x = mu(c) + 0.1 e``).

* The recommended configuration (``docs/continuous.md``, "Training the diffusion head on a CPU budget"): the flow
  head with a cosine-decayed AdamW learning rate samples every class's mean and std within 0.05.
* The opt-in ``noise_schedule="linear"`` of the DDPM head does too at 100 steps; the default ``"cosine"`` stays
  MAR's tables (the parity tests pin it bit for bit).
* No sampler bug: the exact noise prediction inside ``DiffusionHead``'s respaced sampler (cosine, MAR's tables)
  samples the toy; the blow-up of a briefly trained official head is its eps error at ``t = 999`` times
  ``sqrt(abar_prev / abar_T)``.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from visar.generators.components.diffusion_schedule import (NOISE_SCHEDULES, base_betas, cosine_betas,
                                                             get_schedule, linear_betas)
from visar.generators.components.heads import DiffusionHead, FlowHead
from visar.generators.masked.mar import MaskedGenerator
from visar.generators.next_token.continuous import NextTokenContinuousGenerator

_spec = importlib.util.spec_from_file_location("head_toy", Path(__file__).parent.parent / "benchmarks" / "head_toy.py")
toy = importlib.util.module_from_spec(_spec)
sys.modules["head_toy"] = toy
_spec.loader.exec_module(toy)

TOL = 0.05


@pytest.fixture(scope="module")
def law():
    return toy.toy_law(0)


def _assert_fits(sample, law, steps, n=1000):
    mu, z = law
    mean_err, std_err, per_class = toy.toy_errors(sample, mu, z, steps, n=n)
    assert mean_err < TOL and std_err < TOL, (steps, per_class)


def _threads_one():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    return old


# ---------------------------------------------------------------------------------------------- recommended recipe
def test_flow_head_fits_the_toy_on_a_cpu_budget(law):
    """Small variant of the recommended configuration (64 x 2 head, 600 AdamW steps, ~3 CPU-s)."""
    old = _threads_one()
    try:
        mu, z = law
        head = FlowHead(toy.C, toy.D, width=64, depth=2)
        toy.train_head(head, toy.flow_loss(head), mu, z, steps=600, decay=True, seed=0)
        _assert_fits(toy.head_sampler(head), law, 25)
    finally:
        torch.set_num_threads(old)


def test_linear_schedule_diffusion_head_fits_the_toy(law):
    """MAR's learned-variance DDPM head with DDPM's linear betas (opt-in): no x0 clip needed at 100 steps."""
    old = _threads_one()
    try:
        mu, z = law
        head = DiffusionHead(toy.C, toy.D, width=64, depth=2, noise_schedule="linear")
        toy.train_head(head, toy.diffusion_loss(head), mu, z, steps=600, decay=True, seed=0)
        _assert_fits(toy.head_sampler(head), law, 100)
    finally:
        torch.set_num_threads(old)


@pytest.mark.slow
@pytest.mark.parametrize("steps", [25, 100, 250])
def test_flow_head_fits_the_full_toy(law, steps):
    """The issue's toy at full size: 128 x 3 head, 1500 AdamW steps (cosine LR decay), batch 256."""
    old = _threads_one()
    try:
        mu, z = law
        head = FlowHead(toy.C, toy.D, width=128, depth=3)
        toy.train_head(head, toy.flow_loss(head), mu, z, steps=1500, decay=True, seed=0)
        _assert_fits(toy.head_sampler(head), law, steps)
    finally:
        torch.set_num_threads(old)


@pytest.mark.slow
def test_linear_schedule_head_fits_the_full_toy(law):
    old = _threads_one()
    try:
        mu, z = law
        head = DiffusionHead(toy.C, toy.D, width=128, depth=3, noise_schedule="linear")
        toy.train_head(head, toy.diffusion_loss(head), mu, z, steps=1500, decay=True, seed=0)
        for steps in (100, 250):
            _assert_fits(toy.head_sampler(head), law, steps)
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------- bug hunt
@pytest.mark.parametrize("v", [-1.0, 0.0])
def test_the_official_sampler_is_right_given_the_exact_noise(law, v):
    """MAR's respaced cosine sampler (timestep map, posterior, learned-range variance at ``v``) with the toy's exact
    noise prediction samples the toy: the large errors of a briefly trained head do not come from the sampler."""
    mu, z = law
    head = DiffusionHead(toy.C, toy.D, width=8, depth=1)
    head.net = toy.ExactEps(mu, z, get_schedule(1000, None).alphas_cumprod, v)
    for steps in (25, 100):
        _assert_fits(toy.head_sampler(head, x0_clip=None), law, steps, n=500)


def test_the_first_reverse_step_amplifies_the_noise_error():
    """``d mean / d eps`` of the first respaced step is ``beta_k / (sqrt(alpha_k) sqrt(1 - abar_T))``: ~1300 at 25
    cosine steps (the beta clip at 0.999 leaves abar_T = 2.4e-9), ~1.5 with the linear schedule."""
    def gain(name, steps):
        s = get_schedule(1000, steps, name)
        return float(s.betas[-1] / (np.sqrt(1 - s.betas[-1]) * np.sqrt(1 - s.alphas_cumprod[-1])))

    assert 1000 < gain("cosine", 25) < 2000 and 100 < gain("cosine", 250) < 200
    assert gain("linear", 25) < 2 and gain("linear", 250) < 1.1


# ---------------------------------------------------------------------------------------------- the option
def test_noise_schedule_tables():
    assert NOISE_SCHEDULES == ("cosine", "linear")
    assert np.array_equal(base_betas("cosine", 1000), cosine_betas(1000))
    cos, default = get_schedule(1000, 25, "cosine").tables(), get_schedule(1000, 25).tables()
    assert all(torch.equal(cos[k], default[k]) for k in default)
    lin = get_schedule(1000, None, "linear")
    assert np.array_equal(base_betas("linear", 1000), linear_betas(1000))
    assert linear_betas(1000)[0] == 1e-4 and abs(linear_betas(1000)[-1] - 0.02) < 1e-15
    assert abs(lin.alphas_cumprod[-1] - 4.04e-5) < 1e-7
    assert np.allclose(linear_betas(250), 4 * np.linspace(1e-4, 0.02, 250))
    for bad in ("Linear", "sigmoid", None, 1):
        with pytest.raises(ValueError, match="noise_schedule"):
            base_betas(bad)


def test_diffusion_head_noise_schedule_option():
    torch.manual_seed(0)
    a = DiffusionHead(4, 8, width=16, depth=1)
    torch.manual_seed(0)
    b = DiffusionHead(4, 8, width=16, depth=1, noise_schedule="linear")
    assert a.noise_schedule == "cosine" and b.noise_schedule == "linear"
    x, zz = torch.randn(6, 4), torch.randn(6, 8)
    t, e = torch.tensor([0, 10, 500, 900, 990, 999]), torch.randn(6, 4)
    assert not torch.equal(a.loss(x, zz, t=t, noise=e), b.loss(x, zz, t=t, noise=e))
    assert b.schedule(25).noise_schedule == "linear" and a.schedule(25).noise_schedule == "cosine"
    with pytest.raises(ValueError, match="noise_schedule"):
        DiffusionHead(4, 8, width=16, depth=1, noise_schedule="quadratic")


MAR_TINY = dict(img_size=32, vae_stride=4, vae_embed_dim=4, encoder_embed_dim=32, encoder_depth=1,
                encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, buffer_size=4,
                diffloss_d=1, diffloss_w=32, num_sampling_steps=5, class_num=10)
CAUSAL_TINY = dict(token_channels=4, grid_size=4, dim=32, depth=1, num_heads=2, num_classes=10, head_width=32,
                   head_depth=1, num_sampling_steps=5)


@pytest.mark.parametrize("cls, kw", [(MaskedGenerator, MAR_TINY), (NextTokenContinuousGenerator, CAUSAL_TINY)])
def test_generators_save_the_noise_schedule(cls, kw, tmp_path):
    torch.manual_seed(0)
    m = cls(**kw, noise_schedule="linear").eval()
    assert m.config["noise_schedule"] == "linear" and m.head.noise_schedule == "linear"
    assert cls(**kw).config["noise_schedule"] == "cosine"
    m.save_pretrained(tmp_path, "generator")
    assert cls.from_pretrained(tmp_path, "generator").head.noise_schedule == "linear"
    with pytest.raises(ValueError, match="diffusion head only"):
        cls(**kw, head="flow", noise_schedule="linear")
    with pytest.raises(ValueError, match="noise_schedule"):
        cls(**kw, noise_schedule="cos")
