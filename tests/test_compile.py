"""compile=True (visar.samplers.compiled): option checks, the cache of compiled steps, and compiled-vs-eager
agreement for every family.

The fast tests compile with dynamo's ``"eager"`` backend (the private hook ``_use_backend``): dynamo traces
every step exactly as with inductor (same wrappers, keys, cache, patching, padding), nothing is
code-generated. The inductor tests cold-compile one graph per shape (tens of seconds each on a CPU) and
carry the ``slow`` marker; they check tokens identical (discrete families) and latents within 1e-5 relative
(continuous families) in float32 on the CPU.
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from test_ctf_generator import make as tiny_ctf
from test_flowar_model import tiny as tiny_flowar
from test_mar_ar_continuous import tiny as tiny_continuous_ar
from test_mar_model import tiny as tiny_mar
from test_next_token_sampler import tiny as tiny_llamagen
from test_var_model import _pair as var_pair
from test_xar_model import tiny as tiny_xar
from visar.conditions import Condition
from visar.samplers import compiled
from visar.samplers.base import get_sampler
from visar.samplers.compiled import StepCompiler, _use_backend, check_compile_support, compiled_entries, signature
from visar.samplers.masked import MaskedSampler, most_tokens_per_iteration


def _var():
    return var_pair(scales=[1, 2])[0]


#: family -> (model factory, condition, sampler name, options, discrete)
FAMILIES = {
    "llamagen": (tiny_llamagen, [0, 3], "autoregressive", dict(cfg_scale=2.0), True),
    "var": (_var, [1, 2], "next_scale", dict(top_k=8), True),
    "ctf": (tiny_ctf, [0, 1], "coarse_to_fine", dict(cfg_scale=2.0), True),
    "continuous_ar": (tiny_continuous_ar, [0, 3], "continuous_ar", dict(cfg_scale=2.0), False),
    "mar": (lambda: tiny_mar().eval(), [0, 3], "masked", dict(cfg_scale=2.0, num_iter=4, num_steps=5), False),
    "flowar": (tiny_flowar, [0, 3], "next_scale_flow", dict(cfg_scale=2.0, num_steps=6), False),
    "xar": (tiny_xar, [0, 3], "next_x", dict(cfg_scale=2.0, num_steps=3), False),
}


def _cond(name, labels):
    return torch.tensor(labels) if name == "var" else Condition.of(labels)


def _compare(name):
    """Eager sample, compiled sample, the compiled call's stats, and a second compiled call's stats."""
    factory, labels, sampler, opts, discrete = FAMILIES[name]
    model, s = factory(), get_sampler(sampler)
    cond = _cond(name, labels)
    eager = s(model, cond, torch.Generator().manual_seed(0), **opts)
    comp = s(model, cond, torch.Generator().manual_seed(0), compile=True, **opts)
    first = dict(s.stats)
    again = s(model, cond, torch.Generator().manual_seed(0), compile=True, **opts)
    second = dict(s.stats)
    return eager, comp, again, first, second, discrete


def _assert_agree(eager, comp, discrete, rtol=1e-5):
    if isinstance(eager, list):  # VAR: ids per scale
        assert all(torch.equal(a, b) for a, b in zip(eager, comp))
    elif discrete:
        assert torch.equal(eager, comp)
    else:
        err = ((eager - comp).abs().max() / eager.abs().max()).item()
        assert err <= rtol, f"compiled latents differ from eager by {err:.2e} (relative to the largest value)"


# ---------------------------------------------------------------------------------------------- options
def test_compile_option_is_a_bool_and_needs_the_cache():
    with pytest.raises(TypeError, match="compile must be True or False"):
        get_sampler("autoregressive", compile="yes")
    with pytest.raises(ValueError, match="needs use_cache=True"):
        get_sampler("next_scale", compile=True, use_cache=False).resolve({})
    with pytest.raises(ValueError, match="needs use_cache=True"):
        get_sampler("continuous_ar", compile=True, use_cache=False).resolve({})


@pytest.mark.parametrize("name", ["speculative", "jacobi", "cspd", "flow_map", "distilled"])
def test_samplers_without_a_compiled_step_refuse_compile(name):
    with pytest.raises(TypeError, match="compile option is not supported by"):
        get_sampler(name, compile=True)


def test_old_torch_and_missing_compiler_are_clear_errors(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "1.13.1")
    with pytest.raises(RuntimeError, match="needs torch >= 2.0"):
        check_compile_support("cpu")
    monkeypatch.undo()
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("visar-no-such-compiler++",))
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
        check_compile_support("cpu")
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):  # before any work
        get_sampler("autoregressive")(tiny_llamagen(), Condition.of([0]), compile=True)


# ---------------------------------------------------------------------------------------------- cache
def test_signature_separates_shapes_strides_dtypes_and_values():
    x = torch.zeros(2, 3)
    assert signature(x) == signature(torch.ones(2, 3))
    assert len({signature(v) for v in (x, x.t(), x.double(), torch.zeros(3, 2), x[:1])}) == 5
    assert signature([x, 1, None]) != signature([x, 2, None])


def test_second_call_reuses_the_graph_a_new_batch_adds_one_and_they_go_with_the_model():
    m, s = tiny_llamagen(), get_sampler("autoregressive", cfg_scale=2.0)
    cond = Condition.of([0, 3])
    eager = s(m, cond, torch.Generator().manual_seed(1))
    with _use_backend("eager"):
        a = s(m, cond, torch.Generator().manual_seed(1), compile=True)
        assert s.stats["compiled_graphs"] == 1 and s.stats["compile_s"] > 0
        b = s(m, cond, torch.Generator().manual_seed(1), compile=True)
        assert s.stats["compiled_graphs"] == 0 and s.stats["compile_s"] == 0
        assert compiled_entries(m) == 1
        s(m, Condition.of([1]), torch.Generator().manual_seed(1), compile=True)  # 2 rows instead of 4
        assert s.stats["compiled_graphs"] == 1 and compiled_entries(m) == 2
        assert compiled_entries(tiny_llamagen()) == 0  # kept per model
    assert torch.equal(a, eager) and torch.equal(b, eager)
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None  # the cache holds its models weakly


def test_patch_restores_the_method_even_after_an_error():
    net = tiny_mar().head.net
    with _use_backend("eager"):
        c = StepCompiler("cpu")
        with pytest.raises(ZeroDivisionError):
            with c.patch(net, "forward", "head"):
                assert "forward" in vars(net)
                1 / 0
        assert "forward" not in vars(net)
        with c.patch(net, "forward", "head"), pytest.raises(RuntimeError, match="already replaces it"):
            with c.patch(net, "forward", "head"):
                pass


def test_padded_rows_give_one_graph_and_the_unpadded_values():
    net = tiny_mar().head.net.eval()
    x, t, z = torch.randn(5, 16), torch.arange(5).float(), torch.randn(5, 32)
    with _use_backend("eager"), torch.no_grad():
        c = StepCompiler("cpu")
        f = c.function(net, type(net).forward, "head", pad_rows=8)
        out3, out5 = f(x[:3], t[:3], z[:3]), f(x, t, z)
        assert c.graphs == 1 and out3.shape[0] == 3 and out5.shape[0] == 5
        torch.testing.assert_close(out5, net(x, t, z), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out3, out5[:3], rtol=1e-6, atol=1e-6)


def test_masked_schedule_maximum_matches_the_sampler():
    m, s = tiny_mar().eval(), MaskedSampler(num_iter=5, num_steps=2)
    s(m, Condition.of([0, 1]), torch.Generator().manual_seed(0))
    assert max(s.stats["rows_per_step"]) == 2 * most_tokens_per_iteration(5, m.num_tokens)


def test_patched_padded_head_network_agrees_with_eager_under_dynamo():
    """Dynamo traces MAR's patched, padded head network in one full graph (the decode step: the test above);
    with the eager backend the latents equal the eager sampler's up to the padded GEMMs' rounding."""
    with _use_backend("eager"):
        eager, comp, again, first, second, discrete = _compare("mar")
    _assert_agree(eager, comp, discrete, rtol=1e-6)
    assert first["compiled_graphs"] == 1 and second == {**first, "compile_s": 0.0, "compiled_graphs": 0}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["var", "ctf", "continuous_ar", "flowar", "xar"])
def test_every_family_traces_in_full_graphs(name):
    """Every family's wrappers under dynamo (eager backend; 1-10 s per family on a CPU)."""
    with _use_backend("eager"):
        eager, comp, again, first, second, discrete = _compare(name)
    _assert_agree(eager, comp, discrete, rtol=1e-6)
    assert first["compiled_graphs"] >= 1 and second["compiled_graphs"] == 0 and second["compile_s"] == 0


# ---------------------------------------------------------------------------------------------- inductor
@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_compiled_sample_agrees_with_eager(name):
    """Inductor (cold: tens of seconds per graph): tokens identical, latents within 1e-5 relative."""
    eager, comp, again, first, second, discrete = _compare(name)
    _assert_agree(eager, comp, discrete)
    _assert_agree(comp, again, discrete, rtol=0.0)  # the cached graphs give the same result again
    assert first["compiled_graphs"] >= 1 and first["compile_s"] > 0
    assert second["compiled_graphs"] == 0 and second["compile_s"] == 0


def test_module_docstring_names_every_compiling_sampler():
    from visar.registry import names

    for name in names("sampler"):
        takes = "compile" in get_sampler(name).defaults
        assert (f"\n{name} " in compiled.__doc__ or f"\n{name}\n" in compiled.__doc__) == takes, name


def test_cli_flags_set_the_sampler_option():
    from visar.cli import build_parser
    from visar.eval.cli import build_parser as build_eval_parser

    p = build_parser()
    assert p.parse_args(["sample", "--compile"]).compile and not p.parse_args(["sample"]).compile
    assert p.parse_args(["t2i", "a red circle", "--compile"]).compile
    assert build_eval_parser().parse_args(["sample", "m", "--out", "o", "--compile"]).compile


@torch.no_grad()
def test_kv_cache_starts_zeroed_because_the_whole_cache_step_reads_unwritten_entries():
    """torch.empty would not be exact: the static-shape step reads unwritten entries with weight 0, and
    0 * NaN is NaN (recycled memory can hold NaN or inf)."""
    m = tiny_llamagen()
    state, _ = m.start(Condition.of([0]))
    C = state.cond_len
    assert all(bool((layer.k[:, C:] == 0).all() and (layer.v[:, C:] == 0).all()) for layer in state.cache.layers)
    fed, pos = torch.tensor([[5]]), torch.tensor([0])
    clean = m.decode_step(state, fed, pos, None)
    for layer in state.cache.layers:
        layer.v[:, C + 2:] = float("nan")  # never written, masked by position
    assert torch.isfinite(m.decode_step(state, fed, pos, C + 1)).all()  # the prefix-only step skips them
    assert torch.isnan(m.decode_step(state, fed, pos, None)).all()  # the whole-cache step does not
    assert torch.isfinite(clean).all()
