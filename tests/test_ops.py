"""visar.ops: dispatch (CPU tensors take the reference), the building blocks equal their former torch code bit for
bit on the CPU, the fused logit draw equals the multinomial path, the opt-in small-row linear, and every Triton
kernel against its reference under the interpreter (``tests/test_ops_kernels.py``, run here in a subprocess
because ``TRITON_INTERPRET=1`` must be set before any kernel is defined)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import visar.ops as ops
from visar.ops import dispatch
from visar.ops.linear import small_row_linear, small_row_rule

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- dispatch
def test_cpu_tensors_take_the_reference_in_auto_mode():
    x = torch.randn(3, 8)
    with ops.kernel_mode_set("auto"):
        assert not ops.use_kernel(x)
        assert not ops.use_kernel(x, None)


def test_reference_mode_and_grad_take_the_reference():
    x = torch.randn(3, 8, requires_grad=True)
    with ops.kernel_mode_set("reference"):
        assert not ops.use_kernel(x.detach())
    with ops.kernel_mode_set("kernel"):  # forward-only kernels: autograd always gets the reference
        assert not ops.use_kernel(x)


@pytest.mark.parametrize("value,mode", [("0", "reference"), ("off", "reference"), ("1", "auto"), ("", "auto"),
                                        ("force", "kernel"), ("KERNEL", "kernel"), ("reference", "reference")])
def test_mode_aliases(value, mode):
    with ops.kernel_mode_set(value):
        assert ops.kernel_mode() == mode
    assert ops.kernel_mode() == dispatch._parse(os.environ.get(dispatch.ENV, "auto"), "env")


def test_bad_mode_names_the_choices():
    with pytest.raises(ValueError, match="reference"):
        ops.set_kernel_mode("fast")


def test_environment_variable_sets_the_mode(monkeypatch):
    import importlib
    try:
        monkeypatch.setenv(dispatch.ENV, "0")
        importlib.reload(dispatch)  # the variable is read at import
        assert ops.kernel_mode() == "reference"
        assert not ops.use_kernel(torch.ones(1, 4))
        monkeypatch.setenv(dispatch.ENV, "sometimes")
        with pytest.raises(ValueError, match="VISAR_KERNELS"):
            importlib.reload(dispatch)
    finally:
        monkeypatch.delenv(dispatch.ENV, raising=False)
        importlib.reload(dispatch)
    assert ops.kernel_mode() == "auto"


@pytest.mark.skipif(not dispatch.triton_available(), reason="triton does not import here")
@pytest.mark.skipif(dispatch.interpreting(), reason="TRITON_INTERPRET is set in this process")
def test_kernel_mode_on_cpu_without_interpreter_explains():
    with ops.kernel_mode_set("kernel"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.rms_norm(torch.randn(2, 4))


# ---------------------------------------------------------------------------------------------- the blocks, CPU
def _both_modes(fn):
    """``fn()`` in the default mode and with the reference forced: (auto, reference)."""
    torch.manual_seed(0)
    with ops.kernel_mode_set("auto"):
        a = fn()
    torch.manual_seed(0)
    with ops.kernel_mode_set("reference"):
        b = fn()
    return a, b


def _equal(a, b):
    if isinstance(a, (tuple, list)):
        return all(_equal(u, v) for u, v in zip(a, b))
    return torch.equal(a, b)


def test_rms_norm_equals_the_former_code():
    from visar.nn.norms import RMSNorm
    x, r = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    for affine in (True, False):
        m = RMSNorm(24, eps=1e-6, affine=affine)
        if affine:
            torch.nn.init.normal_(m.weight)
        xf = x.float()
        old = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x)
        old = old * m.weight if affine else old
        assert torch.equal(m(x), old)
        y, h = m(x, residual=r)
        assert torch.equal(h, x + r) and torch.equal(y, m(x + r))
        shift, scale = torch.randn(2, 1, 24), torch.randn(2, 5, 24)
        assert torch.equal(m.modulated(x, shift, scale), m(x) * (1 + scale) + shift)


def test_mlps_equal_the_former_code():
    from visar.nn.mlp import GeluMlp, SwiGLU
    x = torch.randn(3, 7, 16)
    for act, fn in (("silu", F.silu), ("gelu", F.gelu)):
        m = SwiGLU(16, 40, bias=True, act=act).eval()
        assert torch.equal(m(x), m.w2(fn(m.w1(x)) * m.w3(x)))
    for approximate in ("none", "tanh"):
        g = GeluMlp(16, 40, approximate=approximate).eval()
        assert torch.equal(g(x), g.fc2(F.gelu(g.fc1(x), approximate=approximate)))


def test_adaln_block_and_heads_equal_in_both_modes():
    from visar.generators.components.flow_head_transformer import FlowHeadTransformer
    from visar.generators.components.heads import SimpleMLPAdaLN
    from visar.nn.adaln_block import AdaLNBlock

    blk = AdaLNBlock(32, 4, cond_dim=16).eval()
    x, c = torch.randn(2, 9, 32), torch.randn(2, 16)
    for p in blk.ada_lin.parameters():
        torch.nn.init.normal_(p, std=0.1)
    a, b = _both_modes(lambda: blk(x, c))
    assert torch.equal(a, b)
    net = SimpleMLPAdaLN(4, 32, 8, 16, 2).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    a, b = _both_modes(lambda: net(torch.randn(5, 4), torch.tensor([1, 5, 9, 200, 999]), torch.randn(5, 16)))
    assert torch.equal(a, b)
    for cross in (False, True):
        fh = FlowHeadTransformer(4, 16, 32, 1, 4, cross=cross).eval()
        for p in fh.parameters():
            torch.nn.init.normal_(p, std=0.1)
        a, b = _both_modes(lambda: fh(torch.randn(2, 4, 4), torch.rand(2), torch.randn(2, 4, 16)))
        assert torch.equal(a, b)


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("clip", [None, 1.5])
def test_diffusion_head_step_equals_the_former_code(guided, clip):
    from visar.generators.components.heads import DiffusionHead
    torch.manual_seed(0)
    head = DiffusionHead(4, 16, width=32, depth=2, num_sampling_steps=10).eval()
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    n = 3
    z = torch.randn(2 * n if guided else n, 16)
    x = torch.randn(z.shape[0], 4)
    cfg = torch.tensor([[1.5], [2.0], [4.0]]) if guided else 1.0
    sch = head.schedule(10)
    for i in (9, 4, 0):
        mean, std = head.reverse_gaussian(sch, x, i, z, cfg, guided, clip)
        # the former code: forward_with_cfg, then _mean_logvar with 0-dim float32 tables, then exp(0.5 logvar)
        t = sch.timestep_map[i].expand(x.shape[0])
        out = head.net.forward_with_cfg(x, t, z, cfg) if guided else head.net(x, t, z)
        m_old, logvar = head._mean_logvar(sch, x, out[:, :4], out[:, 4:], i, clip)
        assert torch.equal(mean, m_old) and torch.equal(std, torch.exp(0.5 * logvar))


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("guided", [False, True])
def test_flow_head_step_equals_the_former_code(solver, guided):
    from visar.generators.components.heads import FlowHead
    from visar.nn.guidance import cfg_mix
    torch.manual_seed(0)
    head = FlowHead(4, 16, width=32, depth=2, solver=solver).eval()
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    z = torch.randn(6 if guided else 3, 16)
    x, cfg = torch.randn(3, 4), 3.0

    def velocity(x, t):  # the former FlowHead.velocity
        tt = torch.full((z.shape[0],), t, dtype=x.dtype)
        if not guided:
            return head(x, tt, z)
        vc, vu = head(torch.cat([x, x]), tt, z).chunk(2)
        return cfg_mix(vc, vu, cfg)

    v = velocity(x, 0.25)
    if solver == "heun":
        x1 = x + (0.5 - 0.25) * v
        v = 0.5 * (v + velocity(x1, 0.5))
    assert torch.equal(head.solver_step(x, 0.25, 0.5, z, cfg, guided), x + (0.5 - 0.25) * v)


def test_epsilon_head_step_equals_the_former_code():
    from visar.generators.components.eps_head import EpsilonHead
    from visar.nn.guidance import cfg_mix
    torch.manual_seed(0)
    lin = torch.nn.Linear(4 + 1 + 8, 4)
    head = EpsilonHead(lambda x, a, c: lin(torch.cat([x, a, c], -1)), 4, num_sampling_steps=8, x0_clip=2.0)
    n, t = 3, head.tables(8)
    z, x = torch.randn(2 * n, 8), torch.randn(2 * n, 4)
    cfg = torch.tensor([[1.5], [2.0], [4.0]])
    for i in (7, 3, 0):
        with torch.no_grad():
            mean, std = head.reverse_gaussian(t, x, i, z, cfg, True, 2.0)
            abar, half = float(t.abar[i]), x[:n]
            e = head.eps(torch.cat([half, half]), torch.full((2 * n, 1), abar), z)
            e = cfg_mix(e[:n], e[n:], cfg)
            e, xx = torch.cat([e, e]), torch.cat([half, half])
            x0 = ((xx - math.sqrt(1.0 - abar) * e) / math.sqrt(abar)).clamp(-2.0, 2.0)
            assert torch.equal(mean, float(t.coef1[i]) * x0 + float(t.coef2[i]) * xx)


def test_cfg_mix_equals_the_former_code():
    from visar.nn.guidance import cfg_mix
    c, u = torch.randn(4, 9), torch.randn(4, 9)
    for s in (2.5, torch.tensor(3.0), torch.rand(4, 1) * 4):
        assert torch.equal(cfg_mix(c, u, s), u + (c - u) * s)


# ---------------------------------------------------------------------------------------------- the logit draw
@pytest.mark.parametrize("kw", [dict(), dict(top_k=20), dict(top_p=0.7), dict(temperature=0.6, top_k=50, top_p=0.9),
                                dict(guided=True, cfg_scale=4.0), dict(guided=True, cfg_scale=0.5, top_k=5)])
def test_draw_from_logits_equals_the_multinomial_path(kw):
    """The fused path's reference is the default sampler's draw: same tokens, same generator state."""
    from visar.samplers.logits import cfg_mix, draw_from_logits, process_logits, sample_categorical
    kw = dict(kw)
    guided, cfg = kw.pop("guided", False), kw.pop("cfg_scale", 1.0)
    opts = dict(temperature=kw.get("temperature", 1.0), top_k=kw.get("top_k", 0), top_p=kw.get("top_p", 1.0))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(20):
        c, u = torch.randn(3, 257) * 3, torch.randn(3, 257) * 3
        mixed = cfg_mix(c, u, cfg) if guided else c
        old = sample_categorical(torch.softmax(process_logits(mixed, **opts), dim=-1), g1)
        new = draw_from_logits(c, generator=g2, uncond=u if guided else None, cfg_scale=cfg, **opts)
        assert torch.equal(old, new)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_sample_logits_checks_its_arguments():
    L = torch.randn(2, 10)
    with pytest.raises(ValueError, match="noise"):
        ops.sample_logits(L, torch.ones(2, 9))
    with pytest.raises(ValueError, match="logits must be"):
        ops.sample_logits(L[0], torch.ones(10))
    with pytest.raises(ValueError, match="top_k"):
        ops.sample_logits(L, torch.ones(2, 10), top_k=2.5)


def test_head_ops_check_their_arguments():
    with pytest.raises(ValueError, match="even row count"):
        ops.ddpm_step(torch.randn(3, 4), torch.randn(3, 4), 2.0, 1.0, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="learned variance"):
        ops.ddpm_step(torch.randn(2, 4), torch.randn(2, 8), None, 1.0, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="one per token"):
        ops.flow_step(torch.randn(3, 4), torch.randn(6, 4), 0.1, torch.ones(2, 1))
    with pytest.raises(ValueError, match="norm must be"):
        ops.norm_modulate(torch.randn(2, 4), torch.zeros(4), torch.zeros(4), norm="batch")


# ---------------------------------------------------------------------------------------------- small-row linear
def test_small_row_rule():
    assert small_row_rule(2, 768, 2048) and small_row_rule(3, 10, 10)
    assert small_row_rule(4, 2304, 768) and not small_row_rule(4, 768, 2048)
    assert small_row_rule(6, 16384, 768) and not small_row_rule(6, 2048, 768)
    assert not small_row_rule(1, 768, 768) and not small_row_rule(8, 16384, 768)


def test_fast_small_linear_is_opt_in_and_scoped():
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 96)
    x = torch.randn(1, 2, 48)
    with torch.no_grad():
        ref = F.linear(x, lin.weight, lin.bias)
        alt = small_row_linear(x, lin.weight, lin.bias)
        assert not ops.fast_small_linear_enabled()
        assert torch.equal(lin(x), ref)  # off by default: F.linear, bit for bit
        with ops.fast_small_linear():
            assert ops.fast_small_linear_enabled()
            assert torch.equal(lin(x), alt)  # nn.Linear takes mm(W, x^T) for 2 rows
            assert torch.equal(lin(x[:, :1]), F.linear(x[:, :1], lin.weight, lin.bias))  # 1 row: unchanged
            with ops.fast_small_linear(False):
                assert torch.equal(lin(x), ref)
        assert not ops.fast_small_linear_enabled()
        assert torch.equal(lin(x), ref)
    assert alt.shape == ref.shape and alt.is_contiguous()
    torch.testing.assert_close(alt, ref, rtol=1e-5, atol=1e-6)
    with ops.fast_small_linear():  # autograd keeps F.linear
        y = lin(x)
        assert torch.equal(y.detach(), ref) and y.requires_grad
    with pytest.raises(ValueError, match="enabled"):
        with ops.fast_small_linear("yes"):
            pass


# ---------------------------------------------------------------------------------------------- kernels
@pytest.mark.skipif(not dispatch.triton_available(), reason="triton does not import here: the Triton kernels "
                                                            "cannot be checked (their references are tested above)")
def test_kernels_under_interpreter():
    """Every kernel against its reference on CPU tensors under ``TRITON_INTERPRET=1`` (a fresh process: the
    variable must be set before the kernels are defined; one thread)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "VISAR_KERNELS": "kernel", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
           str(ROOT / "tests" / "test_ops_kernels.py")]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1], out.stdout[-2000:]
