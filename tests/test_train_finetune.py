"""Fine-tuning through the trainer: ``model.init_from`` (strict weight load) and ``model.trainable``
(decoder-only VQ fine-tuning keeps the tokens bit-exact while the decoder changes)."""
import pytest
import torch

from visar.convert.common import CheckpointError
from visar.data.shapes import ShapesDataset
from visar.tokenizers.base import Tokenizer
from visar.train.config import ConfigError, load_config
from visar.train.trainer import train
from visar.utils.io import load_safetensors

VQ_KWARGS = {"codebook_size": 32, "codebook_embed_dim": 4, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
             "z_channels": 16, "dead_code_steps": 2}


def _cfg(out, **over):
    data = {
        "task": "tokenizer",
        "model": {"cls": "visar.tokenizers.vq:VQTokenizer", "kwargs": dict(VQ_KWARGS)},
        "data": {"kind": "shapes", "size": 16, "length": 64},
        "optim": {"lr": 1e-2, "warmup_steps": 1},
        "train": {"steps": 4, "batch_size": 8, "save_every": 100, "log_every": 100, "output_dir": str(out),
                  "progress": False, "ema_decay": 0.9},
    }
    return load_config(None, [f"{k}={v}" for k, v in over.items()], data=data)


@pytest.fixture(scope="module")
def base_export(tmp_path_factory):
    return train(_cfg(tmp_path_factory.mktemp("base") / "run"))


def test_decoder_only_finetune_keeps_tokens(base_export, tmp_path):
    init = base_export / "tokenizer.safetensors"
    # dead_code_steps=2 with 6 steps: restarts would fire if the frozen codebook were not protected
    export = train(_cfg(tmp_path / "ft", **{"model.init_from": str(init), "train.steps": 6,
                                            "model.trainable": "[decoder, post_quant_conv]"}))
    before, after = load_safetensors(init), load_safetensors(export / "tokenizer.safetensors")
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv.", "quantize.embedding"))]
    tuned = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and tuned
    for k in frozen:  # EMA copies frozen parameters, it does not average them
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in tuned)

    images = ShapesDataset(size=16, length=16, split="test").render(range(16))[0]
    a = Tokenizer.from_pretrained(base_export, "tokenizer").eval()
    b = Tokenizer.from_pretrained(export, "tokenizer").eval()
    with torch.no_grad():
        ids = a.encode(images)
        assert torch.equal(ids, b.encode(images))
        assert not torch.equal(a.decode(ids), b.decode(ids))


def test_init_from_loads_the_weights(base_export, tmp_path):
    init = base_export / "tokenizer.safetensors"
    # lr tiny and one step: the export is the init up to one tiny update (EMA of 0.9 weights it 0.1)
    export = train(_cfg(tmp_path / "init", **{"model.init_from": str(init), "train.steps": 1,
                                              "optim.lr": 1e-12, "train.ema_decay": 0.0,
                                              "model.kwargs.dead_code_steps": 1000}))
    before, after = load_safetensors(init), load_safetensors(export / "tokenizer.safetensors")
    for k in before:
        if before[k].is_floating_point():
            torch.testing.assert_close(after[k], before[k], atol=1e-8, rtol=0), k


def test_bad_finetune_settings_say_what_to_do(base_export, tmp_path):
    with pytest.raises(ConfigError, match="model.init_from.*does not exist"):
        _cfg(tmp_path / "x", **{"model.init_from": str(tmp_path / "nope.safetensors")})
    with pytest.raises(ConfigError, match="must name a .safetensors file"):
        _cfg(tmp_path / "x", **{"model.init_from": str(base_export / "tokenizer.json")})
    with pytest.raises(ConfigError, match="model.trainable"):
        _cfg(tmp_path / "x", **{"model.trainable": "[1]"})
    with pytest.raises(ValueError, match="names no parameter.*decoder"):
        train(_cfg(tmp_path / "y", **{"model.trainable": "[decodr]"}))
    # weights of another size: the strict load names the mismatch
    with pytest.raises(CheckpointError, match="shape mismatches"):
        train(_cfg(tmp_path / "z", **{"model.init_from": str(base_export / "tokenizer.safetensors"),
                                      "model.kwargs.codebook_size": 48}))


def test_multiscale_quantizer_never_restarts_a_frozen_codebook():
    from visar.tokenizers.msvq_quantizer import MultiScaleResidualQuantizer

    q = MultiScaleResidualQuantizer(64, 4, [1, 2, 4], 2, 0.5, 0.25, restart_unused=1).train()
    f = torch.randn(2, 4, 4, 4)
    q(f)
    q(f)  # with 64 codes and 42 token slots some codes are unused: restarts happen
    trained = q.embedding.weight.detach().clone()
    q(f)
    assert not torch.equal(trained, q.embedding.weight)
    q.embedding.weight.requires_grad_(False)
    frozen = q.embedding.weight.detach().clone()
    for _ in range(3):
        q(f)
    assert torch.equal(frozen, q.embedding.weight)
