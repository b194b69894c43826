"""MAR parity with the official module (tiny random fixture): transformer, loader, full sampler runs."""
from __future__ import annotations

import json

import pytest
import torch

from visar.generators.base import Condition


@pytest.fixture(scope="module")
def mar_dir():
    from conftest import fixture_dir

    return fixture_dir("mar")


@pytest.fixture(scope="module")
def tiny_mar(mar_dir):
    from visar.convert.mar import load_generator

    return load_generator(mar_dir / "mar_tiny_checkpoint-last.pth", encoder_num_heads=2, decoder_num_heads=2)


@pytest.fixture(scope="module")
def io(mar_dir):
    from safetensors.torch import load_file

    return load_file(mar_dir / "mar_tiny_io.safetensors")


def test_loader_detects_the_fixture_config(tiny_mar, mar_dir):
    want = json.loads((mar_dir / "mar_tiny_config.json").read_text())
    for key in ("img_size", "vae_stride", "patch_size", "encoder_embed_dim", "encoder_depth", "decoder_embed_dim",
                "decoder_depth", "mlp_ratio", "vae_embed_dim", "class_num", "buffer_size", "diffloss_d",
                "diffloss_w"):
        assert tiny_mar.config[key] == want[key], key
    assert tiny_mar.seq_len == 64 and not tiny_mar.training


def test_transformer_conditioning_matches_official(tiny_mar, io):
    with torch.no_grad():
        enc = tiny_mar.forward_encoder(io["mae.tokens"], io["mae.mask"], tiny_mar.class_embedding(io["mae.labels"]))
        z_c = tiny_mar(io["mae.tokens"], io["mae.mask"], io["mae.labels"])
        z_u = tiny_mar(io["mae.tokens"], io["mae.mask"], torch.full_like(io["mae.labels"], tiny_mar.num_classes))
        z_lat = tiny_mar(tiny_mar.unpatchify(io["mae.tokens"]), io["mae.mask"], io["mae.labels"])
    torch.testing.assert_close(enc, io["mae.encoder_out_cond"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z_c, io["mae.z_cond"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z_u, io["mae.z_uncond"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z_lat, z_c, rtol=0, atol=0)


def test_loader_uses_ema_weights(mar_dir, io):
    """``model`` differs from ``model_ema`` by small noise: loading the wrong entry fails parity."""
    from visar.convert.mar import load_generator

    raw = load_generator(mar_dir / "mar_tiny_checkpoint-last.pth", use_ema=False, encoder_num_heads=2,
                         decoder_num_heads=2)
    with torch.no_grad():
        z = raw(io["mae.tokens"], io["mae.mask"], io["mae.labels"])
    assert (z - io["mae.z_cond"]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["sample_cfg_linear", "sample_nocfg_constant"])
def test_full_sampler_matches_official(tiny_mar, io, mar_dir, name):
    log = json.loads((mar_dir / "mar_tiny_sampler_log.json").read_text())[name]
    kw = log["kwargs"]
    from visar.samplers.masked import MaskedSampler

    sampler = MaskedSampler()
    out = sampler(tiny_mar, Condition.of(log["labels"]), torch.Generator().manual_seed(log["torch_seed"]),
                  num_iter=kw["num_iter"], cfg_scale=kw["cfg"], cfg_schedule=kw["cfg_schedule"],
                  temperature=kw["temperature"], order_rng=log["numpy_seed"])
    stats = sampler.stats
    ref = io[f"{name}.tokens"]
    assert out.shape == ref.shape == (2, 16, 8, 8)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert stats["rows_per_step"] == [c["n_rows"] for c in log["diffloss_calls"]]
    assert stats["cfg_per_step"] == pytest.approx([c["cfg_iter"] for c in log["diffloss_calls"]], abs=1e-6)


def test_numpy_orders_match_official(io):
    from visar.generators.masked.mar import numpy_orders
    import numpy as np

    for name in ("sample_cfg_linear", "sample_nocfg_constant"):
        assert torch.equal(numpy_orders(2, 64, 0), io[f"{name}.orders"])
        assert torch.equal(numpy_orders(2, 64, np.random.RandomState(0)), io[f"{name}.orders"])
