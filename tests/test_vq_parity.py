"""LlamaGen VQ tokenizer vs the official outputs (../shared/fixtures/llamagen, README tolerances)."""
import pytest
import torch

from visar.convert.common import CheckpointError
from visar.convert.llamagen import load_tokenizer

ATOL = 1e-4
pytestmark = pytest.mark.fixtures  # the tiny VQ (5.6 MB) is not in the shipped subset


@pytest.fixture(scope="module")
def loaded():
    from conftest import fixture_dir
    from safetensors.torch import load_file

    d = fixture_dir("llamagen")
    return load_tokenizer(d / "vq_tiny_ds16.pt"), load_file(str(d / "vq_tiny_ds16_outputs.safetensors"))


def test_detected_config(loaded):
    tok, _ = loaded
    c = tok.config
    assert (c["codebook_size"], c["codebook_embed_dim"], c["ch"], c["z_channels"], c["num_res_blocks"]) == \
        (256, 8, 32, 32, 2)
    assert tuple(c["ch_mult"]) == (1, 1, 1, 1, 2) and tok.downsample == 16
    assert not tok.training


@torch.no_grad()
def test_encode_quantize_decode_parity(loaded):
    tok, ref = loaded
    x = ref["input_images"]
    h, zq, ids = tok.quantize_images(x)
    torch.testing.assert_close(h, ref["prequant_latents"], atol=ATOL, rtol=0)
    torch.testing.assert_close(zq, ref["quantized"], atol=ATOL, rtol=0)
    assert ids.shape == (2, 4, 4) and ids.dtype == torch.long
    assert torch.equal(ids.flatten(1), ref["indices"])  # raster order row * w + col
    assert torch.equal(tok.encode(x), ids)
    recon = tok.decode_latents(zq)
    torch.testing.assert_close(recon, ref["recon"], atol=ATOL, rtol=0)
    u8 = (127.5 * recon + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert (u8.int() - ref["recon_uint8"].int()).abs().max() <= 1


@torch.no_grad()
def test_decode_from_indices_parity(loaded):
    tok, ref = loaded
    torch.testing.assert_close(tok.decode(ref["indices"].view(2, 4, 4)), ref["recon_from_indices"], atol=ATOL, rtol=0)
    # flat raster-order ids are accepted too
    torch.testing.assert_close(tok.decode(ref["codes_in"]), ref["decoded_from_codes"], atol=ATOL, rtol=0)
    emb = tok.embed(ref["codes_in"].view(2, 4, 4))
    rows = ref["codebook_normalized"][ref["codes_in"].flatten()]
    torch.testing.assert_close(emb.permute(0, 2, 3, 1).reshape(-1, 8), rows)


def test_codebook_is_normalised_on_use(loaded):
    tok, ref = loaded
    raw = tok.quantize.embedding.weight
    assert (raw.norm(dim=-1) - 1).abs().max() > 0.1  # the fixture stores a far-from-unit codebook
    torch.testing.assert_close(tok.codebook(), ref["codebook_normalized"], atol=1e-6, rtol=0)


def test_gpt_file_is_refused_as_tokenizer(fixtures):
    with pytest.raises(CheckpointError, match="not a LlamaGen VQ tokenizer checkpoint"):
        load_tokenizer(fixtures("llamagen") / "gpt_tiny_c2i.pt")


def test_truncated_fixture_file(fixtures, tmp_path):
    data = (fixtures("llamagen") / "vq_tiny_ds16.pt").read_bytes()
    bad = tmp_path / "vq_truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_tokenizer(bad)
