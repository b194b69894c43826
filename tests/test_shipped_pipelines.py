"""The shapes pipelines shipped in benchmarks/weights (full Pipeline folders; docs/training.md) load, sample
seeded 32 px images in [-1, 1] at their stored guidance, and hold float32 weights after loading their float16
files:

* ``var_shapes``: configs/var_shapes_generator.yaml on the fine-tuned multi-scale VQ;
* ``ctf_shapes``: configs/ctf_shapes.yaml on the bundled VQ, whose codebook its k-means clusters must match;
* ``flowar_shapes``: configs/flowar_shapes.yaml on the shipped KL (``benchmarks/weights/kl_shapes``, copied in).

Their class fidelity is measured by benchmarks/shapes_zoo_report.py, not here.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"var_shapes": ("NextScaleGenerator", "MultiScaleVQTokenizer"),
           "ctf_shapes": ("CoarseToFineGenerator", "VQTokenizer"),
           "flowar_shapes": ("NextScaleFlowGenerator", "KLTokenizer")}


@torch.no_grad()
@pytest.mark.parametrize("folder", sorted(SHIPPED))
def test_shipped_pipeline_loads_and_samples(folder):
    pipe_dir = ROOT / "benchmarks" / "weights" / folder
    if not (pipe_dir / "pipeline.json").is_file():
        pytest.skip(f"benchmarks/weights/{folder} is not in this checkout (shipped weights)")
    from visar.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(pipe_dir)
    gen, tok = pipe.generator, pipe.tokenizer
    assert (type(gen).__name__, type(tok).__name__) == SHIPPED[folder]
    assert gen.num_classes == 10 and all(p.dtype == torch.float32 for p in gen.parameters())
    assert pipe.sampling_defaults["cfg_scale"] > 1.0
    images = pipe.generate([0, 5], seed=0)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert torch.equal(images, pipe.generate([0, 5], seed=0))  # seeded


def test_shipped_ctf_clusters_match_the_bundled_vq():
    pipe_dir = ROOT / "benchmarks" / "weights" / "ctf_shapes"
    if not (pipe_dir / "pipeline.json").is_file():
        pytest.skip("benchmarks/weights/ctf_shapes is not in this checkout (shipped weights)")
    from visar.generators.base import Generator
    from visar.tokenizers.base import Tokenizer

    gen = Generator.from_pretrained(pipe_dir, "generator")
    assert gen.has_clusters
    gen.check_tokenizer(Tokenizer.from_pretrained(ROOT / "visar" / "assets" / "shapes-llamagen", "tokenizer"))
