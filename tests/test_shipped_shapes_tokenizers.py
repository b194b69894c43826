"""The trained shapes tokenizers shipped in benchmarks/weights (what the shapes demos of VAR and of the
continuous families train on): each loads as its class and reconstructs held-out shapes well.

The full measurement (500 held-out shapes, classifier accuracy on the reconstructions) is
``python benchmarks/tokenizer_report.py --tokenizer kl=benchmarks/weights/kl_shapes
--tokenizer msvq=benchmarks/weights/msvq_shapes`` (docs/training.md).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

WEIGHTS = Path(__file__).resolve().parents[1] / "benchmarks" / "weights"

# folder, class name, token shape of one 32 px image, minimum PSNR on 32 held-out shapes (measured on 500)
CASES = {
    "kl_shapes": ("KLTokenizer", (4, 8, 8), 32.0),  # 37.75 dB
    "msvq_shapes": ("MultiScaleVQTokenizer", None, 27.0),  # 30.82 dB
}


@pytest.mark.parametrize("name", sorted(CASES))
@torch.no_grad()
def test_shipped_tokenizer_reconstructs_held_out_shapes(name):
    folder = WEIGHTS / name
    if not (folder / "tokenizer.safetensors").is_file():
        pytest.skip(f"{folder} is not in this checkout (shipped shapes tokenizer weights)")
    from visar.data.shapes import ShapesDataset
    from visar.tokenizers.base import Tokenizer

    cls_name, token_shape, min_psnr = CASES[name]
    tok = Tokenizer.from_pretrained(folder, "tokenizer").eval()
    assert type(tok).__name__ == cls_name
    ds = ShapesDataset(size=32, length=32, split="test", seed=0)
    x = torch.stack([ds[i]["image"] for i in range(32)])
    z = tok.encode(x)
    if token_shape is not None:
        assert tuple(z.shape) == (32, *token_shape)
        assert 0.5 < z.std().item() < 2.0  # scale_factor "auto": tokens of about unit std
    y = tok.decode(z).clamp(-1, 1)
    mse = ((y - x) / 2).pow(2).mean().item()  # images in [0, 1]
    psnr = 10 * torch.log10(torch.tensor(1.0 / mse)).item()
    assert psnr > min_psnr, f"{name}: PSNR {psnr:.2f} dB on held-out shapes"
