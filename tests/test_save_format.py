"""The pipeline folder format (version 3): one component folder per part, each loadable alone; the KL
tokenizer's folder opens with diffusers; older flat folders and the bundled model still load; bad folders
name what is wrong (docs/saving.md)."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

import visar
from visar import zoo
from visar.generators.base import Generator
from visar.pipeline import PIPELINE_VERSION, Pipeline
from visar.tokenizers.base import Tokenizer
from visar.utils.io import default_dir_mode, default_file_mode

#: family -> (tokenizer preset, generator preset, generator overrides, short sampling options)
FAMILIES = {
    "llamagen": ("llamagen-vq-tiny", "llamagen-gpt-tiny", {}, {}),
    "var": ("var-vqvae-tiny", "var-tiny", {}, {}),
    "mar": ("kl-tiny", "mar-tiny", {"vae_stride": 4, "img_size": 32}, {"num_iter": 2, "num_steps": 3}),
    "mar-ar": ("kl-tiny", "mar-ar-tiny", {}, {"num_steps": 3}),
    "flowar": ("kl-tiny", "flowar-tiny", {}, {"num_steps": 2}),
    "xar": ("kl-tiny", "xar-tiny", {}, {"num_steps": 2}),
    "ctf": ("llamagen-vq-tiny", "ctf-tiny", {}, {}),
}


def tiny_pipeline(family: str, **kwargs) -> tuple[Pipeline, dict]:
    tok_name, gen_name, overrides, options = FAMILIES[family]
    if tok_name == "kl-tiny":
        pytest.importorskip("diffusers")
    torch.manual_seed(0)
    tok = zoo.create(tok_name).eval()
    gen = zoo.create(gen_name, **overrides).eval()
    if family == "ctf":
        gen.fit_clusters(tok, seed=0, iters=3)
    return Pipeline(tok, gen, **kwargs), {"cfg_scale": 2.0, **options}


def tree(folder) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_round_trips_with_identical_samples(family, tmp_path):
    pipe, options = tiny_pipeline(family, sampling_defaults={"cfg_scale": 1.5})
    d = pipe.save_pretrained(tmp_path / "p")
    meta = json.loads((d / "pipeline.json").read_text())
    assert meta["version"] == PIPELINE_VERSION == 3
    assert set(meta["components"]) == {"tokenizer", "generator"}
    assert meta["components"]["generator"]["class"].endswith(type(pipe.generator).__name__)
    for part in ("tokenizer", "generator"):
        cfg = json.loads((d / part / "config.json").read_text())
        assert cfg["_visar"]["format"] == "visar-component" and cfg["_visar"]["family"] == getattr(pipe, part).family
        assert (d / part / cfg["_visar"]["weights"]).is_file()
    # files and folders readable by others (the ordinary modes, not a temporary file's 0600 / 0700)
    for root, dirs, files in os.walk(d):
        assert all(os.stat(os.path.join(root, x)).st_mode & 0o777 == default_dir_mode() for x in dirs)
        assert all(os.stat(os.path.join(root, x)).st_mode & 0o777 == default_file_mode() for x in files)
    assert not [p for p in os.listdir(d) if p.startswith(".")]  # no temporary folders left
    back = Pipeline.from_pretrained(d)
    assert back.sampling_defaults == {"cfg_scale": 1.5}
    assert torch.equal(back.generate([0, 1], seed=3, **options), pipe.generate([0, 1], seed=3, **options))


def test_components_load_alone(tmp_path):
    pipe, options = tiny_pipeline("llamagen")
    d = pipe.save_pretrained(tmp_path / "p")
    tok = type(pipe.tokenizer).from_pretrained(d / "tokenizer")
    gen = Generator.from_pretrained(d / "generator")  # the base class finds the saved family
    assert type(gen) is type(pipe.generator) and type(tok) is type(pipe.tokenizer)
    for a, b in ((tok, pipe.tokenizer), (gen, pipe.generator)):
        assert all(torch.equal(b.state_dict()[k], v) for k, v in a.state_dict().items())
    # the older (folder, name) form finds the component folder too (CLI --draft, visar tokenize, training)
    assert type(Tokenizer.from_pretrained(d, "tokenizer")) is type(pipe.tokenizer)
    assert Generator.from_pretrained(d / "generator", torch_dtype=torch.bfloat16).head.weight.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="is not a Generator"):
        Generator.from_pretrained(d / "tokenizer")
    with pytest.raises(FileNotFoundError, match="pipeline folder"):
        Generator.from_pretrained(d)
    # a component saved on its own is the same folder format
    gen.save_pretrained(tmp_path / "g")
    assert sorted(os.listdir(tmp_path / "g")) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    assert cfg["vocab_size"] == pipe.generator.config["vocab_size"]  # constructor arguments at top level
    # (folder, "generator") given the component folder itself (a saved draft for --draft) loads that folder
    assert type(Generator.from_pretrained(tmp_path / "g", "generator")) is type(pipe.generator)


def test_kl_tokenizer_folder_opens_with_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pipe, _ = tiny_pipeline("flowar")
    tok = pipe.tokenizer
    d = pipe.save_pretrained(tmp_path / "p")
    assert sorted(os.listdir(d / "tokenizer")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    vae = diffusers.AutoencoderKL.from_pretrained(d / "tokenizer").eval()
    assert vae.config.scaling_factor == pytest.approx(tok.scale_factor)
    torch.manual_seed(1)
    latents = torch.randn(2, tok.latent_channels, 8, 8)  # scaled tokens, as the generators emit them
    with torch.no_grad():
        ours = tok.decode(latents)
        theirs = vae.decode(latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)).sample
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    back = Tokenizer.from_pretrained(d / "tokenizer").eval()
    assert back.config == tok.config
    with torch.no_grad():
        assert torch.equal(back.decode(latents), ours)


def test_kl_running_latent_scale_is_saved(tmp_path):
    pytest.importorskip("diffusers")
    from visar.tokenizers.kl import KL_TINY_CONFIG, KLTokenizer

    torch.manual_seed(0)
    tok = KLTokenizer(vae_config=KL_TINY_CONFIG, scale_factor="auto")
    tok.latent_std.fill_(0.37)
    tok.latent_std_updates.fill_(12)
    tok.save_pretrained(tmp_path / "kl")
    cfg = json.loads((tmp_path / "kl" / "config.json").read_text())
    assert cfg["scaling_factor"] == pytest.approx(1 / 0.37)  # what diffusers users multiply latents by
    back = KLTokenizer.from_pretrained(tmp_path / "kl")
    assert torch.equal(back.latent_std, tok.latent_std) and int(back.latent_std_updates) == 12


def test_old_flat_folders_and_the_bundled_model_still_load(tmp_path):
    pipe, options = tiny_pipeline("llamagen")
    flat = tmp_path / "flat"
    pipe.tokenizer.save_pretrained(flat, "tokenizer")  # the layout of format versions 1 and 2
    pipe.generator.save_pretrained(flat, "generator")
    (flat / "pipeline.json").write_text(json.dumps({"format": "visar-pipeline", "version": 2,
                                                    "sampling_defaults": {"cfg_scale": 2.0}}))
    old = Pipeline.from_pretrained(flat)
    assert old.sampling_defaults == {"cfg_scale": 2.0}
    assert torch.equal(old.generate([1, 2], seed=0), pipe.generate([1, 2], seed=0, cfg_scale=2.0))
    # saving over it writes the new layout and removes the now stale flat files
    old.save_pretrained(flat)
    assert sorted(os.listdir(flat)) == ["generator", "pipeline.json", "tokenizer"]
    assert torch.equal(Pipeline.from_pretrained(flat).generate([1, 2], seed=0), old.generate([1, 2], seed=0))

    bundled = zoo.ASSETS / "shapes-llamagen"
    before = tree(bundled)
    assert json.loads((bundled / "pipeline.json").read_text())["version"] == 1  # shipped as it was
    loaded = visar.load("shapes-llamagen")
    assert len(loaded([0], seed=0)) == 1
    assert tree(bundled) == before  # loading writes nothing


def test_a_failed_save_leaves_the_earlier_folder_whole(tmp_path, monkeypatch):
    pipe, _ = tiny_pipeline("llamagen")
    d = pipe.save_pretrained(tmp_path / "p")
    before = tree(d)

    def broken(self, directory, name=None):
        (directory / "config.json").write_text("{}")  # half written, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(type(pipe.generator), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        pipe.save_pretrained(d)
    assert tree(d) == before and not [p for p in os.listdir(d) if p.startswith(".")]
    monkeypatch.undo()
    assert torch.equal(Pipeline.from_pretrained(d).generate([0], seed=0), pipe.generate([0], seed=0))


def test_bad_folders_name_the_problem(tmp_path):
    import shutil

    pipe, _ = tiny_pipeline("llamagen")
    d = pipe.save_pretrained(tmp_path / "p")

    missing = tmp_path / "missing"
    shutil.copytree(d, missing)
    shutil.rmtree(missing / "generator")
    with pytest.raises(FileNotFoundError, match=r"missing/generator.*component folder 'generator'"):
        Pipeline.from_pretrained(missing)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(d, corrupt)
    (corrupt / "tokenizer" / "config.json").write_text('{"codebook_size": 5')
    with pytest.raises(ValueError, match=r"corrupt/tokenizer/config.json is not valid JSON"):
        Pipeline.from_pretrained(corrupt)

    foreign = tmp_path / "foreign"
    shutil.copytree(d, foreign)
    (foreign / "generator" / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match=r"foreign/generator/config.json is not a visar component config"):
        Pipeline.from_pretrained(foreign)

    newer = tmp_path / "newer"
    shutil.copytree(d, newer)
    meta = json.loads((newer / "pipeline.json").read_text())
    (newer / "pipeline.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match="format version 99.*upgrade visar"):
        Pipeline.from_pretrained(newer)

    with pytest.raises(TypeError, match="torch_dtype must be a floating torch dtype"):
        Pipeline.from_pretrained(d, torch_dtype=torch.int8)
    with pytest.raises(NotADirectoryError, match="is a file"):
        (tmp_path / "file").write_text("x")
        pipe.save_pretrained(tmp_path / "file")
