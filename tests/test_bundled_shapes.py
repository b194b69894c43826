"""The bundled default model (visar/assets/shapes-llamagen) still draws what it is asked for.

docs/training.md states the class fidelity of 5000 samples at the default CFG (pipeline.json
``sampling_defaults``); 100 balanced samples must reach it within a margin of ~2.5 binomial standard
errors. Sampling 100 images takes a few seconds on one CPU core.
"""
import json

import torch

import visar
from visar.eval.classifier import class_fidelity
from visar.zoo import ASSETS

FOLDER = ASSETS / "shapes-llamagen"
#: measured in docs/training.md (5000 balanced samples at the default cfg_scale 2.5)
STATED_FIDELITY = 0.904
MARGIN = 0.10  # ~3 binomial standard errors of 100 samples at p = 0.90 (a broken model scores ~0.10)


def test_bundled_files_are_small_safetensors():
    files = {p.name: p.stat().st_size for p in FOLDER.iterdir()}
    assert {"pipeline.json", "tokenizer.json", "tokenizer.safetensors", "generator.json",
            "generator.safetensors"} <= set(files)
    assert sum(files.values()) < 22e6  # 21.0 MB: a 1.04M-parameter VQ and a 4.18M-parameter GPT in float32


def test_bundled_model_class_fidelity():
    pipe = visar.load("shapes-llamagen")
    defaults = json.loads((FOLDER / "pipeline.json").read_text()).get("sampling_defaults", {})
    labels = torch.arange(100) % 10
    images = pipe.generate(labels, seed=123, **defaults)
    assert images.shape == (100, 3, 32, 32)
    assert class_fidelity(images, labels) >= STATED_FIDELITY - MARGIN


#: docs/training.md: reconstruction PSNR of 500 held-out 32 px shapes (images in [0, 1]), whole VQ trained on
STATED_PSNR = 33.4


def test_bundled_tokenizer_reconstruction_psnr():
    from visar.data.shapes import ShapesDataset

    tok = visar.load("shapes-llamagen").tokenizer
    x, _ = ShapesDataset(size=32, length=100, split="test").render(range(100))
    with torch.no_grad():
        rec = tok.decode(tok.encode(x)).clamp(-1, 1)
    mse = ((rec - x) / 2).pow(2).flatten(1).mean(1)
    psnr = float((10 * torch.log10(1 / mse)).mean())
    assert psnr >= STATED_PSNR - 1.0  # the previous (decoder-only fine-tuned) VQ had 29.4, the first one 25.5


def test_bundled_model_is_deterministic():
    pipe = visar.load("shapes-llamagen")
    a = pipe.generate([3, 7], seed=5, cfg_scale=2.0)
    b = pipe.generate([3, 7], seed=5, cfg_scale=2.0)
    assert torch.equal(a, b)
