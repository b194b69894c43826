"""Training configs: typed parsing, dotted overrides, errors before training starts."""
import pytest

from visar.train.config import ConfigError, TrainConfig, apply_overrides, load_config
from visar.train.launch import main as launch_main

BASE = {"task": "classifier", "model": {"cls": "visar.eval.classifier:ShapesClassifier"},
        "data": {"kind": "shapes", "size": 16}, "train": {"steps": 2}}


def test_shipped_configs_parse(tmp_path):
    """Every config in configs/ parses and validates (generators against a stand-in tokenizer folder)."""
    import glob

    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "init.safetensors").write_bytes(b"")  # stand-in for the output of an earlier run
    names = sorted(glob.glob("configs/*.yaml"))
    assert len(names) >= 10
    for name in names:
        text = open(name).read()
        over = [f"tokenizer.path={tmp_path}"] if "tokenizer:" in text else []
        over += [f"model.init_from={tmp_path / 'init.safetensors'}"] if "init_from:" in text else []
        over += [f"data.path={tmp_path}"] if ("kind: token_cache" in text or "kind: distill_shards" in text) else []  # a cache made by visar tokenize
        cfg = load_config(name, over)
        assert isinstance(cfg, TrainConfig) and cfg.train.steps > 0, name


def test_overrides_dotted_and_typed():
    cfg = load_config(None, ["train.steps=7", "optim.lr=1e-3", "optim.betas=[0.8, 0.9]", "model.kwargs.widths=[8]"],
                      data=dict(BASE))
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-3 and cfg.optim.betas == [0.8, 0.9]
    assert cfg.model.kwargs == {"widths": [8]}
    assert isinstance(load_config(None, ["optim.lr=1"], data=dict(BASE)).optim.lr, float)


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown config key train.stepz"),
    ("colour=red", "unknown config key colour"),
    ("train.steps=many", "config key train.steps must be int"),
    ("train.tensorboard=1", "config key train.tensorboard must be bool"),
    ("task=painting", "config key task must be one of"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("data.kind=folder", "data.path is required"),
    ("data.path=/no/such/folder", None),
    ("steps", "must look like key=value"),
])
def test_config_errors_name_the_key(override, message):
    overrides = [override]
    if override.startswith("data.path"):
        overrides = ["data.kind=folder", override]
        message = "dataset path data.path=/no/such/folder does not exist"
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides, data=dict(BASE))


def test_generator_task_needs_tokenizer(tmp_path):
    data = dict(BASE, task="generator")
    with pytest.raises(ConfigError, match="tokenizer.path"):
        load_config(None, [], data=data)
    with pytest.raises(ConfigError, match="holds no tokenizer.json"):
        load_config(None, [f"tokenizer.path={tmp_path}"], data=data)


def test_missing_config_file_and_launcher_exit_code(tmp_path, caplog):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: classifier\nmodel: {cls: 'visar.eval.classifier:ShapesClassifier'}\ntrain: {stepz: 2}\n")
    assert launch_main([str(bad)]) == 2
    assert "train.stepz" in caplog.text


def test_apply_overrides_creates_sections():
    d = apply_overrides({}, ["a.b.c=1", "x=[1, 2]"])
    assert d == {"a": {"b": {"c": 1}}, "x": [1, 2]}
