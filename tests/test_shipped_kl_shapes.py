"""The trained shapes KL tokenizer shipped in benchmarks/weights/kl_shapes (the tokenizer the continuous
families' shapes demos train on): it loads as a KLTokenizer and reconstructs held-out shapes well.

The full measurement (500 held-out shapes, classifier accuracy on the reconstructions) is
``python benchmarks/tokenizer_report.py --tokenizer kl=benchmarks/weights/kl_shapes`` (docs/training.md).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

FOLDER = Path(__file__).resolve().parents[1] / "benchmarks" / "weights" / "kl_shapes"


@pytest.fixture(scope="module")
def kl():
    if not (FOLDER / "tokenizer.safetensors").is_file():
        pytest.skip(f"{FOLDER} is not in this checkout (the shipped shapes KL weights)")
    from visar.tokenizers.base import Tokenizer

    return Tokenizer.from_pretrained(FOLDER, "tokenizer").eval()


@torch.no_grad()
def test_shipped_kl_reconstructs_held_out_shapes(kl):
    from visar.data.shapes import ShapesDataset
    from visar.tokenizers.kl import KLTokenizer

    assert isinstance(kl, KLTokenizer)
    ds = ShapesDataset(size=32, length=32, split="test", seed=0)
    x = torch.stack([ds[i]["image"] for i in range(32)])
    z = kl.encode(x)
    assert z.shape == (32, 4, 8, 8)
    assert 0.5 < z.std().item() < 2.0  # scale_factor "auto": tokens of about unit std
    y = kl.decode(z).clamp(-1, 1)
    mse = ((y - x) / 2).pow(2).mean().item()  # images in [0, 1]
    psnr = 10 * torch.log10(torch.tensor(1.0 / mse)).item()
    assert psnr > 32.0, f"PSNR {psnr:.2f} dB on held-out shapes (measured 37.75 dB on 500)"
