"""``visar distill-data``: teacher pairs are the teacher map's, follow the seed rule, resume, refuse other settings."""
from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from visar import zoo
from visar.cli import HelpFormatter, build_parser, main
from visar.conditions import Condition
from visar.data.distill_shards import DistillShards, read_manifest, shard_name
from visar.pipeline import Pipeline
from visar.samplers.flow_map import FlowMapSampler
from visar.train.distill_data import SEED_RULE, launch, make_distill_data, pair_noise


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny LlamaGen teacher (V = 256, 4x4 tokens, C = 8) with a random, non-zero logits head, saved."""
    torch.manual_seed(0)
    gen = zoo.create("llamagen-gpt-tiny", num_classes=3)
    torch.nn.init.normal_(gen.head.weight, std=0.5)  # LlamaGen starts the head at zero: a uniform teacher
    d = tmp_path_factory.mktemp("teacher")
    Pipeline(zoo.create("llamagen-vq-tiny"), gen, sampling_defaults={"cfg_scale": 1.5}).save_pretrained(d)
    return str(d)


def _make(teacher, out, num=10, **kw):
    kw = {"shard_size": 4, "batch_size": 3, "progress": False, **kw}
    return make_distill_data(teacher, out, num, **kw)


def test_pairs_are_the_teacher_map_of_the_seed_rule(teacher_dir, tmp_path):
    m = _make(teacher_dir, tmp_path / "a", seed=3, top_k=50)
    s = m["settings"]
    assert m["complete"] and m["num_shards"] == 3 and s["seed_rule"] == SEED_RULE
    assert (s["num_tokens"], s["grid_size"], s["vocab_size"], s["codebook_dim"], s["num_classes"]) == (16, 4, 256, 8, 3)
    # the pipeline's stored cfg is used unless given; the flow map's defaults are recorded
    assert s["options"] == {"cfg_scale": 1.5, "cfg_interval": -1, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                            "num_flow_steps": 16, "solver": "heun"}
    ds = DistillShards(tmp_path / "a")
    assert len(ds) == 10
    item = ds[7]
    assert item["noise"].dtype == torch.float32 and item["tokens"].dtype == torch.int64 and item["label"] == 7 % 3
    assert torch.equal(ds.noise, pair_noise(3, 0, 10, 16, 8))
    assert torch.equal(ds.labels, torch.arange(10) % 3)
    # the tokens are what the teacher map makes of the stored noise (one call over all ten pairs)
    pipe = Pipeline.from_pretrained(teacher_dir)
    want = FlowMapSampler()(pipe.generator, Condition(labels=ds.labels), None, noise=ds.noise,
                            codebook=pipe.tokenizer, cfg_scale=1.5, top_k=50)
    assert torch.equal(ds.tokens, want.reshape(10, 16))
    assert len({tuple(t.tolist()) for t in ds.tokens}) == 10
    # pair i depends on (seed, i) only: other shard and batch sizes, fewer pairs -> the same first pairs
    _make(teacher_dir, tmp_path / "b", num=6, seed=3, top_k=50, shard_size=5, batch_size=6)
    small = DistillShards(tmp_path / "b")
    assert torch.equal(small.noise, ds.noise[:6]) and torch.equal(small.tokens, ds.tokens[:6])
    _make(teacher_dir, tmp_path / "c", num=6, seed=4, top_k=50)
    assert not torch.equal(DistillShards(tmp_path / "c").noise, ds.noise[:6])


def test_resume_remakes_only_missing_shards(teacher_dir, tmp_path):
    out = tmp_path / "d"
    _make(teacher_dir, out)
    first = DistillShards(out)
    (out / shard_name(1)).unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))  # as a killed run leaves it
    (out / ".shard_00001.safetensors.x.tmp").write_bytes(b"partial")
    with pytest.raises(ValueError, match="incomplete"):
        DistillShards(out)
    kept = {k: os.stat(out / shard_name(k)).st_mtime_ns for k in (0, 2)}
    _make(teacher_dir, out, batch_size=7)  # the batch size is speed only
    assert {k: os.stat(out / shard_name(k)).st_mtime_ns for k in (0, 2)} == kept  # not rewritten
    assert not list(out.glob(".*.tmp"))
    again = DistillShards(out)
    assert torch.equal(again.tokens, first.tokens) and torch.equal(again.noise, first.noise)
    assert read_manifest(out)["complete"]


@pytest.mark.parametrize("change, differs", [({"cfg_scale": 2.0}, "options"), ({"num": 12}, "num"),
                                             ({"seed": 1}, "seed"), ({"shard_size": 5}, "shard_size"),
                                             ({"labels": "random"}, "labels")])
def test_other_settings_are_refused(teacher_dir, tmp_path, change, differs):
    out = tmp_path / "e"
    _make(teacher_dir, out, num=5)
    kw = {"num": 5, **change}
    with pytest.raises(ValueError, match=f"other settings.*{differs}"):
        _make(teacher_dir, out, **kw)


def test_another_teacher_and_foreign_shards_are_refused(teacher_dir, tmp_path):
    out = tmp_path / "f"
    _make(teacher_dir, out, num=4)
    pipe = Pipeline.from_pretrained(teacher_dir)
    with torch.no_grad():
        pipe.generator.head.weight.mul_(1.01)
    with pytest.raises(ValueError, match="teacher_sha256"):
        _make(pipe, out, num=4)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / shard_name(0)).write_bytes(b"x")
    with pytest.raises(ValueError, match="no manifest.json"):
        _make(teacher_dir, tmp_path / "g", num=4)


@pytest.mark.parametrize("kw, match", [({"num": 0}, "num"), ({"batch_size": 0}, "batch_size"),
                                       ({"labels": "uniform"}, "labels"), ({"noise": None}, "sets noise itself"),
                                       ({"temperature": 0.0}, "temperature"), ({"solver": "rk4"}, "solver")])
def test_bad_arguments_fail_before_any_work(teacher_dir, tmp_path, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _make(teacher_dir, tmp_path / "h", **{"num": 4, **kw})
    assert not (tmp_path / "h").exists()


def test_cli_distill_data_and_its_help(teacher_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["distill-data", "--teacher", teacher_dir, "--num", "5", "--out", str(out), "--shard-size", "2",
                 "--cfg-scale", "1.0", "--option", "solver=heun", "--quiet"]) == 0
    assert "5 teacher pairs in 3 shards" in capsys.readouterr().out
    assert read_manifest(out)["settings"]["options"]["cfg_scale"] == 1.0
    assert main(["distill-data", "--teacher", teacher_dir, "--num", "5", "--out", str(out), "--shard-size", "2",
                 "--quiet"]) == 2  # cfg 1.5 (the pipeline's default) != 1.0: refused, one ERROR line
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = action.choices["distill-data"]
    assert parser.formatter_class is HelpFormatter
    formatter = parser._get_formatter()
    for a in parser._actions:
        if a.option_strings and a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction):
            assert a.help, a.option_strings
            assert a.nargs == 0 or a.required or "default" in formatter._get_help_string(a).lower(), a.option_strings


def test_two_processes_make_the_same_pairs_as_one(teacher_dir, tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # another test may have built an Accelerator; the launcher refuses then
    _make(teacher_dir, tmp_path / "one", num=9, shard_size=2)
    launch(num_processes=2, threads=1, teacher=teacher_dir, out_dir=str(tmp_path / "two"), num=9, shard_size=2,
           batch_size=3, progress=False)
    one, two = DistillShards(tmp_path / "one"), DistillShards(tmp_path / "two")
    assert read_manifest(tmp_path / "two")["num_processes"] == 2
    assert torch.equal(one.tokens, two.tokens) and torch.equal(one.noise, two.noise)
