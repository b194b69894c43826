"""`visar export`: a training checkpoint -> the run's export, equal to what the trainer writes at its end."""
import json

import pytest
import torch

from visar.cli import main as cli_main
from visar.pipeline import Pipeline
from visar.train.config import load_config
from visar.train.export_checkpoint import export_checkpoint, resolve_checkpoint
from visar.train.trainer import train
from visar.utils.io import load_safetensors

from test_train_generator import GPT, VQ  # the trainer tests' tiny models

LOOP = {"steps": 3, "batch_size": 4, "log_every": 1, "progress": False, "threads": 1, "save_every": 1,
        "keep_checkpoints": 5}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step generator run on a 2-step VQ, every step's checkpoint kept."""
    root = tmp_path_factory.mktemp("export")
    vq = train(load_config(None, [], data={"task": "tokenizer", "model": VQ, "data": {"kind": "shapes", "size": 8},
                                           "train": {**LOOP, "steps": 2, "output_dir": str(root / "vq")}}))
    cfg = load_config(None, [], data={
        "task": "generator", "model": GPT, "tokenizer": {"path": str(vq)}, "data": {"kind": "shapes", "size": 8},
        "sample": {"options": {"cfg_scale": 2.0, "temperature": 0.9}},
        "train": {**LOOP, "ema_decay": 0.5, "output_dir": str(root / "gpt")}})
    return root / "gpt", train(cfg)


def test_export_of_a_tokenizer_run_is_its_save_pretrained_folder(run, tmp_path):
    vq_run = run[0].parent / "vq"
    out = export_checkpoint(vq_run, tmp_path / "vq")
    want = vq_run / "export"
    a, b = load_safetensors(out / "tokenizer.safetensors"), load_safetensors(want / "tokenizer.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads((want / "tokenizer.json").read_text())


def test_export_of_the_last_checkpoint_equals_the_runs_export(run, tmp_path):
    out_dir, final = run
    out = export_checkpoint(out_dir, tmp_path / "probe")
    a = load_safetensors(out / "generator" / "model.safetensors")
    b = load_safetensors(final / "generator" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((out / "pipeline.json").read_text())
    assert meta["sampling_defaults"] == {"cfg_scale": 2.0, "temperature": 0.9}
    assert torch.equal(Pipeline.from_pretrained(out).generate([1, 2], seed=0),
                       Pipeline.from_pretrained(final).generate([1, 2], seed=0))


def test_export_of_an_earlier_step_and_of_the_raw_weights(run, tmp_path):
    out_dir, final = run
    step1 = out_dir / "checkpoints" / "step_00000001"
    assert resolve_checkpoint(step1) == step1 and resolve_checkpoint(out_dir).name == "step_00000003"
    ema1 = load_safetensors(export_checkpoint(step1, tmp_path / "e1") / "generator" / "model.safetensors")
    raw1 = load_safetensors(export_checkpoint(step1, tmp_path / "m1", weights="model") / "generator" /
                            "model.safetensors")
    want_ema, want_raw = load_safetensors(step1 / "ema.safetensors"), load_safetensors(step1 / "model.safetensors")
    assert all(torch.equal(ema1[k], want_ema[k]) for k in ema1) and all(torch.equal(raw1[k], want_raw[k]) for k in raw1)
    last = load_safetensors(final / "generator" / "model.safetensors")
    assert any(not torch.equal(ema1[k], last[k]) for k in ema1)


def test_cli_writes_the_export(run, tmp_path):
    out_dir, _ = run
    assert cli_main(["export", str(out_dir), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "pipeline.json").is_file()


def test_bad_inputs(run, tmp_path, caplog):
    out_dir, _ = run
    with pytest.raises(FileNotFoundError, match="not found: give a run's train.output_dir"):
        export_checkpoint(tmp_path / "missing", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no complete visar checkpoint"):
        export_checkpoint(tmp_path / "empty", tmp_path / "o")
    with pytest.raises(ValueError, match="weights must be one of"):
        export_checkpoint(out_dir, tmp_path / "o", weights="best")
    step = out_dir / "checkpoints" / "step_00000002"
    with pytest.raises(ValueError, match="inside the checkpoint"):
        export_checkpoint(step, step / "export")
    from visar.utils.io import package_root

    with pytest.raises(ValueError, match="inside the installed visar package"):
        export_checkpoint(step, package_root() / "assets" / "probe")
    assert not (package_root() / "assets" / "probe").exists()
    assert cli_main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in caplog.text
