"""Every consumer of a saved module accepts both save layouts (issue 28 loose ends).

The layouts: flat ``NAME.json`` + ``NAME.safetensors`` (training exports of the tokenizer, distill and
classifier tasks; pipeline folders of format 1/2, the bundled ``visar/assets/shapes-llamagen``) and component
folders ``NAME/config.json`` + ``NAME/model.safetensors`` (pipeline folders of format 3, i.e. generator exports),
or the component folder itself. Consumers: a generator config's ``tokenizer.path`` (``load_config`` and the
pre-launch checks), ``model.init_from``, ``visar tokenize --tokenizer``, ``visar sample --draft`` /
``--student`` (``load_student``), the eval classifier. Also: the sampler's model options follow
``torch_dtype=`` / ``pipe.to(dtype)``, ``visar distill-data`` refuses before it creates or launches anything,
and the distill task's error names both student factories.
"""
from __future__ import annotations

import argparse
import json
import logging

import pytest
import torch

from visar import zoo
from visar.cli import main, sampler_model_options
from visar.generators.base import Generator
from visar.pipeline import Pipeline
from visar.train.config import ConfigError, load_config, other_layout_weights
from visar.train.preflight import preflight

#: a LlamaGen generator for the tiny VQ (256 codes, stride 16): 64 px shapes -> the model's 4x4 grid
GEN = {
    "task": "generator",
    "model": {"cls": "visar.generators.next_token.llamagen:NextTokenGenerator",
              "kwargs": {"vocab_size": 256, "dim": 32, "depth": 1, "num_heads": 2, "grid_size": 4, "num_classes": 10}},
    "data": {"kind": "shapes", "size": 64, "length": 64},
    "train": {"steps": 2, "batch_size": 8, "save_every": 0, "progress": False, "threads": 1},
}


def _gen(**kw):
    torch.manual_seed(0)
    return zoo.create("llamagen-gpt-tiny", dim=32, depth=1, num_heads=2, **kw)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The tiny VQ + generator saved in every layout: ``flat`` (a tokenizer export), ``pipe`` (format 3),
    ``old`` (a flat format-1 pipeline folder, as the bundled model), ``comp`` (the tokenizer's own folder)."""
    root = tmp_path_factory.mktemp("layouts")
    torch.manual_seed(0)
    tok, gen = zoo.create("llamagen-vq-tiny"), _gen()
    tok.save_pretrained(root / "flat", "tokenizer")
    Pipeline(tok, gen).save_pretrained(root / "pipe")
    (root / "old").mkdir()
    tok.save_pretrained(root / "old", "tokenizer")
    gen.save_pretrained(root / "old", "generator")
    (root / "old" / "pipeline.json").write_text(json.dumps({"format": "visar-pipeline", "version": 1}))
    return {"root": root, "flat": root / "flat", "pipe": root / "pipe", "old": root / "old",
            "comp": root / "pipe" / "tokenizer", "tok": tok, "gen": gen}


# ------------------------------------------------------------------------------------------ tokenizer.path


@pytest.mark.parametrize("where", ["flat", "pipe", "old", "comp"])
def test_tokenizer_path_in_either_layout_passes_config_and_preflight(where, layouts, tmp_path):
    cfg = load_config(None, [f"tokenizer.path={layouts[where]}", f"train.output_dir={tmp_path / 'run'}"],
                      data=GEN)
    preflight(cfg)  # builds the tokenizer on meta from its config: no error, and it checks the model against it
    bad = load_config(None, [f"tokenizer.path={layouts[where]}", f"train.output_dir={tmp_path / 'run'}",
                             "model.kwargs.vocab_size=512"], data=GEN)
    with pytest.raises(ConfigError, match="256 codes, the model predicts 512"):
        preflight(bad)  # the tokenizer really was read, in this layout


def test_bundled_flat_tokenizer_still_passes(tmp_path):
    data = json.loads(json.dumps(GEN))
    data["model"]["kwargs"].update(vocab_size=512, grid_size=8)
    data["data"]["size"] = 32
    cfg = load_config(None, ["tokenizer.path=visar/assets/shapes-llamagen", f"train.output_dir={tmp_path}"], data=data)
    preflight(cfg)


def test_tokenizer_path_without_a_tokenizer_is_refused(layouts, tmp_path):
    with pytest.raises(ConfigError, match=r"holds no tokenizer.json .* and no tokenizer/config.json"):
        load_config(None, [f"tokenizer.path={tmp_path}"], data=GEN)
    # a pipeline folder whose named component is a generator: the pre-launch check says so
    cfg = load_config(None, [f"tokenizer.path={layouts['pipe']}", "tokenizer.name=generator",
                             f"train.output_dir={tmp_path / 'run'}"], data=GEN)
    with pytest.raises(ConfigError, match="not a visar Tokenizer"):
        preflight(cfg)


def test_tokenizer_path_of_an_earlier_recipe_stage_is_pending(tmp_path):
    later = tmp_path / "vq" / "export"
    load_config(None, [f"tokenizer.path={later}"], data=GEN, will_exist=[tmp_path / "vq"])


# ------------------------------------------------------------------------------------------ model.init_from


def test_init_from_names_either_layout_of_a_generator_export(layouts, tmp_path, caplog):
    from visar.train.trainer import build_model, init_and_freeze

    caplog.set_level(logging.INFO, "visar.train")
    new, old = layouts["pipe"], layouts["old"]
    # an older flat path, the export is new: the component folder's weights are read
    cfg = load_config(None, [f"model.init_from={new / 'generator.safetensors'}", f"tokenizer.path={new}"], data=GEN)
    assert cfg.model.init_from == str(new / "generator" / "model.safetensors")
    assert "reading the same export's weights" in caplog.text
    model = init_and_freeze(build_model(cfg), cfg)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), layouts["gen"].state_dict().values()))
    # a component-folder path, the export is flat
    cfg = load_config(None, [f"model.init_from={old / 'generator' / 'model.safetensors'}", f"tokenizer.path={old}"],
                      data=GEN)
    assert cfg.model.init_from == str(old / "generator.safetensors")
    with pytest.raises(ConfigError, match="export/generator/model.safetensors"):
        load_config(None, [f"model.init_from={tmp_path / 'generator.safetensors'}", f"tokenizer.path={old}"], data=GEN)


def test_init_from_does_not_swap_in_a_diffusers_vae_folder(tmp_path):
    zoo.create("kl-tiny").save_pretrained(tmp_path / "tokenizer")  # diffusers names, not the state dict's
    assert other_layout_weights(tmp_path / "tokenizer.safetensors") is None


# ------------------------------------------------------------------------------------------ CLI consumers


@pytest.mark.parametrize("where", ["pipe", "old", "gen_folder"])
def test_draft_in_either_layout(where, layouts, tmp_path):
    draft_dir = layouts["pipe"] / "generator" if where == "gen_folder" else layouts[where]
    pipe = Pipeline(layouts["tok"], layouts["gen"], sampler="speculative")
    args = argparse.Namespace(draft=str(draft_dir), k=None, student=None)
    draft = sampler_model_options(pipe, args)["draft"]
    assert isinstance(draft, Generator)
    assert all(torch.equal(a, b) for a, b in zip(draft.state_dict().values(), layouts["gen"].state_dict().values()))


@pytest.mark.parametrize("where", ["flat", "pipe", "comp"])
def test_visar_tokenize_reads_either_layout(where, layouts, tmp_path):
    out = tmp_path / "cache"
    assert main(["tokenize", "--tokenizer", str(layouts[where]), "--data", "shapes", "--size", "64", "--length", "2",
                 "--batch-size", "2", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "index.json").read_text())["complete"]


def test_student_in_either_layout(layouts, tmp_path):
    from visar.generators.next_token.distilled import student_from_teacher
    from visar.samplers.distilled import DistilledSampler, load_student

    student = student_from_teacher(str(layouts["pipe"]), [0])  # a format-3 teacher folder
    student.save_pretrained(tmp_path / "export", "distill")      # what task: distill exports (flat)
    student.save_pretrained(tmp_path / "own")                    # the student's component folder
    Pipeline(layouts["tok"], student).save_pretrained(tmp_path / "as_pipe")  # a pipeline whose generator it is
    ref = student.state_dict()
    for d in ("export", "own", "as_pipe"):
        got = load_student(tmp_path / d)
        assert type(got) is type(student) and all(torch.equal(got.state_dict()[k], v) for k, v in ref.items()), d
    teacher = Pipeline(layouts["tok"], layouts["gen"])
    images = teacher.generate([1], seed=0, sampler=DistilledSampler(student=str(tmp_path / "own")))
    assert images.shape == (1, 3, 64, 64)


def test_classifier_in_either_layout(tmp_path):
    from visar.eval.classifier import ShapesClassifier, load_classifier

    torch.manual_seed(0)
    clf = ShapesClassifier(widths=(8,), groups=4)
    clf.save_pretrained(tmp_path / "flat", "classifier")
    clf.save_pretrained(tmp_path / "comp")
    clf.save_pretrained(tmp_path / "sub" / "classifier")
    for d in ("flat", "comp", "sub"):
        got = load_classifier(tmp_path / d)
        assert all(torch.equal(got.state_dict()[k], v) for k, v in clf.state_dict().items()), d
    with pytest.raises(FileNotFoundError, match="no classifier.json"):
        load_classifier(tmp_path)
    assert isinstance(load_classifier(), ShapesClassifier)  # the bundled flat one


# ------------------------------------------------------------------------------------------ dtypes of sampler models


def test_draft_follows_torch_dtype_and_to(layouts, tmp_path):
    from visar.samplers.speculative import SpeculativeSampler

    draft = _gen()
    pipe = Pipeline(layouts["tok"], layouts["gen"], sampler=SpeculativeSampler(draft=draft, k=2))
    pipe.save_pretrained(tmp_path / "p")
    assert (tmp_path / "p" / "sampler_draft" / "config.json").is_file()
    loaded = Pipeline.from_pretrained(tmp_path / "p", torch_dtype=torch.bfloat16)
    loaded_draft = loaded.sampler.options["draft"]
    assert loaded.dtype == torch.bfloat16 and next(loaded_draft.parameters()).dtype == torch.bfloat16
    loaded.to("float32")  # a dtype name positionally, as from_pretrained's torch_dtype takes it
    assert next(loaded_draft.parameters()).dtype == torch.float32 and loaded.dtype == torch.float32
    pipe.to(torch.float16)
    assert next(draft.parameters()).dtype == torch.float16
    pipe.to(dtype=torch.float32)
    assert next(draft.parameters()).dtype == torch.float32
    # sampling with both in bfloat16 runs and gives the target's token layout
    loaded.to(torch.bfloat16)
    assert loaded.generate([2], seed=0, top_k=1).shape == (1, 3, 64, 64)


# ------------------------------------------------------------------------------------------ distill-data, distill task


@pytest.mark.parametrize("processes", ["1", "2"])
def test_refused_distill_data_leaves_no_folder_and_starts_nothing(processes, layouts, tmp_path, monkeypatch, caplog):
    import accelerate

    def no_launch(*a, **k):
        raise AssertionError("worker processes were started before the options were checked")

    monkeypatch.setattr(accelerate, "notebook_launcher", no_launch)
    out = tmp_path / "new" / "pairs"
    for bad in (["--top-p", "0"], ["--option", "solver=\"rk4\""], ["--temperature", "-1"]):
        caplog.clear()
        argv = ["distill-data", "--teacher", str(layouts["pipe"]), "--num", "2", "--out", str(out),
                "--num-processes", processes, "--quiet", *bad]
        assert main(argv) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "\n" not in errors[0], errors
        assert not (tmp_path / "new").exists(), "a refused command must leave no folder behind"


def test_distill_task_error_names_both_student_factories():
    from visar.train.tasks import make_task

    with pytest.raises(TypeError) as e:
        make_task("distill", _gen())
    for factory in ("visar.generators.next_token.distilled:student_from_teacher",
                    "visar.generators.next_scale.distilled:student_from_teacher"):
        assert factory in str(e.value)


def test_recipe_tokenize_stage_takes_a_component_folder(layouts, tmp_path):
    from visar.train.recipe import Stage, _check_tokenize

    stage = Stage(index=0, name="tok", kind="tokenize", folder=tmp_path / "t",
                  options={"tokenizer": str(layouts["comp"]), "data": "shapes"})
    _check_tokenize(stage, [], "stage tok")
