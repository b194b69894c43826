"""`visar sample` on the bundled model, and Pipeline sampling defaults."""
import numpy as np
import pytest
from PIL import Image

from visar import zoo
from visar.cli import main


def test_sample_writes_grid_individual_and_npz(tmp_path):
    rc = main(["sample", "--classes", "1,4", "--num", "4", "--out", str(tmp_path), "--individual", "--npz", "--quiet"])
    assert rc == 0
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width > 64 and grid.height > 32
    assert len(list((tmp_path / "images").glob("*.png"))) == 4
    data = np.load(tmp_path / "samples.npz")
    assert data["arr_0"].shape == (4, 32, 32, 3) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].tolist() == [1, 4, 1, 4]  # the ADM / `visar eval` labels key


def test_sample_rejects_bad_class_and_unknown_model(tmp_path, caplog):
    assert main(["sample", "--classes", "10", "--out", str(tmp_path), "--quiet"]) == 2
    assert "outside [0, 10)" in caplog.text
    assert main(["sample", "--model", str(tmp_path / "nope"), "--out", str(tmp_path), "--quiet"]) == 2


def test_pipeline_defaults_apply_and_user_options_win(tmp_path):
    pipe = zoo.load()
    assert pipe.sampling_defaults.get("cfg_scale", 1.0) > 1.0
    a = pipe.generate([2, 3], seed=5)
    b = pipe.generate([2, 3], seed=5, cfg_scale=pipe.sampling_defaults["cfg_scale"])
    c = pipe.generate([2, 3], seed=5, cfg_scale=1.0)
    assert (a == b).all() and not (a == c).all()
    pipe.save_pretrained(tmp_path)
    assert zoo.load(tmp_path).sampling_defaults == pipe.sampling_defaults
    with pytest.raises(FileNotFoundError, match="bundled"):
        zoo.load("no-such-model")


@pytest.mark.fixtures
def test_convert_official_llamagen_files_to_a_pipeline(tmp_path, fixtures):
    d = fixtures("llamagen")
    out = tmp_path / "pipe"
    rc = main(["convert", "llamagen", "--tokenizer", str(d / "vq_tiny_ds16.pt"), "--generator",
               str(d / "gpt_tiny_c2i.pt"), "--set", "grid_size=4", "--out", str(out)])
    assert rc == 0
    pipe = zoo.load(out)
    assert pipe.generator.num_classes == 10 and len(pipe([1, 2], seed=0)) == 2
    # a tokenizer of another family is refused with a clear error (exit code 2)
    assert main(["convert", "llamagen", "--tokenizer", str(d / "gpt_tiny_c2i.pt"), "--generator",
                 str(d / "gpt_tiny_c2i.pt"), "--out", str(tmp_path / "bad")]) == 2
