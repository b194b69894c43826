"""What visar writes is right (issue 28, "Records and files that are wrong"): exports stay out of the
package, ``samples.json`` reproduces the images, one seed rule everywhere, byte-reproducible npz, one
labels key, ordinary file modes and a streamed safetensors writer."""
from __future__ import annotations

import glob
import hashlib
import os
import stat
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from visar import zoo
from visar.cli import main
from visar.eval import sampling
from visar.eval.sidecar import SEED_RULE, load_sidecar
from visar.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A saved tiny LlamaGen pipeline (random weights, 64 px, 10 classes)."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("rec") / "tiny"
    Pipeline(zoo.create("llamagen-vq-tiny"), zoo.create("llamagen-gpt-tiny")).save_pretrained(d)
    return d


def _npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


# ------------------------------------------------------------------------------------- 1. exports
def test_exports_default_under_the_run_and_never_into_the_package(monkeypatch):
    from visar.train.config import ConfigError, load_config
    from visar.utils.io import inside_package, package_root

    monkeypatch.chdir(ROOT)
    # the token caches and earlier runs these configs start from need not exist here
    data = ["data.kind=shapes", "data.path=null", "model.init_from=", "model.init_deepen={}"]
    for path in sorted(glob.glob("configs/shapes_gpt*.yaml")):
        cfg = load_config(path, [*data, "train.output_dir=runs/try"])
        assert cfg.export_path() == Path("runs/try/export"), path  # the export moves with the run
    cfg = load_config("configs/shapes_classifier.yaml")
    assert cfg.export_path() == Path(cfg.train.output_dir) / "export" and not inside_package(cfg.export_path())
    assets = str(package_root() / "assets" / "classifier")
    with pytest.raises(ConfigError, match="inside the installed visar package.*export_to_package=true"):
        load_config("configs/shapes_classifier.yaml", [f"export_dir={assets}"])
    with pytest.raises(ConfigError, match="train.output_dir"):
        load_config("configs/shapes_classifier.yaml", [f"train.output_dir={package_root() / 'runs'}"])
    # maintainers refresh a bundled asset on purpose
    cfg = load_config("configs/shapes_classifier.yaml", [f"export_dir={assets}", "export_to_package=true"])
    assert inside_package(cfg.export_path())


# ------------------------------------------------------------------------------------- 2. the recorded options
def test_recorded_options_reproduce_the_images(tmp_path):
    out = tmp_path / "s"
    assert main(["eval", "sample", "shapes-llamagen", "--out", str(out), "--num", "3", "--labels", "random",
                 "--seed", "4", "--batch-size", "2", "--quiet"]) == 0
    rec = load_sidecar(out)
    assert rec.options["cfg_scale"] == 2.5  # the bundled pipeline's sampling_defaults, not the sampler's 1.0
    assert "progress" not in rec.options and rec.seed_rule == SEED_RULE
    # recorded options + seed rule + Pipeline.generate give the same pixels
    pipe = zoo.load(rec.model_name)
    from visar.utils.images import to_uint8

    images = []
    for s in sampling.chunk_starts(range(rec.num), rec.batch_size):
        ids = sampling.labels_range(rec.labels, s, s + rec.batch_size, rec.num_classes, rec.seed).tolist()
        images.append(to_uint8(pipe.generate(ids, seed=sampling.chunk_seed(rec.seed, s), **rec.options)))
    arr = _npz(out / "samples.npz")
    assert np.array_equal(torch.cat(images)[:rec.num].numpy(), arr["arr_0"])


# ------------------------------------------------------------------------------------- 3. one seed rule
def _rule_from_the_text(seed: int, start: int) -> int:
    """The chunk seed as SEED_RULE states it, written independently of visar.eval.sampling."""
    return int.from_bytes(hashlib.sha256(f"visar-sample:{seed}:{start}".encode()).digest()[:8], "little") >> 1


def _label_from_the_text(seed: int, i: int, num_classes: int) -> int:
    return (int.from_bytes(hashlib.sha256(f"visar-label:{seed}:{i}".encode()).digest()[:8], "little") >> 1) % num_classes


def test_one_seed_rule_in_code_sidecar_and_docs():
    assert "sha256(f'visar-sample:{seed}:{s}')[:8], 'little') >> 1" in SEED_RULE
    assert "(int.from_bytes(sha256(f'visar-label:{seed}:{i}')[:8], 'little') >> 1) % num_classes" in SEED_RULE
    for seed, start in ((0, 0), (3, 32), (12345, 4096)):
        assert sampling.chunk_seed(seed, start) == _rule_from_the_text(seed, start)
    assert sampling.labels_range("random", 5, 40, 7, seed=3).tolist() == [
        _label_from_the_text(3, i, 7) for i in range(5, 40)]
    assert sampling.labels_range("balanced", 5, 40, 7).tolist() == [i % 7 for i in range(5, 40)]
    assert SEED_RULE in (ROOT / "docs" / "evaluation.md").read_text(), "docs/evaluation.md must quote SEED_RULE"


# ------------------------------------------------------------------------------------- 4. byte-reproducible npz
def test_npz_is_byte_reproducible(tmp_path, monkeypatch):
    from visar.eval.io import ZIP_DATE_TIME, write_npz_streaming

    ims = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    monkeypatch.setattr(time, "time", lambda: 1_000_000_000.0)
    write_npz_streaming(tmp_path / "a.npz", iter(ims), ims.shape, labels=np.arange(3))
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)  # another wall-clock time
    write_npz_streaming(tmp_path / "b.npz", iter(ims), ims.shape, labels=np.arange(3))
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.npz") as z:
        assert [i.date_time for i in z.infolist()] == [ZIP_DATE_TIME] * 2
    arr = _npz(tmp_path / "a.npz")
    assert np.array_equal(arr["arr_0"], ims) and arr["arr_1"].tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------- 5. labels and seeding
def test_extending_a_set_keeps_its_images(tiny_dir, tmp_path):
    pipe = zoo.load(tiny_dir)
    grown = tmp_path / "grown"
    sampling.sample_to_folder(pipe, grown, 20, "random", seed=1, batch_size=8, progress=False)
    first = _npz(grown / "samples.npz")["arr_0"]
    sampling.sample_to_folder(pipe, grown, 28, "random", seed=1, batch_size=8, progress=False)
    sampling.sample_to_folder(pipe, tmp_path / "fresh", 28, "random", seed=1, batch_size=8, progress=False)
    a, b = _npz(grown / "samples.npz"), _npz(tmp_path / "fresh" / "samples.npz")
    assert np.array_equal(a["arr_0"][:20], first)  # images 16-19 (the old short last chunk) did not change
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def test_visar_sample_and_eval_sample_give_the_same_images(tiny_dir, tmp_path):
    assert main(["sample", "--model", str(tiny_dir), "--num", "5", "--batch-size", "2", "--seed", "3", "--npz",
                 "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert main(["eval", "sample", str(tiny_dir), "--num", "5", "--labels", "balanced", "--batch-size", "2",
                 "--seed", "3", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    a, b = _npz(tmp_path / "a" / "samples.npz"), _npz(tmp_path / "b" / "samples.npz")
    assert set(a) == {"arr_0", "arr_1"}  # the ADM keys, which `visar eval shapes` / `fid` read
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert len(np.unique(a["arr_0"].reshape(5, -1), axis=0)) == 5


def test_eval_shapes_reads_labels_from_arr_1_labels_or_the_flag(tmp_path, capsys):
    import json

    from visar.data.shapes import ShapesDataset
    from visar.eval.cli import main as eval_main
    from visar.utils.images import to_uint8

    x, lab = ShapesDataset(size=32, length=8, seed=5).render(range(8))
    u8 = to_uint8(x).numpy()
    np.savez(tmp_path / "labels.npz", arr_0=u8, labels=np.asarray(lab))  # what `visar sample --npz` used to write
    np.savez(tmp_path / "bare.npz", arr_0=u8)
    np.save(tmp_path / "lab.npy", np.asarray(lab))
    results = []
    for argv in (["shapes", str(tmp_path / "labels.npz")],
                 ["shapes", str(tmp_path / "bare.npz"), "--labels", str(tmp_path / "lab.npy")],
                 ["shapes", str(tmp_path / "bare.npz"), "--labels", ",".join(str(int(v)) for v in lab)]):
        capsys.readouterr()
        assert eval_main([*argv, "--num-reference", "20"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0] == results[1] == results[2] and results[0]["class_fidelity"] > 0.5


# ------------------------------------------------------------------------------------- 6. file modes, streaming
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_saved_files_get_the_ordinary_mode(tmp_path, umask, mode):
    from visar.eval.io import write_npz_streaming, write_png
    from visar.utils.io import atomic_write_bytes

    torch.manual_seed(0)
    old = os.umask(umask)
    try:
        Pipeline(zoo.create("llamagen-vq-tiny"), zoo.create("llamagen-gpt-tiny")).save_pretrained(tmp_path / "p")
        atomic_write_bytes(tmp_path / "f.json", b"{}")
        write_png(tmp_path / "i.png", np.zeros((4, 4, 3), np.uint8))
        write_npz_streaming(tmp_path / "s.npz", iter(np.zeros((1, 4, 4, 3), np.uint8)), (1, 4, 4, 3))
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 8
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: mode for p in files}


def test_save_safetensors_streams_the_format_safetensors_writes(tmp_path, monkeypatch):
    import safetensors.torch as st

    from visar.utils.io import load_safetensors, save_safetensors

    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    tensors = {"w": base.t(), "b16": torch.randn(5, generator=g).bfloat16(), "h": torch.randn(3, generator=g).half(),
               "i": torch.arange(7), "flag": torch.tensor([True, False]), "u8": torch.arange(5, dtype=torch.uint8),
               "scalar": torch.tensor(2.5, dtype=torch.float64), "empty": torch.zeros(0, 3),
               "view": base[1]}  # shares storage with "w"
    reference = {k: v.contiguous().clone() for k, v in tensors.items()}
    expected = {name: st.save(reference, metadata=meta) for name, meta in (("plain", None),
                                                                            ("meta", {"format": "pt"}))}

    def whole_file_in_memory(*a, **k):
        raise AssertionError("save_safetensors must stream, not build the file with safetensors.torch.save")

    monkeypatch.setattr(st, "save", whole_file_in_memory)
    monkeypatch.setattr(st, "save_file", whole_file_in_memory)
    for name, meta in (("plain", None), ("meta", {"format": "pt"})):
        save_safetensors(tensors, tmp_path / f"{name}.safetensors", metadata=meta)
        assert (tmp_path / f"{name}.safetensors").read_bytes() == expected[name]
    back = load_safetensors(tmp_path / "plain.safetensors")
    assert set(back) == set(tensors) and all(torch.equal(back[k], reference[k]) for k in tensors)
    with pytest.raises(TypeError, match="tensors\\['x'\\]"):
        save_safetensors({"x": [1, 2]}, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
