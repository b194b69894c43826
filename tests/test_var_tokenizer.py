"""VAR multi-scale VQVAE tokenizer: shapes, bad inputs, training loss, save/load, official layout."""
from __future__ import annotations

import pytest
import torch

from visar import zoo
from visar.convert.common import CheckpointError
from visar.convert.var import generator_to_official, load_tokenizer, tokenizer_to_official

_TOK: list = []


def _tiny():
    """The 64 px, 4-scale tiny tokenizer (ch 32, V 64, Cvae 16) with fixed random weights."""
    if not _TOK:
        torch.manual_seed(0)
        _TOK.append(zoo.create("var-vqvae-tiny").eval())
    return _TOK[0]


def _images(n=2, size=64, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_var_tokenizer_shapes_and_roundtrip_consistency():
    tok = _tiny()
    assert tok.kind == "multiscale" and tok.downsample == 16 and tok.image_size == 64
    ids = tok.encode(_images())
    assert [t.shape for t in ids] == [(2, s, s) for s in (1, 2, 3, 4)]
    img = tok.decode(ids)
    assert img.shape == (2, 3, 64, 64) and img.min() >= -1 and img.max() <= 1
    assert tok.teacher_forcing_inputs(ids).shape == (2, 4 + 9 + 16, 16)
    # re-encoding the latent of the reconstruction path is deterministic
    assert all(torch.equal(a, b) for a, b in zip(ids, tok.encode(_images())))


def test_var_tokenizer_rejects_incompatible_images():
    tok = _tiny()
    with pytest.raises(ValueError, match="64x64 pixels"):
        tok.encode(_images(size=48))  # divisible by 16 but the schedule ends at 4 tokens
    with pytest.raises(ValueError, match="divisible"):
        tok.encode(_images(size=40))
    with pytest.raises(ValueError, match="RGB"):
        tok.encode(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="list of 4"):
        tok.decode([torch.zeros(1, 1, 1, dtype=torch.long)])


def test_var_tokenizer_training_loss_backward():
    tok = _tiny()
    tok.train()
    try:
        out = tok.training_loss(_images(2))
        out["loss"].backward()
    finally:
        tok.eval()
    assert set(out) == {"loss", "recon", "vq", "usage"} and 0 < out["usage"] <= 1
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0
    assert tok.quantize.embedding.weight.grad.abs().sum() > 0
    assert tok.decoder.conv_out.weight.grad.abs().sum() > 0
    tok.zero_grad(set_to_none=True)


def test_var_tokenizer_official_layout_roundtrip(tmp_path):
    tok = _tiny()
    state = tokenizer_to_official(tok)
    state["quantize.ema_vocab_hit_SV"] = torch.zeros(10, 64)  # training statistic, any row count: ignored
    trainer = {"trainer": {"vae_local": {k: v.half() for k, v in state.items()}}, "epoch": 1}
    torch.save(trainer, tmp_path / "vae.pth")
    back = load_tokenizer(tmp_path / "vae.pth", patch_nums=[1, 2, 3, 4])
    assert back.config["ch"] == 32 and back.config["ch_mult"] == [1, 1, 2, 2, 4]
    x = _images(1)
    with torch.no_grad():
        torch.testing.assert_close(back.encode_latent(x), tok.encode_latent(x), atol=0.05, rtol=0.05)
    torch.save(state, tmp_path / "vae32.pth")
    exact = load_tokenizer(tmp_path / "vae32.pth", scales=[1, 2, 3, 4])
    assert all(torch.equal(a, b) for a, b in zip(exact.encode(x), tok.encode(x)))


def test_var_tokenizer_converter_errors(tmp_path):
    tok = _tiny()
    torch.save(tokenizer_to_official(tok), tmp_path / "vae.pth")
    data = (tmp_path / "vae.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_tokenizer(tmp_path / "cut.pth", scales=[1, 2, 3, 4])
    from visar.convert.var import load_generator

    with pytest.raises(CheckpointError, match="not a VAR checkpoint"):
        load_generator(tmp_path / "vae.pth")
    torch.manual_seed(0)
    gen = zoo.create("var-tiny")
    torch.save(generator_to_official(gen), tmp_path / "var.pth")
    with pytest.raises(CheckpointError, match="not a VAR VQVAE"):
        load_tokenizer(tmp_path / "var.pth", scales=[1, 2, 3, 4])


def test_var_pipeline_save_load(tmp_path):
    from visar.pipeline import Pipeline

    torch.manual_seed(0)
    tok, gen = _tiny(), zoo.create("var-tiny")
    pipe = Pipeline(tok, gen)
    a = pipe.generate([1, 2], seed=3, cfg_scale=2.5, top_k=16)
    pipe.save_pretrained(tmp_path)
    back = Pipeline.from_pretrained(tmp_path)
    b = back.generate([1, 2], seed=3, cfg_scale=2.5, top_k=16)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert len(pipe([0], seed=0)) == 1
    bad = zoo.create("var-tiny", scales=[1, 2, 4])
    with pytest.raises(ValueError, match="schedule"):
        Pipeline(tok, bad)


def test_var_tokenizer_loader_reads_visar_safetensors(tmp_path):
    tok = _tiny()
    tok.save_pretrained(tmp_path, "tokenizer")
    back = load_tokenizer(tmp_path / "tokenizer.safetensors", scales=[1, 2, 3, 4])
    x = _images(1, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(back.encode(x), tok.encode(x)))
