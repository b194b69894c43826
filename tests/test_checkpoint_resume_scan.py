"""Resume picks the newest complete checkpoint by scanning the folder, not by trusting ``latest`` (issue 28):
a kill between a checkpoint's rename and the ``latest`` update leaves the pointer one checkpoint behind.
The states on disk are made the way an interrupted save leaves them."""
from __future__ import annotations

import logging
import os

import torch

from visar.train import checkpoint as ckpt
from visar.train.config import load_config
from visar.train.trainer import train


def _save(root, step):
    w = {"w": torch.full((2,), float(step))}
    return ckpt.save_checkpoint(root, step, w, w, {"optimizer": {}}, {"model_class": "x"}, keep=10)


def test_newest_complete_checkpoint_wins_over_a_stale_pointer(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    for step in (100, 200, 300):
        _save(root, step)
    # killed after step 300's rename, before the pointer moved from 200
    (root / "latest").write_text(ckpt.step_dir_name(200))
    with caplog.at_level(logging.WARNING, logger="visar.train"):
        assert ckpt.find_latest(root).name == ckpt.step_dir_name(300)
    assert any("step_00000200" in r.getMessage() and "newest" in r.getMessage() for r in caplog.records)
    meta, model, _, _ = ckpt.load_checkpoint(ckpt.find_latest(root))
    assert meta["step"] == 300 and model["w"][0] == 300


def test_incomplete_and_temporary_folders_are_not_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 100)
    # killed inside a save: the temporary folder holds every file but was never renamed
    tmp = root / f".tmp-{ckpt.step_dir_name(300)}-{os.getpid()}"
    tmp.mkdir()
    for f in ckpt.FILES:
        (tmp / f).write_bytes(b"{}")
    # a step folder that lost a file (copied half-way, or a weight file deleted)
    half = root / ckpt.step_dir_name(200)
    half.mkdir()
    (half / "meta.json").write_text('{"step": 200}')
    (root / "latest").write_text(ckpt.step_dir_name(200))
    assert not ckpt.is_complete(half) and not ckpt.is_complete(tmp)
    assert ckpt.find_latest(root).name == ckpt.step_dir_name(100)
    (root / "latest").write_text("step_99999999")  # a pointer to nothing
    assert ckpt.find_latest(root).name == ckpt.step_dir_name(100)
    (root / "latest").unlink()
    assert ckpt.find_latest(root).name == ckpt.step_dir_name(100)
    assert ckpt.find_latest(tmp_path / "none") is None


def _cfg(out, steps):
    data = {"task": "tokenizer", "model": {"cls": "train_helpers:NoisyAE", "kwargs": {"width": 8}},
            "data": {"kind": "shapes", "size": 16, "length": 64},
            "optim": {"lr": 1e-2, "warmup_steps": 1, "grad_clip": 1.0},
            "train": {"steps": steps, "batch_size": 4, "save_every": 2, "keep_checkpoints": 3, "log_every": 100,
                      "output_dir": str(out), "progress": False, "threads": 1}}
    return load_config(None, [], data=data)


def test_training_resumes_from_the_checkpoint_the_pointer_missed(tmp_path, caplog):
    out = tmp_path / "run"
    train(_cfg(out, 4))  # checkpoints at steps 2 and 4
    root = out / "checkpoints"
    (root / "latest").write_text(ckpt.step_dir_name(2))  # as if killed between step 4's rename and the update
    with caplog.at_level(logging.INFO, logger="visar.train"):
        train(_cfg(out, 6))
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed from")]
    assert resumed == [f"resumed from {root / ckpt.step_dir_name(4)} at step 4"], resumed
    assert (root / "latest").read_text() == ckpt.step_dir_name(6)
