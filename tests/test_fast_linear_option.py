"""``fast_linear``: the option every sampler takes to run its linear layers through the small-row route
(:mod:`visar.ops.linear`). It is off by default (the bit-exact default stays), routes the 2-7-row products
when on, stays within float32 rounding of the default, and refuses a non-boolean value."""
import pytest
import torch

import visar.ops.linear as small
from visar import zoo
from visar.conditions import Condition
from visar.samplers.base import default_sampler, get_sampler


def _count_routes(monkeypatch) -> list:
    calls = []
    original = small.small_row_linear

    def counted(x, weight, bias=None):
        calls.append(tuple(x.shape))
        return original(x, weight, bias)

    monkeypatch.setattr(small, "small_row_linear", counted)
    return calls


@pytest.mark.parametrize("preset", ["llamagen-gpt-tiny", "mar-tiny"])
def test_fast_linear_routes_small_rows_and_stays_within_rounding(preset, monkeypatch):
    torch.manual_seed(0)
    model = zoo.create(preset).eval()
    sampler = default_sampler(model)
    cond = Condition.of(torch.tensor([1]))
    calls = _count_routes(monkeypatch)
    ref = sampler(model, cond, torch.Generator().manual_seed(0), cfg_scale=2.0)
    assert calls == []  # off by default
    out = sampler(model, cond, torch.Generator().manual_seed(0), cfg_scale=2.0, fast_linear=True)
    assert calls, "fast_linear=True did not route any linear layer"
    assert not small.fast_small_linear_enabled()  # scoped to the call
    if ref.dtype == torch.long:
        assert torch.equal(ref, out) or (ref != out).float().mean() < 0.5
    else:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_fast_linear_is_every_samplers_option_and_is_checked():
    torch.manual_seed(0)
    model = zoo.create("llamagen-gpt-tiny").eval()
    draft = zoo.create("llamagen-gpt-tiny").eval()
    spec = get_sampler("speculative", draft=draft, k=2)
    spec(model, Condition.of(torch.tensor([0])), torch.Generator().manual_seed(0), fast_linear=True)
    with pytest.raises(TypeError, match="fast_linear must be True or False"):
        default_sampler(model)(model, Condition.of(torch.tensor([0])), fast_linear="yes")
    with pytest.raises(TypeError, match="fast_linear must be True or False"):
        get_sampler("autoregressive", fast_linear=1)
