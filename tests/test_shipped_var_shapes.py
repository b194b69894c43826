"""The VAR shapes pipeline shipped in benchmarks/weights/var_shapes (configs/var_shapes_generator.yaml on the
fine-tuned multi-scale VQ, float16 generator weights; docs/training.md) loads as a Pipeline and samples 32 px
images. Its class fidelity is measured by benchmarks/shapes_zoo_report.py, not here.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

PIPE_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "weights" / "var_shapes"


@torch.no_grad()
def test_shipped_var_shapes_pipeline_samples():
    if not (PIPE_DIR / "pipeline.json").is_file():
        pytest.skip("benchmarks/weights/var_shapes is not in this checkout (shipped weights)")
    from visar.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(PIPE_DIR)
    gen, tok = pipe.generator, pipe.tokenizer
    assert type(gen).__name__ == "NextScaleGenerator" and type(tok).__name__ == "MultiScaleVQTokenizer"
    assert gen.num_classes == 10 and all(p.dtype == torch.float32 for p in gen.parameters())
    assert pipe.sampling_defaults["cfg_scale"] > 1.0
    images = pipe.generate([0, 5], seed=0)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert torch.equal(images, pipe.generate([0, 5], seed=0))  # seeded
