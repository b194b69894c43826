"""What ``pipe(...)`` returns (``output_type``), the ``guidance_scale`` alias, ``torch_dtype`` and
``pipe.to(dtype)`` (the diffusers-style surface of the Pipeline)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import visar
from visar import zoo
from visar.conditions import Condition
from visar.pipeline import OUTPUT_TYPES, Pipeline, PipelineOutput
from visar.samplers.base import get_sampler
from visar.utils.images import to_uint8


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    gen = zoo.create("llamagen-gpt-tiny")
    torch.nn.init.normal_(gen.head.weight, std=0.5)  # LlamaGen starts its logits head at zero: make them differ
    return Pipeline(zoo.create("llamagen-vq-tiny"), gen, sampling_defaults={"cfg_scale": 2.5})


def test_output_types(pipe):
    ref = pipe.generate([0, 3], seed=1)  # [2, 3, 64, 64] in [-1, 1]
    pil = pipe([0, 3], seed=1)
    assert isinstance(pil, PipelineOutput) and pil.output_type == "pil" and len(pil.images) == 2
    assert pil.images[0].size == (64, 64) and pil.images[0].mode == "RGB"
    assert np.array_equal(np.asarray(pil.images[1]), to_uint8(ref)[1].numpy())  # the same pixels as before

    pt = pipe([0, 3], seed=1, output_type="pt").images
    assert pt.dtype == torch.float32 and pt.shape == (2, 3, 64, 64) and 0 <= pt.min() and pt.max() <= 1
    torch.testing.assert_close(pt, (ref + 1) / 2, atol=0, rtol=0)

    arr = pipe([0, 3], seed=1, output_type="np").images
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float32 and arr.shape == (2, 64, 64, 3)
    assert arr.min() >= 0 and arr.max() <= 1 and np.array_equal(arr, pt.permute(0, 2, 3, 1).numpy())
    # the pil images are the np ones rounded to 8 bits
    assert np.abs(np.asarray(pil.images[0]) / 255.0 - arr[0]).max() <= 0.5 / 255 + 1e-6


def test_output_is_the_sequence_of_its_images(pipe, tmp_path):
    images = pipe([0, 1, 2], seed=0)  # code written when the pipeline returned a list keeps working
    assert len(images) == 3 and images[0] is images.images[0] and list(images) == images.images
    assert len(images[1:]) == 2 and images[-1] is images.images[2]
    images[0].save(tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 0
    pt = pipe([0, 1], seed=0, output_type="pt")
    assert len(pt) == 2 and pt[0].shape == (3, 64, 64) and [t.shape for t in pt] == [(3, 64, 64)] * 2
    assert "2 images" in repr(pt)


@pytest.mark.parametrize("bad", ["PIL", "latent", None, 3])
def test_unknown_output_type_fails_before_sampling(pipe, bad, monkeypatch):
    monkeypatch.setattr(Pipeline, "generate", lambda *a, **k: pytest.fail("sampled before checking output_type"))
    with pytest.raises(ValueError, match="output_type must be one of 'pil', 'pt', 'np'"):
        pipe([0], output_type=bad)
    assert OUTPUT_TYPES == ("pil", "pt", "np")


def test_guidance_scale_is_cfg_scale(pipe):
    ref = pipe.generate([4, 5], seed=2, cfg_scale=3.0)
    assert torch.equal(pipe.generate([4, 5], seed=2, guidance_scale=3.0), ref)
    assert torch.equal(pipe.generate([4, 5], seed=2, guidance_scale=3.0, cfg_scale=3.0), ref)  # same value: fine
    # the alias overrides the stored default (2.5) like cfg_scale does
    assert torch.equal(pipe.generate([4, 5], seed=2, guidance_scale=1.0), pipe.generate([4, 5], seed=2, cfg_scale=1.0))
    assert torch.equal(pipe([4, 5], seed=2, guidance_scale=3.0, output_type="pt").images, (ref + 1) / 2)
    with pytest.raises(TypeError, match="guidance_scale=2.0 and cfg_scale=3.0 name the same option"):
        pipe.generate([0], guidance_scale=2.0, cfg_scale=3.0)
    with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
        pipe.generate([0], guidance_scale=-1.0)
    # everywhere options are validated: sampler construction and the sidecar's record
    assert get_sampler("autoregressive", guidance_scale=2.0).options == {"cfg_scale": 2.0}
    with pytest.raises(TypeError, match="name the same option"):
        get_sampler("autoregressive", guidance_scale=2.0, cfg_scale=1.0)
    from visar.eval.sampling import effective_options

    assert effective_options(pipe, {"guidance_scale": 4.0})["cfg_scale"] == 4.0
    assert "guidance_scale" not in effective_options(pipe, {"guidance_scale": 4.0})


def test_to_dtype_positional_and_keyword():
    torch.manual_seed(0)
    p = Pipeline(zoo.create("llamagen-vq-tiny"), zoo.create("llamagen-gpt-tiny"))
    assert p.dtype == torch.float32
    assert p.to(torch.bfloat16) is p and p.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in p.tokenizer.parameters())
    p.to("cpu", torch.float32)
    assert p.dtype == torch.float32 and p.device.type == "cpu"
    p.to(dtype="bfloat16")
    assert p.dtype == torch.bfloat16
    p.to(device=torch.device("cpu"), dtype=torch.float32)
    assert p.dtype == torch.float32
    with pytest.raises(TypeError, match="two dtypes"):
        p.to(torch.float16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="takes a device"):
        p.to(3)
    with pytest.raises(TypeError, match="floating torch dtype"):
        p.to(torch.int64)
    with pytest.raises(ValueError, match="is not a device"):
        p.to("gpu")


def test_torch_dtype_loads_bfloat16_and_logits_stay_float32(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    p = Pipeline.from_pretrained(tmp_path / "p", torch_dtype=torch.bfloat16)
    assert p.dtype == torch.bfloat16 and next(p.tokenizer.parameters()).dtype == torch.bfloat16
    assert visar.load(str(tmp_path / "p"), torch_dtype="bfloat16").dtype == torch.bfloat16
    # guidance, temperature, top-k/p and the draw run on float32 logits
    _, logits = p.generator.start(Condition.of([0, 1]), guided=True)
    assert logits.dtype == torch.float32
    torch.manual_seed(0)
    var = zoo.create("var-tiny").to(torch.bfloat16)
    state = var.start(Condition.of([0, 1]), guided=True)
    assert var.step(state, 0).dtype == torch.float32
    out = p([0, 1], seed=0, output_type="pt").images
    assert out.dtype == torch.float32 and out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()
