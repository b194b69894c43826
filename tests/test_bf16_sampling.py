"""Every family samples in bfloat16 through its default sampler (issue 28).

Two ways a user gets bfloat16: ``visar eval sample --dtype bfloat16`` (float32 weights under
``torch.autocast``) and weights cast with ``pipe.to(dtype=torch.bfloat16)``. Tiny random-weight
presets, two images, few steps; the KV cache follows autocast's dtype.
"""
from __future__ import annotations

import pytest
import torch

from visar import zoo
from visar.nn.kv_cache import KVCache, cache_dtype
from visar.pipeline import Pipeline

#: generator preset -> (tokenizer preset, generator overrides, sampling options that keep the run short)
PRESETS = {
    "llamagen-gpt-tiny": ("llamagen-vq-tiny", {}, {}),
    "var-tiny": ("var-vqvae-tiny", {}, {}),
    "mar-tiny": ("kl-tiny", {"vae_stride": 4, "img_size": 32}, {"num_iter": 2, "num_steps": 3}),
    "mar-ar-tiny": ("kl-tiny", {}, {"num_steps": 3}),
    "flowar-tiny": ("kl-tiny", {}, {"num_steps": 2}),
    "xar-tiny": ("kl-tiny", {}, {"num_steps": 2}),
    "ctf-tiny": ("llamagen-vq-tiny", {}, {}),
}


def _pipeline(preset: str) -> tuple[Pipeline, dict]:
    tok_name, overrides, options = PRESETS[preset]
    if tok_name == "kl-tiny":
        pytest.importorskip("diffusers")
    torch.manual_seed(0)
    tok = zoo.create(tok_name).eval()
    gen = zoo.create(preset, **overrides).eval()
    if preset.startswith("ctf"):
        gen.fit_clusters(tok, seed=0, iters=3)
    return Pipeline(tok, gen), {"cfg_scale": 2.0, **options}  # guided: the cfg arithmetic runs too


def _check(images: torch.Tensor) -> None:
    assert images.shape[0] == 2 and images.shape[1] == 3
    assert torch.isfinite(images.float()).all() and images.abs().max() <= 1


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_autocast_bfloat16(preset):
    """What ``visar eval sample --dtype bfloat16`` does: float32 weights, bf16 autocast."""
    pipe, options = _pipeline(preset)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _check(pipe.generate([0, 1], seed=0, **options))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_bfloat16_weights(preset):
    pipe, options = _pipeline(preset)
    pipe.to(dtype=torch.bfloat16)
    _check(pipe.generate([0, 1], seed=0, **options))


def test_cache_follows_autocast_and_casts_writes():
    assert cache_dtype(torch.float32, "cpu") == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cache_dtype(torch.float32, "cpu") == torch.bfloat16
    cache = KVCache(2, 4, 1, 3, dtype=torch.float32)
    k = torch.randn(2, 1, 1, 3).bfloat16()
    cache.write(torch.tensor([[1], [2]]), k, 2 * k)  # per-row positions: an index put, dtypes must agree
    assert cache.k.dtype == torch.float32
    assert torch.equal(cache.k[0, 1], k[0, 0].float()) and torch.equal(cache.v[1, 2], 2 * k[1, 0].float())
    assert cache.k[0, 2].abs().sum() == 0


def test_eval_sample_bfloat16_and_corrected_rerun(tmp_path):
    """``sample_to_folder(dtype="bfloat16")`` of a next-token model; a run that fails before its first image
    leaves a folder the corrected command reuses, while a folder holding images stays protected."""
    from visar.eval import sampling
    from visar.eval.sidecar import load_sidecar

    pipe, _ = _pipeline("llamagen-gpt-tiny")
    rec = sampling.sample_to_folder(pipe, tmp_path / "bf16", 2, "balanced", batch_size=2, dtype="bfloat16",
                                    progress=False)
    assert rec.status == "complete" and rec.dtype == "bfloat16"

    class Broken:  # fails on its first generate call, as the bf16 crash did
        generator, tokenizer = pipe.generator, pipe.tokenizer

        def generate(self, *a, **k):
            raise RuntimeError("boom")

    out = tmp_path / "retry"
    with pytest.raises(RuntimeError, match="boom"):
        sampling.sample_to_folder(Broken(), out, 2, "balanced", batch_size=2, dtype="bfloat16", progress=False)
    assert load_sidecar(out).status == "incomplete" and not any((out / "images").iterdir())
    rec = sampling.sample_to_folder(pipe, out, 2, "balanced", batch_size=2, dtype="float32", progress=False)
    assert rec.status == "complete" and rec.dtype == "float32" and len(list((out / "images").iterdir())) == 2
    with pytest.raises(ValueError, match="other settings.*dtype"):
        sampling.sample_to_folder(pipe, out, 2, "balanced", batch_size=2, dtype="bfloat16", progress=False)
