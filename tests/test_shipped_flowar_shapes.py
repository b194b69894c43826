"""The FlowAR shapes generator shipped in benchmarks/weights/flowar_shapes (configs/flowar_shapes.yaml on the
shipped KL, 8000 + 6000 steps of batch 64, float16; docs/training.md) loads, pairs with the shipped KL tokenizer
and samples 32 px images. Its class fidelity (47.9% on 5000 samples) is measured by
benchmarks/shapes_zoo_report.py, not here.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

WEIGHTS = Path(__file__).resolve().parents[1] / "benchmarks" / "weights"


@torch.no_grad()
def test_shipped_flowar_shapes_generator_samples_with_the_shipped_kl():
    gen_dir, tok_dir = WEIGHTS / "flowar_shapes", WEIGHTS / "kl_shapes"
    if not (gen_dir / "model.safetensors").is_file() or not (tok_dir / "tokenizer.safetensors").is_file():
        pytest.skip("benchmarks/weights/flowar_shapes or kl_shapes is not in this checkout (shipped weights)")
    pytest.importorskip("diffusers")
    from visar.generators.base import Generator
    from visar.pipeline import Pipeline
    from visar.tokenizers.base import Tokenizer

    gen = Generator.from_pretrained(gen_dir, "generator").eval()
    tok = Tokenizer.from_pretrained(tok_dir, "tokenizer").eval()
    assert type(gen).__name__ == "NextScaleFlowGenerator" and gen.num_classes == 10
    pipe = Pipeline(tok, gen, sampling_defaults={"num_steps": 20, "cfg_scale": 2.0})
    images = pipe.generate([0, 5], seed=0, num_steps=2)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert torch.equal(images, pipe.generate([0, 5], seed=0, num_steps=2))  # seeded
