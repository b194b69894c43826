"""KL tokenizer (MAR's kl16 on diffusers.AutoencoderKL): parity with the official VAE, loading, errors."""
from __future__ import annotations

import json

import pytest
import torch

from visar.convert.common import CheckpointError

SCALE = 0.2325


@pytest.fixture(scope="module")
def tiny_vae():
    from conftest import fixture_dir
    from visar.convert.mar import load_tokenizer

    d = fixture_dir("mar")
    return load_tokenizer(d / "vae_tiny.ckpt", sample_size=64), d


@pytest.fixture(scope="module")
def vae_io(tiny_vae):
    from safetensors.torch import load_file

    return load_file(tiny_vae[1] / "vae_tiny_io.safetensors")


@pytest.mark.fixtures
def test_posterior_matches_official(tiny_vae, vae_io):
    tok, _ = tiny_vae
    with torch.no_grad():
        mean, std = tok.posterior(vae_io["image"])
        z = tok.encode(vae_io["image"])
    torch.testing.assert_close(mean, vae_io["posterior_mean"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(std, vae_io["posterior_std"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z, vae_io["posterior_mean"] * SCALE, atol=1e-4, rtol=1e-4)
    assert tok.downsample == 4 and tok.latent_channels == 16 and tok.scale_factor == SCALE


@pytest.mark.fixtures
def test_decode_matches_official(tiny_vae, vae_io):
    tok, _ = tiny_vae
    with torch.no_grad():
        a = tok.decode(vae_io["posterior_mean"] * SCALE)
        b = tok.decode(vae_io["latent_in"] * SCALE)
    torch.testing.assert_close(a, vae_io["decoded_from_mean"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b, vae_io["decoded_from_latent_in"], atol=1e-4, rtol=1e-4)


@pytest.mark.fixtures
def test_sampled_encoding_is_seeded(tiny_vae, vae_io):
    tok, _ = tiny_vae
    x = vae_io["image"][:1]
    with torch.no_grad():
        a = tok.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        b = tok.encode(x, sample=True, generator=torch.Generator().manual_seed(3))
        mean, std = tok.posterior(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    noise = (a / SCALE - mean) / std
    assert 0.5 < noise.std() < 1.5 and not torch.allclose(a, mean * SCALE)


@pytest.mark.fixtures
def test_strict_loading_catches_missing_encoder_attention(tiny_vae, tmp_path):
    """Drop what diffusers' single-file converter drops: the encoder's down-block attention."""
    from visar.convert.mar import load_tokenizer

    state = torch.load(tiny_vae[1] / "vae_tiny.ckpt", weights_only=True)["model"]
    bad = {k: v for k, v in state.items() if not k.startswith("encoder.down.2.attn.")}
    assert len(bad) == len(state) - 20
    torch.save({"model": bad}, tmp_path / "no_attn.ckpt")
    with pytest.raises(CheckpointError, match="missing 20 keys"):
        load_tokenizer(tmp_path / "no_attn.ckpt", sample_size=64)


@pytest.mark.fixtures
def test_diffusers_single_file_converter_pitfall_is_caught(tiny_vae):
    """diffusers' own LDM converter leaves the encoder's down-block attention unmapped: strict loading
    reports it, while visar's mapping covers every key."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from visar.convert.common import load_state_strict
    from visar.convert.ldm import ldm_to_visar
    from visar.tokenizers.kl import KL_TINY_CONFIG, KLTokenizer

    state = torch.load(tiny_vae[1] / "vae_tiny.ckpt", weights_only=True)["model"]
    tok = KLTokenizer(vae_config={**KL_TINY_CONFIG, "sample_size": 64})
    converted = convert_ldm_vae_checkpoint(state, dict(tok.vae.config))
    with pytest.raises(CheckpointError, match="missing 20 keys"):
        load_state_strict(tok.vae, converted, source="diffusers-converted")
    load_state_strict(tok.vae, ldm_to_visar(state), source="visar-converted")


@pytest.mark.fixtures
def test_renamed_attention_is_unexpected(tiny_vae, tmp_path):
    """A file whose attention keys cannot be mapped fails strict loading instead of staying random."""
    from visar.convert.mar import load_tokenizer

    state = torch.load(tiny_vae[1] / "vae_tiny.ckpt", weights_only=True)["model"]
    bad = {k.replace("encoder.down.2.attn.0.q.", "encoder.down.2.attn.0.query."): v for k, v in state.items()}
    torch.save({"model": bad}, tmp_path / "renamed.ckpt")
    with pytest.raises(CheckpointError, match="missing|unexpected"):
        load_tokenizer(tmp_path / "renamed.ckpt", sample_size=64)


@pytest.mark.fixtures
def test_diffusers_folder_roundtrip(tiny_vae, vae_io, tmp_path):
    from visar.convert.mar import load_tokenizer

    tok, _ = tiny_vae
    tok.vae.save_pretrained(tmp_path / "vae")
    again = load_tokenizer(tmp_path / "vae")
    with torch.no_grad():
        torch.testing.assert_close(again.encode(vae_io["image"]), tok.encode(vae_io["image"]), rtol=0, atol=0)
    assert again.scale_factor == SCALE
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_tokenizer(tmp_path / "empty")


@pytest.mark.fixtures
def test_visar_save_load(tiny_vae, vae_io, tmp_path):
    from visar.tokenizers.kl import KLTokenizer

    tok, _ = tiny_vae
    tok.save_pretrained(tmp_path, "tokenizer")
    again = KLTokenizer.from_pretrained(tmp_path, "tokenizer").eval()
    cfg = json.loads((tmp_path / "tokenizer.json").read_text())
    assert cfg["config"]["vae_config"]["latent_channels"] == 16
    with torch.no_grad():
        torch.testing.assert_close(again.decode(vae_io["latent_in"]), tok.decode(vae_io["latent_in"]), rtol=0, atol=0)


@pytest.mark.fixtures
def test_bad_inputs(tiny_vae):
    tok, _ = tiny_vae
    with pytest.raises(ValueError, match="latents must have shape"):
        tok.decode(torch.zeros(1, 8, 4, 4))
    with pytest.raises(ValueError, match="latents must have shape"):
        tok.decode(torch.zeros(16, 4, 4))
    with pytest.raises(TypeError):
        tok.decode(torch.zeros(1, 16, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        tok.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="scale_factor"):
        from visar.tokenizers.kl import KL_TINY_CONFIG, KLTokenizer
        KLTokenizer(vae_config=KL_TINY_CONFIG, scale_factor=0.0)


def test_foreign_checkpoint_is_refused(tmp_path):
    from visar.convert.mar import load_tokenizer

    torch.save({"model": {"tok_embeddings.weight": torch.zeros(4, 4)}}, tmp_path / "gpt.pt")
    with pytest.raises(CheckpointError, match="not a KL autoencoder"):
        load_tokenizer(tmp_path / "gpt.pt")


def test_kl16_preset_matches_manifest(fixtures):
    """The full-size preset has exactly the manifest's tensors (built on the meta device)."""
    from visar import zoo

    man = json.loads((fixtures("mar") / "manifest_kl16_vae.json").read_text())
    with torch.device("meta"):
        tok = zoo.create("mar-kl16")
    shapes = {k: tuple(v.shape) for k, v in tok.vae.state_dict().items()}
    # the manifest gives the official shapes: attention projections are 1x1 convs there, Linear here
    want = {t["diffusers_name"]: tuple(t["shape"][:2] if "attentions" in t["diffusers_name"] and
                                       t["diffusers_name"].endswith("weight") and len(t["shape"]) == 4
                                       else t["shape"]) for t in man["tensors"]}
    assert shapes == want
    assert sum(v.numel() for v in tok.parameters()) == man["num_params"]
    assert tok.scale_factor == man["latent_scale"] and tok.downsample == 16
