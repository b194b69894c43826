"""Data cache for the shapes dataset, the wall-clock budget, and the VQ dead-code restart hook."""
import json

import numpy as np
import pytest
import torch

from visar.data.shapes import ShapesDataset
from visar.data.shapes_cache import load_or_render
from visar.train import checkpoint as ckpt
from visar.train.config import ConfigError, load_config
from visar.train.trainer import train
from visar.tokenizers.vq import VQTokenizer


def test_cache_matches_renders_and_checks_identity(tmp_path):
    path = tmp_path / "shapes.npy"
    cached = ShapesDataset(size=16, length=40, seed=3, cache=path)
    plain = ShapesDataset(size=16, length=40, seed=3)
    idx = [7, 2, 39, 2]
    a, b = cached.__getitems__(idx), plain.__getitems__(idx)
    for x, y in zip(a, b):
        assert x["label"] == y["label"] and x["caption"] == y["caption"]
        assert (x["image"] - y["image"]).abs().max() <= 1 / 255 + 1e-6  # 8-bit pixels
    assert torch.equal(cached[5]["image"], cached.__getitems__([5])[0]["image"])
    assert json.loads((tmp_path / "shapes.npy.json").read_text())["seed"] == 3
    # a second dataset reuses the file (memory map), another dataset refuses it
    assert isinstance(ShapesDataset(size=16, length=40, seed=3, cache=path).pixels(), np.memmap)
    with pytest.raises(ValueError, match="another dataset.*seed"):
        load_or_render(ShapesDataset(size=16, length=40, seed=4), path)
    assert not list(tmp_path.glob(".*tmp"))  # written atomically, nothing left behind


def _cfg(out, **over):
    data = {
        "task": "tokenizer",
        "model": {"cls": "train_helpers:NoisyAE", "kwargs": {"width": 8}},
        "data": {"kind": "shapes", "size": 16, "length": 64},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "train": {"steps": 10_000, "batch_size": 8, "save_every": 0, "log_every": 100,
                  "output_dir": str(out), "progress": False},
    }
    return load_config(None, [f"{k}={v}" for k, v in over.items()], data=data)


def test_max_minutes_stops_checkpoints_and_exports(tmp_path):
    train(_cfg(tmp_path, **{"train.max_minutes": 0.002}))  # 0.12 s
    latest = ckpt.find_latest(tmp_path / "checkpoints")
    assert latest is not None and 0 < int(latest.name.split("_")[-1]) < 10_000
    assert (tmp_path / "export" / "tokenizer.json").is_file()


def test_bad_speed_keys():
    with pytest.raises(ConfigError, match="max_minutes"):
        load_config(None, ["train.max_minutes=-1"], data={"model": {"cls": "a:B"}, "task": "tokenizer"})
    with pytest.raises(ConfigError, match="data.cache"):
        load_config(None, ["data.cache=x.npy"], data={"model": {"cls": "a:B"}, "task": "tokenizer",
                                                      "data": {"kind": "folder", "path": "."}})


def _vq():
    torch.manual_seed(0)
    return VQTokenizer(codebook_size=64, codebook_embed_dim=4, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                       z_channels=32, dead_code_steps=16)


def test_vq_restart_hook_is_periodic_and_deterministic():
    images = ShapesDataset(size=16, length=8).render(range(8))[0]
    runs = []
    for _ in range(2):
        m = _vq().train()
        m.training_loss(images)
        m.quantize.steps_unused[:32] = 50  # half the codebook dead
        assert m.after_optimizer_step(step=m.restart_interval() + 1) == {}  # not a check step
        stats = m.after_optimizer_step(step=m.restart_interval(), gather=lambda t: torch.cat([t, t]))
        assert stats["restarted"] >= 32
        assert int(m.quantize.steps_unused[:32].max()) == 0
        runs.append(m.quantize.embedding.weight.clone())
    assert torch.equal(runs[0], runs[1])
    # restarted rows are unit vectors taken from encoder outputs
    assert torch.allclose(runs[0][:32].norm(dim=-1), torch.ones(32), atol=1e-5)
