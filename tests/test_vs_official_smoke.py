"""benchmarks/vs_official.py without timing claims: argument validation, option parsing, the run-order rotation,
the bandwidth / FLOP bookkeeping, and (only where an official checkout is given) one tiny side-by-side run
whose outputs must agree.

The end-to-end test needs the official repositories, which visar never ships or downloads: set
``VISAR_OFFICIAL_DIR`` to a folder holding extracted checkouts named ``llamagen``, ``var``, ``mar``, ``flowar``
and ``xar`` (as in docs/performance.md); without it that test is skipped with the reason. No test asserts a
time or a speed ratio.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vs():
    path = ROOT / "benchmarks" / "vs_official.py"
    spec = importlib.util.spec_from_file_location("vs_official_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("official_families", None)


def parse_error(vs, argv, capsys) -> str:
    ap = vs.build_parser()
    with pytest.raises(SystemExit) as e:
        vs.check_args(ap, ap.parse_args(argv))
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("extra, needle", [
    (["--size", "d16"], "--size 'd16' is not one of"),
    (["--size", "tiny", "--pairs", "0"], "--pairs must be >= 1"),
    (["--size", "tiny", "--batch", "1", "0"], "--batch sizes must be >= 1"),
    (["--size", "tiny", "--threads", "0"], "--threads must be >= 1"),
    (["--size", "tiny", "--num-tokens", "0"], "--num-tokens must be >= 1"),
    (["--size", "tiny", "--vae-checkpoint", "x.pth"], "--vae-checkpoint is for --family var only"),
    (["--size", "tiny", "--checkpoint", "/nonexistent/x.pth"], "no such file"),
    (["--size", "tiny", "--visar-option", "compile"], "KEY=VALUE"),
])
def test_bad_arguments_fail_before_any_model_is_built(vs, tmp_path, capsys, extra, needle):
    err = parse_error(vs, ["--official", str(tmp_path), "--family", "llamagen", *extra], capsys)
    assert needle in err


def test_missing_checkout_and_var_checkpoint_rules(vs, tmp_path, capsys):
    err = parse_error(vs, ["--official", str(tmp_path / "absent"), "--family", "mar", "--size", "tiny"], capsys)
    assert "not a folder" in err
    ckpt = tmp_path / "var.pth"
    ckpt.write_bytes(b"")
    err = parse_error(vs, ["--official", str(tmp_path), "--family", "var", "--size", "tiny",
                           "--checkpoint", str(ckpt)], capsys)
    assert "--vae-checkpoint" in err
    err = parse_error(vs, ["--official", str(tmp_path), "--family", "xar", "--size", "tiny", "--num-steps", "2"],
                      capsys)
    assert ">= 3 for xar" in err


def test_valid_arguments_return_the_visar_options(vs, tmp_path):
    ap = vs.build_parser()
    args = ap.parse_args(["--official", str(tmp_path), "--family", "llamagen", "--size", "tiny",
                          "--visar-option", "compile=True", "--visar-option", "top_k=5", "--visar-option", "mode=max"])
    assert vs.check_args(ap, args) == {"compile": True, "top_k": 5, "mode": "max"}


def test_pair_orders_balance_positions(vs):
    two = vs.pair_orders(["official", "visar"], 4)
    assert [o[0] for o in two].count("official") == 2
    three = vs.pair_orders(["official", "visar", "visar_best"], 6)
    for side in ("official", "visar", "visar_best"):
        assert [o.index(side) for o in three].count(0) == 2
        assert sorted(o.index(side) for o in three) == [0, 0, 1, 1, 2, 2]
    assert all(sorted(o) == ["official", "visar", "visar_best"] for o in three)


def test_with_context_wraps_every_call(vs):
    import contextlib

    entered = []

    @contextlib.contextmanager
    def ctx():
        entered.append("in")
        yield
        entered.append("out")

    wrapped = vs.WithContext(lambda x, k=0: (x, k, list(entered)), ctx)
    assert wrapped(3, k=4) == (3, 4, ["in"])
    assert entered == ["in", "out"]


def test_bandwidth_and_gemm_rate_are_positive(vs):
    bw = vs.measure_bandwidth(mib=8, repeats=2)
    rate = vs.measure_matmul_rate(n=64, repeats=2)
    assert math.isfinite(bw) and bw > 0
    assert math.isfinite(rate) and rate > 0


def test_roof_per_pass_is_bytes_over_bandwidth(vs):
    rows = vs.roof_per_pass([("trunk", None, 4000), ("head", None, 1000)], {"trunk": 3, "head": 50}, 2000.0)
    assert rows == [dict(group="trunk", bytes_per_pass=4000, passes=3, roof_per_pass_s=2.0),
                    dict(group="head", bytes_per_pass=1000, passes=50, roof_per_pass_s=0.5)]


def test_pass_counter_counts_passes_and_bytes(vs):
    from official_families import param_bytes

    net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3), nn.Conv1d(3, 3, 1))
    lin = net[1]
    groups = [("net", lin, param_bytes([net]))]
    assert param_bytes([net]) == (4 * 3 + 3 + 3 * 3 + 3) * 4  # the embedding table is excluded
    with vs.PassCounter(groups) as counter:
        for _ in range(3):
            lin(torch.randn(5, 4))
    assert counter.calls == {"net": 3}
    assert counter.total_bytes() == 3 * param_bytes([net])
    lin(torch.randn(1, 4))  # hooks removed on exit
    assert counter.calls == {"net": 3}


def test_flop_counter_counts_linear_and_fused_cpu_attention(vs):
    import torch.nn.functional as F

    q = torch.randn(1, 2, 16, 8)
    with vs.flop_counter() as fc:
        F.linear(torch.randn(5, 4), torch.randn(3, 4))
        F.scaled_dot_product_attention(q, q, q)
    assert fc.get_total_flops() == 2 * 5 * 4 * 3 + 4 * 2 * 16 * 16 * 8


def test_refill_zero_parameters_is_seeded(vs):
    from official_families import refill_zero_parameters

    def make():
        m = nn.Linear(3, 2)
        nn.init.zeros_(m.weight)
        return m

    a, b = make(), make()
    assert refill_zero_parameters(a, 0) == 1 and refill_zero_parameters(b, 0) == 1
    assert torch.equal(a.weight, b.weight) and a.weight.abs().sum() > 0


FAMILY_NEEDS = {"llamagen": (), "var": (), "mar": ("timm",), "flowar": ("timm", "einops"), "xar": ("timm", "einops")}


@pytest.mark.parametrize("family", sorted(FAMILY_NEEDS))
def test_tiny_side_by_side_run_agrees(vs, family, tmp_path):
    root = os.environ.get("VISAR_OFFICIAL_DIR")
    if not root:
        pytest.skip("no official checkout given: set VISAR_OFFICIAL_DIR to a folder with the extracted official "
                    "repositories (llamagen, var, mar, flowar, xar; see docs/performance.md)")
    checkout = Path(root) / family
    if not checkout.is_dir():
        pytest.skip(f"{checkout} is missing (VISAR_OFFICIAL_DIR holds no {family} checkout)")
    for mod in FAMILY_NEEDS[family]:
        pytest.importorskip(mod, reason=f"the official {family} code imports {mod} (a benchmark-only requirement)")
    saved_path, saved_mods, saved_cuda = list(sys.path), set(sys.modules), torch.Tensor.cuda
    try:
        report = vs.main(["--official", str(checkout), "--family", family, "--size", "tiny", "--batch", "1",
                          "--pairs", "1", "--seed", "3", "--json", str(tmp_path / "r.json")])
    finally:  # the official packages (models, autoregressive, ...) must not leak into other tests
        sys.path[:] = saved_path
        torch.Tensor.cuda = saved_cuda  # the benchmark makes it the identity on a CPU-only machine
        for name in set(sys.modules) - saved_mods:
            if name != "official_families":
                sys.modules.pop(name, None)
    (res,) = report["results"]
    assert res["variants"]["visar"]["agree"], res["variants"]["visar"]["agree_detail"]
    assert res["weight_bytes_read"] > 0 and res["flops"]["visar"] > 0 and res["flops"]["official"] > 0
    assert (tmp_path / "r.json").is_file()
