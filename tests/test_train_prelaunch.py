"""``visar train`` checks the config before any process starts (issue 28): each bad case is one ``ERROR``
line and exit status 2, and the trainer is never entered. Training that runs out of memory says to lower
the batch.

The table :data:`CASES` is the sweep: ``(name, overrides, text the ERROR line must hold)``.
"""
from __future__ import annotations

import logging

import pytest
import torch
import yaml

from visar import zoo
from visar.train import launch
from visar.train.checkpoint import save_checkpoint

#: a LlamaGen generator on a tiny VQ (256 codes, stride 16): 64 px shapes -> the model's 4x4 grid
GEN = {
    "task": "generator",
    "model": {"cls": "visar.generators.next_token.llamagen:NextTokenGenerator",
              "kwargs": {"vocab_size": 256, "dim": 32, "depth": 1, "num_heads": 2, "grid_size": 4, "num_classes": 10}},
    "data": {"kind": "shapes", "size": 64, "length": 64},
    "train": {"steps": 2, "batch_size": 8, "save_every": 0, "progress": False, "threads": 1},
}

CASES = [
    ("kwarg-the-class-does-not-take", ["model.kwargs.widht=3"], "model.kwargs do not fit"),
    ("kwarg-value-the-class-refuses", ["model.kwargs.num_heads=3"], "model.kwargs do not fit"),
    ("unknown-preset", ["model.cls=null", "model.preset=llamagen-gpt-tinyy"], "model.preset"),
    ("class-that-does-not-exist", ["model.cls=visar.generators.next_token.llamagen:Nope"], "model.cls"),
    ("vocabulary-vs-tokenizer", ["model.kwargs.vocab_size=512"], "256 codes, the model predicts 512"),
    ("grid-vs-image-size", ["data.size=32"], "data.size=32 gives a 2x2 token grid"),
    ("image-size-vs-tokenizer-stride", ["data.size=72"], "not divisible by the tokenizer's downsampling 16"),
    ("grad-accum-vs-batch", ["train.grad_accum=3"], "must be divisible by processes x train.grad_accum = 1 x 3"),
    ("resume-path-missing", ["train.resume=runs/nowhere/checkpoints/step_00000100"], "does not exist"),
    ("output-dir-unwritable", ["train.output_dir={file}/run"], "is a file, not a folder"),
    ("export-dir-unwritable", ["export_dir={file}/export"], "is a file, not a folder"),
]


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vq")
    torch.manual_seed(0)
    zoo.create("llamagen-vq-tiny").save_pretrained(d, "tokenizer")
    return d


@pytest.fixture
def never_train(monkeypatch):
    """Fail loudly if the trainer is entered: the checks must come first."""
    import visar.train.trainer as trainer

    def boom(cfg):
        raise AssertionError("the trainer was entered before the config was checked")

    monkeypatch.setattr(trainer, "train", boom)


def _write(tmp_path, vq_dir, data=None):
    cfg = {**(data or GEN), "tokenizer": {"path": str(vq_dir), "name": "tokenizer"}}
    cfg["train"] = {**cfg["train"], "output_dir": str(tmp_path / "run")}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("name,overrides,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_one_error_line_before_training(name, overrides, expect, tmp_path, vq_dir, never_train,
                                                      caplog):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    path = _write(tmp_path, vq_dir)
    overrides = [o.format(file=afile) for o in overrides]
    with caplog.at_level(logging.ERROR, logger="visar.train"):
        assert launch.main([str(path), *overrides]) == 2
    errors = _errors(caplog)
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert expect in errors[0], errors[0]
    assert not (tmp_path / "run").exists()  # nothing was written


def test_the_good_config_passes_the_checks(tmp_path, vq_dir, monkeypatch):
    """The base config of the table is valid: each case above fails for its own reason."""
    import visar.train.trainer as trainer

    seen = []
    monkeypatch.setattr(trainer, "train", lambda cfg: seen.append(cfg) or tmp_path / "export")
    assert launch.main([str(_write(tmp_path, vq_dir))]) == 0
    assert len(seen) == 1


def test_two_processes_need_a_divisible_batch(tmp_path, vq_dir, never_train, caplog):
    with caplog.at_level(logging.ERROR, logger="visar.train"):
        assert launch.main([str(_write(tmp_path, vq_dir)), "--num-processes", "3"]) == 2
    assert "3 x 1" in _errors(caplog)[0]


def test_resume_of_another_model_is_refused_before_training(tmp_path, vq_dir, never_train, caplog):
    path = _write(tmp_path, vq_dir)
    cfg = dict(GEN["model"]["kwargs"])
    meta = {"model_class": "visar.generators.next_token.llamagen.NextTokenGenerator",
            "model_config": {**cfg, "depth": 2}}  # written by a deeper model
    save_checkpoint(tmp_path / "run" / "checkpoints", 5, {}, {}, {}, meta)
    with caplog.at_level(logging.ERROR, logger="visar.train"):
        assert launch.main([str(path)]) == 2
    assert "cannot resume from" in _errors(caplog)[0] and "step_00000005" in _errors(caplog)[0]
    with caplog.at_level(logging.ERROR, logger="visar.train"):  # a path that is not a checkpoint
        assert launch.main([str(path), f"train.resume={tmp_path}"]) == 2
    assert "is not a complete checkpoint" in _errors(caplog)[-1]


class OOMClassifier(torch.nn.Module):
    """A classifier whose loss hits the allocator limit (what a too-large batch does on a GPU)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.lin = torch.nn.Linear(width, 2)

    def training_loss(self, images, labels):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_says_lower_the_batch(tmp_path, caplog):
    data = {"task": "classifier", "model": {"cls": "test_train_prelaunch:OOMClassifier", "kwargs": {}},
            "data": {"kind": "shapes", "size": 16, "length": 16},
            "train": {"steps": 1, "batch_size": 8, "grad_accum": 2, "save_every": 0, "progress": False,
                      "threads": 1, "output_dir": str(tmp_path / "run")}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    with caplog.at_level(logging.ERROR, logger="visar.train"):
        assert launch.main([str(path)]) == 2
    (msg,) = _errors(caplog)
    assert "out of memory" in msg and "lower train.batch_size" in msg and "4 rows at once" in msg
    assert launch.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ..."))
    assert not launch.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
