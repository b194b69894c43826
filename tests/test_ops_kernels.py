"""Every Triton kernel of visar.ops against its PyTorch reference, on CPU tensors under Triton's interpreter.

Run by ``tests/test_ops.py::test_kernels_under_interpreter`` in a subprocess with ``TRITON_INTERPRET=1`` and
``VISAR_KERNELS=kernel`` (the interpreter must be on before any kernel is defined, so it cannot be switched on
inside the main test process); collected directly, these tests skip. Shapes include odd sizes (masked tails);
float32 and bfloat16 inputs; at most 64 programs per launch. bfloat16 results are compared within one bfloat16
rounding (the kernels round each intermediate the way torch does, in float32 arithmetic).
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

from visar.ops import dispatch

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("VISAR_KERNELS") != "kernel",
                       reason="kernel checks run in a subprocess started by tests/test_ops.py with TRITON_INTERPRET=1 "
                              "and VISAR_KERNELS=kernel"),
    pytest.mark.skipif(not dispatch.triton_available(), reason="triton does not import"),
]

import visar.ops as ops  # noqa: E402

R = {m: importlib.import_module(f"visar.ops.{m}") for m in ("rmsnorm", "adaln", "activations", "cfg", "head_step",
                                                            "sampling")}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def launches(monkeypatch):
    """Counts kernel launches per kernel module (proves the kernel, not the reference, ran)."""
    counts = {}
    for name in ("rmsnorm", "adaln", "activations", "cfg", "head_step", "sampling"):
        mod = dispatch.kernels(name)
        for attr in [a for a in dir(mod) if a.startswith("launch")]:
            fn = getattr(mod, attr)

            def counted(*a, _fn=fn, _key=f"{name}.{attr}", **k):
                counts[_key] = counts.get(_key, 0) + 1
                return _fn(*a, **k)
            monkeypatch.setattr(mod, attr, counted)
    return counts


def close(a, b, dtype):
    """Equal shapes and dtypes; float32 within 2e-6 relative (1e-5 absolute: erf and exp differ in the last bits
    between torch and Triton), bfloat16 within one rounding (2^-7 relative)."""
    if isinstance(a, tuple):
        for u, v in zip(a, b):
            close(u, v, dtype)
        return
    if a is None or b is None:
        assert a is None and b is None
        return
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    tol = dict(rtol=2e-6, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(a.float(), b.float(), **tol)


def rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype)


# ---------------------------------------------------------------------------------------------- rms norm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (2, 5, 64), (4, 130), (1, 3, 1000)])
@pytest.mark.parametrize("affine,residual", [(False, False), (True, False), (True, True), (False, True)])
def test_rms_norm(dtype, shape, affine, residual, launches):
    x = rand(*shape, dtype=dtype)
    w = rand(shape[-1], dtype=dtype) if affine else None
    r = rand(*shape, dtype=dtype) if residual else None
    got = ops.rms_norm(x, w, 1e-6, residual=r)
    ref = R["rmsnorm"].rms_norm_reference(x + r if residual else x, w, 1e-6)
    close(got, (ref, x + r) if residual else ref, dtype)
    assert launches == {"rmsnorm.launch": 1}


# ---------------------------------------------------------------------------------------------- adaln
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm,affine", [("rms", False), ("rms", True), ("layer", False), ("layer", True)])
@pytest.mark.parametrize("layout", ["per_image", "per_token", "rows_2d", "chunks_2d"])
def test_norm_modulate(dtype, norm, affine, layout, launches):
    D = 37
    if layout == "per_image":  # [B, N, D] with [B, 1, D] chunks of one modulation output
        x, mod = rand(3, 5, D, dtype=dtype), rand(3, 1, 6 * D, dtype=dtype)
        shift, scale = mod[..., D:2 * D], mod[..., 4 * D:5 * D]
    elif layout == "per_token":
        x, shift, scale = rand(2, 7, D, dtype=dtype), rand(2, 7, D, dtype=dtype), rand(2, 7, D, dtype=dtype)
    elif layout == "rows_2d":  # [N, D] with one row broadcast
        x, shift, scale = rand(9, D, dtype=dtype), rand(D, dtype=dtype), rand(1, D, dtype=dtype)
    else:  # MAR's head: [N, W] with strided chunks of [N, 3W]
        x, mod = rand(11, D, dtype=dtype), rand(11, 3 * D, dtype=dtype)
        shift, scale = mod.chunk(3, dim=-1)[:2]
    w = rand(D, dtype=dtype) if affine else None
    b = rand(D, dtype=dtype) if affine and norm == "layer" else None
    got = ops.norm_modulate(x, shift, scale, norm, 1e-6, w, b)
    close(got, R["adaln"].norm_modulate_reference(x, shift, scale, norm, 1e-6, w, b), dtype)
    assert launches == {"adaln.launch": 1}


# ---------------------------------------------------------------------------------------------- activations
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(1,), (3, 333), (2, 5, 1025)])
def test_gated_activation(dtype, act, shape, launches):
    a, b = rand(*shape, dtype=dtype, scale=3.0), rand(*shape, dtype=dtype)
    close(ops.gated_activation(a, b, act), R["activations"].gated_activation_reference(a, b, act), dtype)
    assert launches == {"activations.launch": 1}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(dtype, approximate, launches):
    x = rand(7, 301, dtype=dtype, scale=4.0)
    x[0, :4] = torch.tensor([0.0, -20.0, 20.0, 1e-6]).to(dtype)
    close(ops.gelu(x, approximate), torch.nn.functional.gelu(x, approximate=approximate), dtype)
    assert launches == {"activations.launch": 1}


# ---------------------------------------------------------------------------------------------- guidance
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", ["float", "tensor1", "per_row"])
def test_cfg_mix(dtype, scale, launches):
    c, u = rand(5, 3, 131, dtype=dtype), rand(5, 3, 131, dtype=dtype)
    s = {"float": 2.75, "tensor1": torch.tensor([4.0]), "per_row": torch.rand(5, 3, 1) * 4}[scale]
    close(ops.cfg_mix(c, u, s), R["cfg"].cfg_mix_reference(c, u, s), dtype)
    assert launches == {"cfg.launch": 1}


# ---------------------------------------------------------------------------------------------- head steps
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("guided,cfg", [(False, None), (True, 3.0), (True, "per_token")])
@pytest.mark.parametrize("clip", [None, 0.8])
@pytest.mark.parametrize("variant", ["learned", "divide_shared"])
def test_ddpm_step(dtype, guided, cfg, clip, variant, launches):
    n, C = 5, 13
    rows = 2 * n if guided else n
    if cfg == "per_token":
        cfg = torch.rand(n, 1) * 4
    x = rand(rows, C)  # the chain's state stays float32; the network output may be bfloat16
    if variant == "learned":
        out = torch.cat([rand(rows, C), torch.rand(rows, C) * 2 - 1], 1).to(dtype)
        args = (1.7, 0.9, 0.35, 0.62, clip, -4.2, -5.1)
        kw = {}
    else:
        out = rand(rows, C, dtype=dtype)
        args = (0.8, 0.6, 0.35, 0.62, clip)
        kw = dict(divide=True, shared_x=True)
    got = ops.ddpm_step(x, out, cfg, *args, **kw)
    close(got, R["head_step"].ddpm_step_reference(x, out, cfg, *args, **kw), dtype)
    assert launches == {"head_step.launch_ddpm": 1}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("guided,cfg", [(False, None), (True, 4.3), (True, "per_token")])
@pytest.mark.parametrize("heun", [False, True])
def test_flow_step(dtype, guided, cfg, heun, launches):
    n, C = 7, 19
    if cfg == "per_token":
        cfg = torch.rand(n, 1) * 4
    x, v = rand(n, C), rand(2 * n if guided else n, C, dtype=dtype)
    vp = rand(n, C) if heun else None
    got = ops.flow_step(x, v, 0.04, cfg, v_prev=vp)
    close(got, R["head_step"].flow_step_reference(x, v, 0.04, cfg, v_prev=vp), dtype)
    assert launches == {"head_step.launch_flow": 1}


# ---------------------------------------------------------------------------------------------- the logit path
SAMPLING = [dict(), dict(top_k=1), dict(top_k=17), dict(top_p=0.5), dict(top_p=0.05), dict(top_k=40, top_p=0.9),
            dict(temperature=0.3, top_k=100, top_p=0.95), dict(temperature=2.0), dict(top_k=10 ** 6),
            dict(guided=True, cfg_scale=4.0), dict(guided=True, cfg_scale=1.5, top_k=30, top_p=0.8)]


@pytest.mark.parametrize("V", [1, 7, 1000, 4099])  # 4099: a masked tail of 4093 in a block of 8192
@pytest.mark.parametrize("kw", SAMPLING, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()) or "plain")
def test_sample_logits(V, kw, launches):
    kw = dict(kw)
    guided = kw.pop("guided", False)
    B = 4
    logits = rand(B, V, scale=3.0)
    uncond = rand(B, V, scale=3.0) if guided else None
    for draw in range(2):
        noise = torch.empty(B, V).exponential_()
        got = ops.sample_logits(logits, noise, uncond=uncond, **kw)
        ref = R["sampling"].sample_logits_reference(logits, noise, uncond=uncond, **kw)
        assert got.dtype == torch.long and torch.equal(got, ref), (got, ref)
    assert launches == {"sampling.launch": 2}


def test_sample_logits_bfloat16_and_ties(launches):
    """bfloat16 logits are processed in float32 (the reference on the upcast logits); top-k keeps ties."""
    logits = rand(4, 515, dtype=torch.bfloat16, scale=3.0)
    noise = torch.empty(4, 515).exponential_()
    for kw in (dict(), dict(top_k=25, top_p=0.9)):
        assert torch.equal(ops.sample_logits(logits, noise, **kw),
                           R["sampling"].sample_logits_reference(logits.float(), noise, **kw))
    tied = torch.randint(0, 6, (4, 64)).float()  # many exact ties at the k-th value
    for k in (1, 3, 10, 33):
        for _ in range(2):
            noise = torch.empty(4, 64).exponential_()
            assert torch.equal(ops.sample_logits(tied, noise, top_k=k),
                               R["sampling"].sample_logits_reference(tied, noise, top_k=k))


def test_sample_logits_keeps_what_the_filters_keep():
    """With noise making every kept token a candidate, the kernel never draws a token the filters removed."""
    logits = rand(3, 200, scale=2.0)
    kept = R["sampling"].process_logits(logits, 1.0, 20, 0.7) > float("-inf")
    hits = torch.zeros_like(kept)
    for _ in range(8):
        tok = ops.sample_logits(logits, torch.empty(3, 200).exponential_(), top_k=20, top_p=0.7)
        hits[torch.arange(3), tok] = True
    assert not (hits & ~kept).any()
    assert hits.sum() >= 3


# ---------------------------------------------------------------------------------------------- wired blocks
def test_blocks_run_the_kernels(launches):
    """The building blocks reach the kernels (counted) and agree with the forced reference."""
    from visar.generators.components.heads import DiffusionHead, FlowHead
    from visar.nn.adaln_block import AdaLNBlock
    from visar.samplers.heads import sample_head

    blk = AdaLNBlock(32, 4, cond_dim=16).eval()
    for p in blk.ada_lin.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, c = rand(2, 9, 32), rand(2, 16)
    with torch.no_grad():
        got = blk(x, c)
        with ops.kernel_mode_set("reference"):
            ref = blk(x, c)
    close(got, ref, torch.float32)
    assert launches["adaln.launch"] == 2 and launches["activations.launch"] == 1

    for head in (DiffusionHead(4, 16, width=32, depth=1, num_sampling_steps=4), FlowHead(4, 16, 32, 1, 3, "heun")):
        for p in head.parameters():
            torch.nn.init.normal_(p, std=0.2)
        z = rand(6, 16)
        with ops.kernel_mode_set("reference"):
            ref = sample_head(head.eval(), z, cfg=3.0, generator=torch.Generator().manual_seed(1))
        got = sample_head(head.eval(), z, cfg=3.0, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert launches["head_step.launch_ddpm"] == 4 and launches["head_step.launch_flow"] == 6
