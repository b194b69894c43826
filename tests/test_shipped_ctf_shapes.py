"""The CTF shapes pipeline shipped in benchmarks/weights/ctf_shapes (configs/ctf_shapes.yaml at batch 64 on the
bundled VQ, float16 generator weights; docs/training.md) loads as a Pipeline, carries its k-means clusters of the
bundled VQ's codebook, and samples 32 px images. Its class fidelity is measured by
benchmarks/shapes_zoo_report.py, not here.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PIPE_DIR = ROOT / "benchmarks" / "weights" / "ctf_shapes"


@torch.no_grad()
def test_shipped_ctf_shapes_pipeline_samples():
    if not (PIPE_DIR / "pipeline.json").is_file():
        pytest.skip("benchmarks/weights/ctf_shapes is not in this checkout (shipped weights)")
    from visar.pipeline import Pipeline
    from visar.tokenizers.base import Tokenizer

    pipe = Pipeline.from_pretrained(PIPE_DIR)
    gen, tok = pipe.generator, pipe.tokenizer
    assert type(gen).__name__ == "CoarseToFineGenerator" and type(tok).__name__ == "VQTokenizer"
    assert gen.num_classes == 10 and gen.has_clusters
    assert all(p.dtype == torch.float32 for p in gen.parameters())
    gen.check_tokenizer(Tokenizer.from_pretrained(ROOT / "visar" / "assets" / "shapes-llamagen", "tokenizer"))
    assert pipe.sampling_defaults["cfg_scale"] > 1.0
    images = pipe.generate([0, 5], seed=0)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert torch.equal(images, pipe.generate([0, 5], seed=0))  # seeded
