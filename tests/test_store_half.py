"""scripts/store_half.py: the float16 copies of shipped weights (copy, round, load back as float32)."""
from __future__ import annotations

import pytest
import torch
from benchmark_loader import load_benchmark

from visar import zoo
from visar.conditions import Condition
from visar.pipeline import Pipeline
from visar.utils.io import load_safetensors

sh = load_benchmark("store_half", folder="scripts")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    gen = zoo.create("llamagen-gpt-tiny")
    torch.nn.init.normal_(gen.head.weight, std=0.5)
    d = tmp_path_factory.mktemp("pipe") / "src"
    Pipeline(zoo.create("llamagen-vq-tiny"), gen, sampling_defaults={"cfg_scale": 2.5}).save_pretrained(d)
    return d


def test_a_pipeline_copy_stores_the_generator_in_float16_and_samples_alike(saved, tmp_path, capsys):
    dst = tmp_path / "half"
    assert sh.main([str(saved), str(dst)]) == 0
    assert "generator/model.safetensors" in capsys.readouterr().out
    src_w, dst_w = (load_safetensors(d / "generator" / "model.safetensors") for d in (saved, dst))
    assert src_w.keys() == dst_w.keys()
    for k, v in src_w.items():
        if v.dtype == torch.float32:
            assert dst_w[k].dtype == torch.float16 and torch.equal(dst_w[k], v.half())
        else:
            assert torch.equal(dst_w[k], v)
    # the tokenizer and the index are copied as they are
    assert (dst / "tokenizer" / "model.safetensors").read_bytes() == (saved / "tokenizer" / "model.safetensors").read_bytes()
    assert (dst / "pipeline.json").read_text() == (saved / "pipeline.json").read_text()
    a, b = Pipeline.from_pretrained(saved), Pipeline.from_pretrained(dst)
    assert next(b.generator.parameters()).dtype == torch.float32  # loaded back as float32
    assert b.sampling_defaults == a.sampling_defaults
    logits = [p.generator(torch.zeros(2, 4, dtype=torch.long), Condition.of(torch.tensor([1, 2]))) for p in (a, b)]
    logits = [lg[0] if isinstance(lg, tuple) else lg for lg in logits]
    assert torch.allclose(logits[0], logits[1], atol=2e-2) and not torch.equal(logits[0], logits[1])


def test_a_component_folder_and_named_files(saved, tmp_path):
    comp = tmp_path / "comp"
    sh.store_half(saved / "generator", comp)
    assert all(v.dtype != torch.float32 for v in load_safetensors(comp / "model.safetensors").values())
    both = tmp_path / "both"
    sh.store_half(saved, both, ["generator/model.safetensors", "tokenizer/model.safetensors"])
    assert all(v.dtype != torch.float32 for v in load_safetensors(both / "tokenizer" / "model.safetensors").values())


@pytest.mark.parametrize("args, match", [
    (["{missing}", "{new}"], "is not a folder"),
    (["{src}", "{src}"], "exists; give a new folder"),
    (["{src}", "{new}", "--file", "pipeline.json"], "only .safetensors"),
    (["{src}", "{new}", "--file", "../x.safetensors"], "outside SRC"),
    (["{src}", "{new}", "--file", "nope/model.safetensors"], "does not exist"),
])
def test_bad_arguments_are_named_and_write_nothing(saved, tmp_path, capsys, args, match):
    names = {"src": str(saved), "new": str(tmp_path / "new"), "missing": str(tmp_path / "missing")}
    assert sh.main([a.format(**names) for a in args]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
