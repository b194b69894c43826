"""Continuous token heads: MAR DiffLoss parity (schedules, network, seeded samples), density API, flow head."""
from __future__ import annotations

import pytest
import torch

from visar.generators.components.diffusion_schedule import DiffusionSchedule, space_timesteps
from visar.generators.components.heads import DiffusionHead, FlowHead, HeadNoise, HeadSample, build_head
from visar.samplers.heads import sample_head


@pytest.fixture(scope="module")
def mar_dir():
    from conftest import fixture_dir

    return fixture_dir("mar")


@pytest.fixture(scope="module")
def tiny_head(mar_dir):
    """The DiffLoss head of the tiny MAR fixture (model_ema weights)."""
    state = torch.load(mar_dir / "mar_tiny_checkpoint-last.pth", weights_only=True)["model_ema"]
    head = DiffusionHead(token_dim=16, cond_dim=32, width=32, depth=2, num_sampling_steps=100)
    head.load_state_dict({k[len("diffloss."):]: v for k, v in state.items() if k.startswith("diffloss.")})
    return head.eval()


@pytest.fixture(scope="module")
def io(mar_dir):
    from safetensors.torch import load_file

    return load_file(mar_dir / "mar_tiny_io.safetensors")


@pytest.mark.parametrize("name,steps", [("train1000", None), ("gen100", 100), ("gen50", 50), ("gen10", 10)])
def test_schedule_tables_exact(mar_dir, name, steps):
    from safetensors.torch import load_file

    ref = load_file(mar_dir / "diffloss_schedules.safetensors")
    ours = DiffusionSchedule(1000, steps).tables()
    for key, value in ours.items():
        assert torch.equal(value, ref[f"{name}.{key}"]), f"{name}.{key} differs"


def test_space_timesteps_rounding():
    assert space_timesteps(1000, 1) == [0]
    assert space_timesteps(1000, 2) == [0, 999]
    assert space_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(ValueError, match="sampling steps"):
        space_timesteps(1000, 0)


def test_head_network_matches_official(tiny_head, io):
    with torch.no_grad():
        out = tiny_head(io["head.x_t"], io["head.t"], io["head.c"])
        cfg = tiny_head.net.forward_with_cfg(io["head_cfg.x_t"], io["head_cfg.t"], io["head_cfg.c"],
                                             io["head_cfg.cfg_scale"])
    torch.testing.assert_close(out, io["head.out"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cfg, io["head_cfg.out"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["nocfg", "cfg"])
def test_seeded_diffloss_sample_matches_official(tiny_head, io, case):
    p = f"diffloss_sample_{case}."
    g = torch.Generator().manual_seed(int(io[p + "torch_seed"]))
    out = sample_head(tiny_head, io[p + "z"], cfg=float(io[p + "cfg"]), temperature=float(io[p + "temperature"]),
                           generator=g)
    ref = io[p + "out"][:out.shape[0]]  # with guidance the official output also holds the unconditional half
    assert out.shape == (io[p + "z"].shape[0] // (2 if case == "cfg" else 1), 16)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_density_and_final_noise_share_the_trajectory(tiny_head, io):
    z = io["diffloss_sample_nocfg.z"]
    plain = sample_head(tiny_head, z, steps=10, generator=torch.Generator().manual_seed(1), return_density=True)
    noisy = sample_head(tiny_head, z, steps=10, generator=torch.Generator().manual_seed(1), return_density=True,
                             final_noise=True)
    assert isinstance(plain, HeadSample)
    torch.testing.assert_close(plain.tokens, plain.mean, rtol=0, atol=0)
    # the official sampler draws the last step's noise and multiplies it by zero: same mean and std
    torch.testing.assert_close(noisy.mean, plain.mean, rtol=0, atol=0)
    torch.testing.assert_close(noisy.std, plain.std, rtol=0, atol=0)
    e = (noisy.tokens - noisy.mean) / noisy.std
    assert (noisy.std > 0).all() and 0.3 < e.std() < 2.0


def test_explicit_noise_reproduces_generator_draws(tiny_head, io):
    z = io["diffloss_sample_nocfg.z"]
    n, steps = z.shape[0], 7
    g = torch.Generator().manual_seed(5)
    start = torch.randn(n, 16, generator=g)
    per_step = torch.stack([torch.randn(n, 16, generator=g) for _ in range(steps)])
    a = sample_head(tiny_head, z, steps=steps, generator=torch.Generator().manual_seed(5))
    b = sample_head(tiny_head, z, steps=steps, noise=HeadNoise(start, per_step))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="noise must hold"):
        sample_head(tiny_head, z, steps=steps, noise=HeadNoise(start, per_step[:3]))


def test_step_gaussian_drives_the_same_chain(tiny_head, io):
    """Running the chain by hand with ``step_gaussian`` reproduces ``sample_head`` (guided, explicit noise)."""
    z = io["diffloss_sample_cfg.z"]  # [8, 32] = 4 cond + 4 uncond rows
    n, steps, cfg, temp = 4, 6, 3.0, 0.9
    g = torch.Generator().manual_seed(9)
    start, per_step = torch.randn(n, 16, generator=g), torch.randn(steps, n, 16, generator=g)
    ref = sample_head(tiny_head, z, steps=steps, cfg=cfg, temperature=temp, noise=HeadNoise(start, per_step),
                           final_noise=True, return_density=True)
    x = torch.cat([start, start])
    for k, i in enumerate(range(steps - 1, -1, -1)):
        mean, std = tiny_head.step_gaussian(x, i, z, steps=steps, cfg=cfg)
        x = mean + std * torch.cat([per_step[k], per_step[k]]) * temp
    torch.testing.assert_close(x[:n], ref.tokens, rtol=1e-6, atol=1e-6 * float(ref.tokens.abs().max()))
    torch.testing.assert_close(mean[:n], ref.mean, rtol=0, atol=0)
    with pytest.raises(ValueError, match="index"):
        tiny_head.step_gaussian(x, steps, z, steps=steps, cfg=cfg)


def test_head_bad_arguments(tiny_head):
    z = torch.zeros(3, 32)
    with pytest.raises(ValueError, match="steps"):
        sample_head(tiny_head, z, steps=0)
    with pytest.raises(ValueError, match="at least 2"):
        sample_head(tiny_head, z, steps=1)
    with pytest.raises(ValueError, match="temperature"):
        sample_head(tiny_head, z, temperature=0.0)
    with pytest.raises(ValueError, match="even"):
        sample_head(tiny_head, z, steps=2, cfg=2.0)
    with pytest.raises(ValueError, match="target must be"):
        tiny_head.loss(torch.zeros(3, 8), z)
    with pytest.raises(ValueError, match="unknown head"):
        build_head("gan", token_dim=4, cond_dim=4)


def _fit(head, steps=60, seed=0):
    """Train a head on a conditional toy law: token = 0.5 * z[:, :4] (+ small noise)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(256, 8, generator=g)
    target = 0.5 * z[:, :4] + 0.05 * torch.randn(256, 4, generator=g)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for i in range(steps):
        loss = head.loss(target, z, generator=torch.Generator().manual_seed(1000 + i % 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_heads_train(kind):
    torch.manual_seed(0)
    head = build_head(kind, token_dim=4, cond_dim=8, width=64, depth=2, num_sampling_steps=20)
    losses = _fit(head)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8


def test_diffusion_loss_mask_weights_rows():
    torch.manual_seed(0)
    head = DiffusionHead(4, 8, width=32, depth=1)
    target, z = torch.randn(6, 4), torch.randn(6, 8)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    full = head.loss(target, z, generator=g())
    ones = head.loss(target, z, torch.ones(6), generator=g())
    torch.testing.assert_close(full, ones)
    half = head.loss(target, z, torch.tensor([1.0, 1, 1, 0, 0, 0]), generator=g())
    assert not torch.allclose(half, full)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_flow_head_sampling(solver):
    torch.manual_seed(0)
    head = FlowHead(4, 8, width=32, depth=1, num_sampling_steps=6, solver=solver, final_std=0.1)
    z = torch.randn(5, 8)
    a = sample_head(head, z, generator=torch.Generator().manual_seed(2), return_density=True)
    b = sample_head(head, z, generator=torch.Generator().manual_seed(2), return_density=True, final_noise=True)
    torch.testing.assert_close(a.tokens, a.mean, rtol=0, atol=0)
    torch.testing.assert_close(b.mean, a.mean, rtol=0, atol=0)
    assert torch.all(a.std == 0.1) and not torch.equal(b.tokens, b.mean)
    guided = sample_head(head, torch.cat([z, torch.randn(5, 8)]), cfg=2.0, generator=torch.Generator().manual_seed(2))
    assert guided.shape == (5, 4) and torch.isfinite(guided).all()
    with pytest.raises(ValueError, match="solver"):
        FlowHead(4, 8, solver="rk4")


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_chain_pieces_reproduce_sample_head(kind):
    """head_start_noise + run_chain (stopped before the last draw) + finish_chain == sample_head."""
    from visar.samplers.heads import finish_chain, head_start_noise, run_chain

    torch.manual_seed(0)
    head = build_head(kind, token_dim=4, cond_dim=8, width=32, depth=1, num_sampling_steps=5).eval()
    if kind == "flow":
        head.final_std = 0.1
    for m in head.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.05)
    z = torch.randn(6, 8)  # guided: 3 tokens
    ref = sample_head(head, z, cfg=2.0, temperature=0.9, generator=torch.Generator().manual_seed(4),
                      final_noise=True, return_density=True)
    g = torch.Generator().manual_seed(4)
    tail = run_chain(head, z, head_start_noise(head, 3, z, g), cfg=2.0, temperature=0.9, generator=g)
    tokens = finish_chain(head, tail, g, final_noise=True)
    assert tail.n == 3 and tail.guided and tail.mean.shape[1] == 4
    dens = tail.density(tokens)
    for name in ("tokens", "mean", "std"):
        torch.testing.assert_close(getattr(dens, name), getattr(ref, name), rtol=0, atol=0)
