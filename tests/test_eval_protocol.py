"""Evaluation protocols: read from Preset.eval, overrides merged, every departure logged."""
from __future__ import annotations

import logging

import pytest

from visar import zoo
from visar.eval.protocol import resolve_protocol, split_eval_dict
from visar.zoo import Preset


@pytest.fixture
def preset(monkeypatch):
    """A preset whose generator is the test double of test_eval_sampling (sample(cfg_scale, temperature))."""
    p = Preset(cls="test_eval_sampling:TinyGenerator", paper="test",
               eval={"cfg_scale": 4.0, "temperature": 1.0, "image_size": 384, "image_size_eval": 256,
                     "labels": "random (uniform class ids)", "num_samples": 50000, "fid_reported": 2.62,
                     "source": "a README", "tokenizer": "vq"})
    monkeypatch.setitem(zoo._registry(), "proto-test", p)
    monkeypatch.setitem(zoo._registry(), "proto-empty", Preset(cls="test_eval_sampling:TinyGenerator"))
    return p


def test_protocol_facts_and_options_are_separated(preset):
    p = resolve_protocol("proto-test")
    assert p.options == {"cfg_scale": 4.0, "temperature": 1.0}
    assert (p.labels, p.image_size, p.resize, p.num_samples) == ("random", 384, 256, 50000)
    assert p.reference == "VIRTUAL_imagenet256_labeled.npz" and p.reported_fid == 2.62
    assert p.source == "a README" and p.notes["tokenizer"] == "vq" and p.departures == []


def test_departures_are_logged(preset, caplog):
    with caplog.at_level(logging.WARNING, logger="visar.eval"):
        p = resolve_protocol("proto-test", {"cfg_scale": 2.0, "top_k": 50, "temperature": 1.0}, labels="balanced",
                             num_samples=10000, resize=None)
    assert p.options == {"cfg_scale": 2.0, "temperature": 1.0, "top_k": 50}
    assert p.departures == ["departure: cfg_scale 2.0 (protocol 4.0)", "departure: top_k 50 (protocol not set)",
                            "departure: labels 'balanced' (protocol 'random')",
                            "departure: num_samples 10000 (protocol 50000)", "departure: resize not set (protocol 256)"]
    assert "departure: cfg_scale 2.0 (protocol 4.0)" in caplog.text
    with pytest.raises(ValueError, match="no evaluation protocol"):
        resolve_protocol("proto-empty")
    with pytest.raises(KeyError, match="unknown preset"):
        resolve_protocol("no-such-model")


def test_split_for_samplers_with_kwargs_and_aliases():
    opts, facts = split_eval_dict({"cfg": 2.9, "num_iter": 256, "labels": "50 per class", "evaluator": "ADM",
                                   "settings_source": "see the paper, Sec. 4"}, {"cfg", "cfg_scale"}, True)
    assert opts == {"cfg": 2.9, "num_iter": 256} and set(facts) == {"labels", "evaluator", "settings_source"}
    opts, facts = split_eval_dict({"cfg": 2.9, "num_iter": 256}, {"cfg"}, False)
    assert opts == {"cfg": 2.9} and facts == {"num_iter": 256}


def test_official_protocols_when_presets_exist():
    """The family presets' protocols as the papers/READMEs state them (skipped until they are registered)."""
    expect = {"llamagen-gpt-xl": ({"cfg_scale": 1.75, "top_k": 0, "top_p": 1.0, "temperature": 1.0}, "random", 256),
              "llamagen-gpt-b": ({"cfg_scale": 2.0}, "random", None),
              "var-d16": ({"cfg_scale": 2.5, "top_k": 900, "top_p": 0.96, "more_smooth": False}, "balanced", None),
              "mar-b": ({"cfg_scale": 2.9, "num_iter": 256, "num_steps": 100, "cfg_schedule": "linear"},
                        "balanced", None),
              "flowar-s": ({"cfg_scale": 4.3, "num_steps": 25, "guidance_high": 0.9}, None, None),
              "xar-b": ({"cfg_scale": 2.7, "num_steps": 40}, None, None)}
    known = [n for n in expect if n in zoo.list_models()]
    if not known:
        pytest.skip("no family presets registered")
    for name in known:
        opts, labels, resize = expect[name]
        p = resolve_protocol(name)
        assert {k: p.options.get(k) for k in opts} == opts, name
        assert (p.labels, p.resize) == (labels, resize), name
    if "mar-b" in known:  # one vocabulary: --cfg-scale is MAR's cfg_scale too
        assert resolve_protocol("mar-b", {"cfg_scale": 3.5}).options["cfg_scale"] == 3.5
