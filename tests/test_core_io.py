"""Checkpoint reading, strict loading, atomic writes, config round trips, logits processing, validation."""
import argparse
import json

import pytest
import torch
from torch import nn

from visar.convert.common import (CheckpointError, load_state_strict, read_checkpoint, require_keys,
                                  unwrap_state_dict)
from visar.samplers.logits import (check_finite, process_logits, sample_categorical, top_k_filter, top_p_filter,
                                   top_p_filter_ascending)
from visar.utils.config import Configurable, register_config
from visar.utils.io import atomic_write_bytes
from visar.samplers.options import check_common
from visar.utils.validation import check_images, check_labels, check_tokens


class Tiny(Configurable):
    family = "test"

    @register_config
    def __init__(self, width: int = 4, depth: int = 1, name: str = "x"):
        super().__init__()
        self.lin = nn.Linear(width, width)


def test_config_round_trip(tmp_path):
    m = Tiny(width=6)
    assert m.config == {"width": 6, "depth": 1, "name": "x"}
    m.save_pretrained(tmp_path, "m")
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["config"]["width"] == 6 and meta["family"] == "test"
    # the class path must resolve inside visar; a test class cannot be re-imported from JSON
    with pytest.raises(ValueError, match="refusing"):
        Tiny.from_pretrained(tmp_path, "m")


def test_read_checkpoint_containers_and_errors(tmp_path):
    sd = {"a": torch.ones(2), "b": torch.zeros(1)}
    for key in ("model", "module", "state_dict"):
        torch.save({key: sd, "steps": 3}, tmp_path / f"{key}.pt")
        assert set(unwrap_state_dict(read_checkpoint(tmp_path / f"{key}.pt"))) == {"a", "b"}
    torch.save(sd, tmp_path / "bare.pt")
    assert set(unwrap_state_dict(read_checkpoint(tmp_path / "bare.pt"))) == {"a", "b"}
    # pickled python objects are refused with extraction instructions
    torch.save({"model": sd, "args": argparse.Namespace(lr=1)}, tmp_path / "train.pt")
    with pytest.raises(CheckpointError, match="extract"):
        read_checkpoint(tmp_path / "train.pt")
    # truncated
    data = (tmp_path / "bare.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(tmp_path / "trunc.pt")
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="optimizer"):
        unwrap_state_dict({"optimizer": {"state": {}}, "epoch": 1})
    with pytest.raises(CheckpointError, match="not a VAR checkpoint"):
        require_keys(sd, ["class_emb.weight"], "VAR", "x.pt")


def test_load_state_strict_reports_and_casts():
    m = nn.Linear(2, 2)
    good = {k: v.half() for k, v in m.state_dict().items()}
    load_state_strict(m, good)
    assert m.weight.dtype == torch.float32
    with pytest.raises(CheckpointError, match="missing 1 keys"):
        load_state_strict(m, {"weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="unexpected"):
        load_state_strict(m, {**good, "extra": torch.zeros(1)})
    load_state_strict(m, {**good, "extra": torch.zeros(1)}, ignore=["extra"])
    with pytest.raises(CheckpointError, match="shape"):
        load_state_strict(m, {"weight": torch.zeros(3, 2), "bias": torch.zeros(2)})


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"old")
    import os

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(p, b"new")
    assert p.read_bytes() == b"old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.bin"]


def test_top_k_keeps_ties_and_top_p_keeps_first_crossing():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).sum() == 3
    assert torch.equal(top_k_filter(logits, 0), logits)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = torch.isfinite(top_p_filter(p, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept_asc = torch.isfinite(top_p_filter_ascending(p, 0.7))
    assert kept_asc[0, :2].all() and not kept_asc[0, 3]
    assert torch.isfinite(top_p_filter(p, 0.01)).sum() == 1


def test_sampling_is_seeded_and_greedy_with_top_k_1():
    logits = torch.randn(4, 10)
    probs = process_logits(logits, temperature=0.7, top_k=3).softmax(-1)
    a = sample_categorical(probs, torch.Generator().manual_seed(1))
    b = sample_categorical(probs, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    g = process_logits(logits, top_k=1).softmax(-1)
    assert torch.equal(sample_categorical(g), logits.argmax(-1))


def test_nan_logits_and_argument_validation():
    with pytest.raises(FloatingPointError, match="NaN"):
        check_finite(torch.tensor([0.0, float("nan")]))
    for kwargs, msg in [(dict(cfg_scale=-1), "cfg_scale"), (dict(temperature=0), "temperature"),
                        (dict(top_k=-1), "top_k"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p")]:
        with pytest.raises(ValueError, match=msg):
            check_common(kwargs)
    check_common(dict(cfg_scale=0, temperature=1e-3, top_k=0, top_p=1.0))


def test_input_validation_messages(caplog):
    with pytest.raises(ValueError, match="divisible"):
        check_images(torch.zeros(1, 3, 30, 32), 16)
    with pytest.raises(ValueError, match="RGB"):
        check_images(torch.zeros(1, 4, 32, 32), 16)
    with pytest.raises(TypeError, match="uint8"):
        check_images(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), 16)
    check_images(torch.full((1, 3, 32, 32), 200.0), 16)
    assert "far outside" in caplog.text
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        check_labels(torch.tensor([10]), 10)
    with pytest.raises(ValueError, match="vocabulary"):
        check_tokens(torch.tensor([5]), 5)
