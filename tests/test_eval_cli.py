"""`visar eval sample | fid | shapes | protocols` end to end on tiny models (CPU, offline)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from visar import zoo
from visar.eval import cli
from visar.eval.sidecar import load_sidecar


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A saved tiny LlamaGen pipeline (VQ + GPT twins with random weights, 64 px, 10 classes)."""
    try:
        tok, gen = zoo.create("llamagen-vq-tiny"), zoo.create("llamagen-gpt-tiny")
    except KeyError as e:
        pytest.skip(f"tiny LlamaGen presets not registered yet: {e}")
    from visar.pipeline import Pipeline

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("pipe") / "tiny-llamagen"
    Pipeline(tok, gen).save_pretrained(d)
    return d


def test_cli_sample_fid_shapes(pipeline_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "samples"
    assert cli.main(["sample", str(pipeline_dir), "--out", str(out), "--num", "4", "--labels", "random",
                     "--cfg-scale", "2.0", "--option", "top_k=8", "--batch-size", "2", "--resize", "32",
                     "--no-progress"]) == 0
    rec = load_sidecar(out)
    assert rec.status == "complete" and rec.num == 4 and rec.image_size == [32, 32] and rec.resize == 32
    assert rec.options["cfg_scale"] == 2.0 and rec.options["top_k"] == 8 and rec.options["top_p"] == 1.0
    assert rec.model_path == str(pipeline_dir.resolve())
    assert set(rec.weights_sha256) == {"tokenizer/model.safetensors", "generator/model.safetensors"}
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (4, 32, 32, 3)

    # FID & co. with a local (random) Inception file, through the same path as the real weights
    from visar.eval.inception import random_inception_weights

    weights = random_inception_weights(tmp_path / "inception.pth")
    ref = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    capsys.readouterr()
    assert cli.main(["fid", str(out), "--ref", str(tmp_path / "ref.npz"), "--inception-weights", str(weights),
                     "--kid-subset-size", "2", "--kid-subsets", "3", "--isc-splits", "2", "--batch-size", "4",
                     "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "fid.json"),
                     "--no-progress"]) == 0
    res = json.loads((tmp_path / "fid.json").read_text())
    assert res == json.loads(capsys.readouterr().out)
    assert res["frechet_inception_distance"] > 0 and res["num_samples"] == 4
    assert res["samples_settings"]["options"]["cfg_scale"] == 2.0

    # offline shapes metrics read the labels from the sidecar
    assert cli.main(["shapes", str(out), "--num-reference", "20", "--json", str(tmp_path / "shapes.json")]) == 0
    sh = json.loads((tmp_path / "shapes.json").read_text())
    assert 0.0 <= sh["class_fidelity"] <= 1.0 and sh["num_samples"] == 4 and sh["frechet_classifier_distance"] > 0


def test_cli_protocol_and_explicit_labels(pipeline_dir, tmp_path, monkeypatch, caplog):
    from visar.zoo import Preset

    monkeypatch.setitem(zoo._registry(), "tiny-proto", Preset(
        cls="visar.generators.next_token.llamagen:NextTokenGenerator",
        eval={"cfg_scale": 4.0, "top_k": 0, "image_size": 64, "image_size_eval": 32, "labels": "random"}))
    assert cli.main(["sample", str(pipeline_dir), "--out", str(tmp_path / "x"), "--num", "2"]) == 2
    assert "--labels balanced" in caplog.text
    out = tmp_path / "p"
    assert cli.main(["sample", str(pipeline_dir), "--out", str(out), "--num", "2", "--protocol", "tiny-proto",
                     "--cfg-scale", "2.0", "--no-progress"]) == 0
    rec = load_sidecar(out)
    assert rec.labels == "random" and rec.resize == 32 and rec.options["cfg_scale"] == 2.0
    assert rec.departures == ["departure: cfg_scale 2.0 (protocol 4.0)", "departure: num_samples 2 (protocol 50000)"]
    assert rec.protocol["preset"] == "tiny-proto" and rec.protocol["options"]["cfg_scale"] == 2.0
    with pytest.raises(SystemExit):
        cli.main(["sample", str(pipeline_dir), "--out", str(out), "--labels", "uniform", "--num", "2"])


@pytest.mark.slow
def test_cli_two_processes_with_torchrun(pipeline_dir, tmp_path):
    """Slow (~30-60 s: two fresh interpreters importing torch): --num-processes 2 relaunches under torchrun."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = ["sample", str(pipeline_dir), "--num", "5", "--labels", "balanced", "--batch-size", "2", "--no-progress"]
    rc = subprocess.call([sys.executable, "-m", "visar.eval.cli", *base, "--out", str(tmp_path / "two"),
                          "--num-processes", "2"], env=env)
    assert rc == 0
    assert cli.main([*base, "--out", str(tmp_path / "one")]) == 0
    assert load_sidecar(tmp_path / "two").num_processes == 2
    with np.load(tmp_path / "one" / "samples.npz") as a, np.load(tmp_path / "two" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
