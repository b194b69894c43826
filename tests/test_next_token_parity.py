"""Parity of the LlamaGen GPT (visar.generators.next_token.llamagen) with the official implementation.

Fixtures: ../shared/fixtures/llamagen (tiny official models with random weights and their outputs,
see its README). Tolerances from there: logits / hidden states atol = rtol = 1e-4, sampled tokens
exactly equal, uint8 images at most one level apart.
"""
from __future__ import annotations

import json

import pytest
import torch

from visar.convert.llamagen import load_generator
from visar.generators.base import Condition

TOL = dict(atol=1e-4, rtol=1e-4)


def _load(fixtures, name):
    from safetensors.torch import load_file

    d = fixtures("llamagen")
    overrides = dict(grid_size=4) if name == "c2i" else dict(grid_size=4, num_heads=2)
    model = load_generator(d / f"gpt_tiny_{name}.pt", **overrides)
    return model, load_file(str(d / f"gpt_tiny_{name}_outputs.safetensors")), json.loads(
        (d / "outputs_meta.json").read_text())[f"gpt_tiny_{name}"]


@pytest.fixture(scope="module")
def c2i():
    from conftest import fixture_dir

    return _load(fixture_dir, "c2i")


@pytest.fixture(scope="module")
def t2i():
    from conftest import fixture_dir

    return _load(fixture_dir, "t2i")


def _kv_logits(model, cond, tokens, cfg_scale):
    """Official KV path: one prefill, then one call per token; rows [cond; uncond]."""
    state, first = model.start(cond, guided=cfg_scale != 1)
    out = [first]
    for t in range(tokens.shape[1] - 1):
        out.append(model.step(state, tokens[:, t:t + 1], t)[:, 0])
    return torch.stack(out, 1)


@pytest.mark.fixtures
@torch.no_grad()
def test_c2i_teacher_forced_logits_and_hidden(c2i):
    model, ref, _ = c2i
    logits, hidden = model(ref["tf.tokens"], Condition(labels=ref["tf.labels"]), return_hidden=True)
    torch.testing.assert_close(logits, ref["tf.logits"], **TOL)
    assert set(hidden) == {"embed", "layer0", "layer1", "final_norm"}
    for name, h in hidden.items():
        torch.testing.assert_close(h, ref[f"tf.hidden.{name}"], **TOL)


@pytest.mark.fixtures
@torch.no_grad()
def test_c2i_cfg_mix(c2i):
    from visar.samplers.logits import cfg_mix

    model, ref, _ = c2i
    cond = Condition(labels=ref["cfg.cond_labels"])
    lc = model(ref["cfg.tokens"], cond)
    lu = model(ref["cfg.tokens"], model.null_condition(cond))
    torch.testing.assert_close(lc, ref["cfg.logits_cond"], **TOL)
    torch.testing.assert_close(lu, ref["cfg.logits_uncond"], **TOL)
    torch.testing.assert_close(cfg_mix(lc, lu, float(ref["cfg.scale"])), ref["cfg.logits_mixed"], **TOL)


@pytest.mark.fixtures
@torch.no_grad()
def test_c2i_kv_cache_logits(c2i):
    model, ref, _ = c2i
    cond = Condition(labels=ref["tf.labels"][:2])
    kv = _kv_logits(model, cond, ref["tf.tokens"][:2], cfg_scale=4.0)  # rows [cond(2); null(2)]
    torch.testing.assert_close(kv, ref["kv.logits"], **TOL)
    # KV-cache logits == teacher-forced logits of the same rows
    tf = torch.cat([model(ref["tf.tokens"][:2], cond), model(ref["tf.tokens"][:2], model.null_condition(cond))])
    torch.testing.assert_close(kv, tf, atol=1e-5, rtol=1e-5)


@pytest.mark.fixtures
def test_rope_tables(c2i, t2i):
    for model, ref, _ in (c2i, t2i):
        table = ref["rope.freqs_cis"]  # [C + L, D/4... pairs, (cos, sin)]
        torch.testing.assert_close(model.trunk.rope_cos, table[..., 0], atol=0, rtol=0)
        torch.testing.assert_close(model.trunk.rope_sin, table[..., 1], atol=0, rtol=0)


def _run_samples(model, cond, ref, meta):
    assert meta["samples"], "no recorded sampler runs"
    for run in meta["samples"]:
        g = torch.Generator().manual_seed(run["seed"])
        tokens = model.sample(cond, generator=g, cfg_scale=run["cfg_scale"], cfg_interval=run["cfg_interval"],
                              temperature=run["temperature"], top_k=run["top_k"], top_p=run["top_p"])
        expected = ref[f"sample.{run['name']}.tokens"].long()
        assert tokens.shape == (expected.shape[0], model.grid_size, model.grid_size)
        assert torch.equal(tokens.flatten(1), expected), run["name"]


@pytest.mark.fixtures
def test_c2i_samples_exact(c2i):
    model, ref, meta = c2i
    _run_samples(model, Condition(labels=ref["sample.labels"]), ref, meta)


@torch.no_grad()
def test_t2i_teacher_forced_cond_uncond_hidden(t2i):
    model, ref, _ = t2i
    cond = Condition(text=ref["caption"], text_mask=ref["emb_mask"])
    torch.testing.assert_close(model.cond_embed.uncond_embedding, ref["uncond_embedding"], atol=0, rtol=0)
    logits, hidden = model(ref["tokens"], cond, return_hidden=True)
    torch.testing.assert_close(logits, ref["tf.logits_cond"], **TOL)
    for name, h in hidden.items():
        torch.testing.assert_close(h, ref[f"tf.hidden.{name}"], **TOL)
    torch.testing.assert_close(model(ref["tokens"], model.null_condition(cond)), ref["tf.logits_uncond"], **TOL)


@torch.no_grad()
def test_t2i_kv_cache_logits(t2i):
    model, ref, _ = t2i
    cond = Condition(text=ref["caption"], text_mask=ref["emb_mask"])
    torch.testing.assert_close(_kv_logits(model, cond, ref["tokens"], cfg_scale=7.5), ref["kv.logits"], **TOL)


def test_t2i_samples_exact(t2i):
    model, ref, meta = t2i
    _run_samples(model, Condition(text=ref["caption"], text_mask=ref["emb_mask"]), ref, meta)


@torch.no_grad()
def test_t2i_short_caption_is_left_padded(t2i):
    """A caption shorter than 120 tokens is left padded (valid features at the end, mask 0 in front)."""
    model, ref, _ = t2i
    n = int(ref["emb_mask"][0].sum())  # 7 valid features at the end of row 0
    short = Condition(text=ref["caption"][:1, -n:], text_mask=None)
    full = Condition(text=ref["caption"][:1], text_mask=ref["emb_mask"][:1])
    torch.testing.assert_close(model(ref["tokens"][:1], short), model(ref["tokens"][:1], full), atol=0, rtol=0)


@pytest.mark.fixtures
def test_pipeline_images_with_tiny_vq(c2i, fixtures):
    pytest.importorskip("visar.tokenizers.vq", reason="the VQ tokenizer is not available yet")
    from visar.convert.llamagen import load_tokenizer
    from visar.pipeline import Pipeline, to_uint8

    model, ref, _ = c2i
    vq = load_tokenizer(fixtures("llamagen") / "vq_tiny_ds16.pt")
    pipe = Pipeline(vq, model)
    with torch.no_grad():
        images = vq.decode(ref["sample.seed0_cfg4_full.tokens"].long().view(-1, 4, 4))
    torch.testing.assert_close(images, ref["pipeline.images"], atol=1e-4, rtol=0)
    # end to end: same seed and settings as the official run give the same images
    out = pipe.generate(ref["sample.labels"], seed=0, cfg_scale=4.0)
    diff = (to_uint8(out).int() - ref["pipeline.images_uint8"].int()).abs()
    assert int(diff.max()) <= 1
