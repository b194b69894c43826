"""The Pipeline's sampler slot, the option vocabulary and the registry the CLI reads."""
from __future__ import annotations

import importlib
import json

import pytest
import torch

from visar import registry, zoo
from visar.pipeline import Pipeline, migrate_sampling_defaults
from visar.samplers.base import Sampler, get_sampler
from visar.samplers.options import RENAMED, check_option_names


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    gen = zoo.create("llamagen-gpt-tiny")
    torch.nn.init.normal_(gen.head.weight, std=0.5)  # LlamaGen starts its logits head at zero: make them differ
    return Pipeline(zoo.create("llamagen-vq-tiny"), gen)


def test_default_sampler_is_the_generators_own_and_reproduces_generator_sample(pipe):
    assert pipe.sampler.name == pipe.generator.default_sampler == "autoregressive"
    cond = torch.tensor([1, 2])
    a = pipe.generate(cond, seed=4, cfg_scale=2.0, top_k=10)
    tokens = pipe.generator.sample(visar_cond(cond), generator=torch.Generator().manual_seed(4), cfg_scale=2.0,
                                   top_k=10)
    assert torch.equal(a, pipe.tokenizer.decode(tokens).clamp(-1, 1))


def visar_cond(labels):
    from visar.conditions import Condition

    return Condition.of(labels)


def test_sampler_given_per_call_or_at_construction(pipe, tmp_path):
    s = get_sampler("autoregressive", top_k=1)
    p2 = Pipeline(pipe.tokenizer, pipe.generator, sampler=s)
    greedy = p2.generate([3], seed=0)
    assert torch.equal(greedy, pipe.generate([3], seed=99, sampler=s))  # top_k=1: the seed does not matter
    assert torch.equal(greedy, pipe.generate([3], seed=7, top_k=1))
    p2.save_pretrained(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "pipeline.json").read_text())
    assert meta["sampler"] == {"name": "autoregressive", "options": {"top_k": 1}} and meta["version"] == 3
    loaded = Pipeline.from_pretrained(tmp_path / "p")
    assert loaded.sampler.options == {"top_k": 1} and torch.equal(loaded.generate([3], seed=0), greedy)


@pytest.mark.parametrize("bad,right", [("cfg", "cfg_scale"), ("num_sampling_steps", "num_steps")])
def test_old_option_names_name_the_new_one(pipe, bad, right):
    with pytest.raises(TypeError, match=right):
        pipe.generate([0], **{bad: 2.0})
    assert RENAMED[bad] == right


@pytest.mark.parametrize("opts,match", [({"cfg_scale": -1.0}, "cfg_scale"), ({"cfg_scale": "2"}, "cfg_scale"),
                                        ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                                        ({"top_k": -3}, "top_k"), ({"top_k": 2.5}, "top_k"),
                                        ({"temperature": 0.0}, "temperature"), ({"tmperature": 1.0}, "temperature")])
def test_bad_option_values_fail_before_sampling(pipe, opts, match):
    with pytest.raises((TypeError, ValueError), match=match):
        pipe.generate([0], **opts)


def test_check_option_names_suggests():
    with pytest.raises(TypeError, match="did you mean 'top_k'"):
        check_option_names(["top_kk"], ["top_k", "top_p"], "X")


def test_registry_is_the_one_list():
    samplers = registry.names("sampler")
    for name in ("autoregressive", "masked", "next_scale", "next_scale_flow", "next_x", "coarse_to_fine",
                 "continuous_ar"):
        assert name in samplers and issubclass(registry.get("sampler", name), Sampler)
    assert set(registry.names("task")) >= {"tokenizer", "generator", "classifier"}
    assert set(registry.names("converter")) >= {"llamagen", "var", "mar", "flowar", "xar"}
    assert set(registry.names("family")) >= {"llamagen", "var", "mar", "mar-ar", "flowar", "xar", "ctf"}
    # every generator preset's class is a registered family, and its default sampler is registered
    families = {c: n for n, c in registry.items("family").items()}
    for name in zoo.list_models():
        if name in zoo.BUNDLED:
            continue
        preset = zoo.get_preset(name)
        if preset.kind != "generator":
            continue
        module, _, attr = preset.cls.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        assert cls in families, f"{name}: {cls.__name__} is not a registered family"
        assert cls.default_sampler in samplers
    with pytest.raises(KeyError, match="did you mean 'masked'"):
        registry.get("sampler", "maskd")


def test_version1_sampling_defaults_migrate():
    assert migrate_sampling_defaults({"cfg_scale": 1.5, "top_p": 0.0, "top_k": 900}, 1, "var") == \
        {"cfg_scale": 2.5, "top_p": 1.0, "top_k": 900}
    assert migrate_sampling_defaults({"cfg": 3.0, "num_sampling_steps": 25}, 1, "mar") == \
        {"cfg_scale": 3.0, "num_steps": 25}
    assert migrate_sampling_defaults({"cfg_scale": 2.5}, 1, "llamagen") == {"cfg_scale": 2.5}
    assert migrate_sampling_defaults({"cfg_scale": 2.5}, 2, "var") == {"cfg_scale": 2.5}


def test_model_valued_sampler_options_save_as_components(pipe, tmp_path):
    from visar.samplers.flow_map import FlowMapSampler
    from visar.samplers.speculative import SpeculativeSampler

    torch.manual_seed(1)
    draft = zoo.create("llamagen-gpt-tiny")
    for sampler, component in [(SpeculativeSampler(draft=draft, k=2), "sampler_draft"),
                               (FlowMapSampler(codebook=pipe.tokenizer), "sampler_codebook")]:
        p = Pipeline(pipe.tokenizer, pipe.generator, sampler=sampler)
        folder = tmp_path / component
        p.save_pretrained(folder)
        assert (folder / component / "model.safetensors").is_file()
        q = Pipeline.from_pretrained(folder)
        assert type(q.sampler) is type(sampler)
        assert torch.equal(p.generate([1, 2], seed=3), q.generate([1, 2], seed=3))
    with pytest.raises(TypeError, match="cannot be saved"):
        Pipeline(pipe.tokenizer, pipe.generator, sampler=FlowMapSampler(codebook=torch.randn(256, 8))).save_pretrained(
            tmp_path / "bad")


def test_cli_sampler_draft_and_flow_map(pipe, tmp_path):
    from visar.cli import main

    pipe.save_pretrained(tmp_path / "model")
    assert main(["sample", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "a"), "--num", "4",
                 "--sampler", "speculative", "--draft", str(tmp_path / "model"), "--k", "2", "--quiet"]) == 0
    assert (tmp_path / "a" / "grid.png").is_file()
    assert main(["sample", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "b"), "--num", "4",
                 "--sampler", "flow_map", "--quiet"]) == 0
    # --draft without a speculative sampler is a usage error, before any image is drawn
    assert main(["sample", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "c"), "--num", "4",
                 "--draft", str(tmp_path / "model"), "--quiet"]) == 2
    assert not (tmp_path / "c" / "grid.png").exists()
