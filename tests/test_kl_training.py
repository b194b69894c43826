"""KL tokenizer trained from scratch: training_loss, the auto latent scale, errors, trainer export."""
from __future__ import annotations

import pytest
import torch

from visar.tokenizers.kl import KLTokenizer

#: 16 px -> 4x4x4 latents, stride 4, ~60k parameters
SMALL_VAE = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [8, 16, 16], "layers_per_block": 1, "act_fn": "silu", "latent_channels": 4,
    "norm_num_groups": 8, "sample_size": 16, "scaling_factor": 1.0, "force_upcast": False,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}


def _images(n=8, size=16, seed=0):
    from visar.data.shapes import ShapesDataset

    ds = ShapesDataset(size=size, length=n, seed=seed)
    return torch.stack([ds[i]["image"] for i in range(n)])


def test_loss_terms_and_kl_formula():
    torch.manual_seed(0)
    tok = KLTokenizer(vae_config=SMALL_VAE, scale_factor=0.5, kl_weight=0.1, recon_loss="mse")
    x = _images()
    out = tok.training_loss(x)
    assert {"loss", "recon", "kl", "latent_std", "posterior_std"} <= set(out)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["loss"], out["recon"] + 0.1 * out["kl"])
    with torch.no_grad():
        mean, std = tok.posterior(x)
    want = 0.5 * (mean ** 2 + std ** 2 - 1 - torch.log(std ** 2)).flatten(1).sum(1).mean() / (3 * 16 * 16)
    torch.testing.assert_close(out["kl"], want, rtol=1e-5, atol=1e-7)
    out["loss"].backward()
    assert tok.vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert tok.vae.decoder.conv_out.weight.grad.abs().sum() > 0
    # a fixed scale adds no state: the parity checkpoints map onto the same keys as before
    assert not any(k.startswith("latent_std") for k in tok.state_dict())


def test_training_reduces_reconstruction():
    torch.manual_seed(0)
    tok = KLTokenizer(vae_config=SMALL_VAE, scale_factor="auto")
    x = _images(16)
    opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        out = tok.training_loss(x)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = out["recon"].item() if first is None else first
    assert out["recon"].item() < 0.85 * first


def test_auto_scale_tracks_latent_std_and_is_saved(tmp_path):
    torch.manual_seed(0)
    tok = KLTokenizer(vae_config=SMALL_VAE, scale_factor="auto")
    x = _images()
    with torch.no_grad():
        for v in tok.vae.encoder.conv_out.parameters():
            v.mul_(7.0)  # latents far from unit std
        raw = tok.posterior(x)[0].std()
        tok.eval()
        tok.training_loss(x)  # eval mode: no update
        assert tok.latent_std_updates.item() == 0 and tok.scale_factor == 1.0
        tok.train()
        for _ in range(3):
            tok.training_loss(x)
    assert tok.latent_std_updates.item() == 3
    torch.testing.assert_close(tok.latent_std, raw, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        z = tok.encode(x)
        torch.testing.assert_close(z.std(), torch.tensor(1.0), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(tok.estimate_scale_factor(x), tok.scale_factor, rtol=1e-4, atol=1e-6)
        # decode undoes the scale
        torch.testing.assert_close(tok.decode(z), tok._decode_unscaled(tok.posterior(x)[0]), rtol=1e-4, atol=1e-5)
    tok.save_pretrained(tmp_path, "tokenizer")
    again = KLTokenizer.from_pretrained(tmp_path, "tokenizer").eval()
    assert again.scale_factor == pytest.approx(tok.scale_factor)
    with torch.no_grad():
        torch.testing.assert_close(again.encode(x), tok.encode(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="auto"):
        KLTokenizer(vae_config=SMALL_VAE, scale_factor="unit")
    with pytest.raises(ValueError, match="recon_loss"):
        KLTokenizer(vae_config=SMALL_VAE, recon_loss="huber")
    with pytest.raises(ValueError, match="kl_weight"):
        KLTokenizer(vae_config=SMALL_VAE, kl_weight=-1.0)
    with pytest.raises(TypeError, match="vae_config"):
        KLTokenizer(vae_config=[1, 2])
    tok = KLTokenizer(vae_config=SMALL_VAE)
    with pytest.raises(ValueError, match="divisible"):
        tok.training_loss(torch.zeros(2, 3, 18, 16))


def test_trainer_exports_a_kl_tokenizer(tmp_path):
    from visar.tokenizers.base import Tokenizer
    from visar.train.config import load_config
    from visar.train.trainer import train

    data = {
        "task": "tokenizer",
        "model": {"cls": "visar.tokenizers.kl:KLTokenizer",
                  "kwargs": {"vae_config": SMALL_VAE, "scale_factor": "auto"}},
        "data": {"kind": "shapes", "size": 16, "length": 32},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"steps": 2, "batch_size": 8, "save_every": 0, "log_every": 100, "sample_every": 2,
                  "output_dir": str(tmp_path / "run"), "progress": False},
    }
    export = train(load_config(None, [], data=data))
    tok = Tokenizer.from_pretrained(export, "tokenizer")
    assert isinstance(tok, KLTokenizer) and tok.latent_std_updates.item() == 2
    assert 0 < tok.scale_factor < float("inf")
    assert (tmp_path / "run" / "samples" / "final.png").is_file()
    with torch.no_grad():
        assert tok.encode(_images(2)).shape == (2, 4, 4, 4)
