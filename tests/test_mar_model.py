"""MAR generator: presets vs manifests, training, save/load, pipeline, loader errors, bad input."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from visar.convert.common import CheckpointError
from visar.generators.base import Condition
from visar.generators.masked.mar import MaskedGenerator
from visar.samplers.masked import MaskedSampler

TINY = dict(img_size=32, vae_stride=4, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, buffer_size=4, diffloss_d=1,
            diffloss_w=32, num_sampling_steps=10, class_num=10, diffusion_batch_mul=2)


def tiny(**kw) -> MaskedGenerator:
    torch.manual_seed(0)
    return MaskedGenerator(**{**TINY, **kw})


@pytest.mark.parametrize("preset,manifest", [("mar-b", "base"), ("mar-l", "large"), ("mar-h", "huge")])
def test_presets_match_manifests(fixtures, preset, manifest):
    from visar import zoo

    man = json.loads((fixtures("mar") / f"manifest_mar_{manifest}.json").read_text())
    with torch.device("meta"):
        model = zoo.create(preset)
    ours = {("diffloss." + k[len("head."):] if k.startswith("head.") else k): tuple(v.shape)
            for k, v in model.state_dict().items()}
    assert ours == {t["name"]: tuple(t["shape"]) for t in man["tensors"]}
    assert sum(p.numel() for p in model.parameters()) == man["num_params"]
    ev = zoo.get_preset(preset).eval
    assert ev["num_iter"] == 256 and ev["num_steps"] == 100 and ev["cfg_schedule"] == "linear"


def test_sample_shapes_determinism_and_guidance():
    m = tiny().eval()
    cond = Condition.of([1, 2, 3])
    a = m.sample(cond, generator=torch.Generator().manual_seed(0), num_iter=4, cfg_scale=2.0)
    b = m.sample(cond, generator=torch.Generator().manual_seed(0), num_iter=4, cfg_scale=2.0)
    c = m.sample(cond, generator=torch.Generator().manual_seed(0), num_iter=4, cfg_scale=1.0, cfg_schedule="constant")
    assert a.shape == (3, 16, 8, 8) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    sampler = MaskedSampler()
    sampler(m, cond, torch.Generator().manual_seed(0), num_iter=64)
    stats = sampler.stats
    assert stats["rows_per_step"] == [3] * 64  # one token per image per step


def test_explicit_orders_generate_last_entries_first():
    m = tiny().eval()
    order = torch.arange(64)[None]
    sampler = MaskedSampler()
    sampler(m, Condition.of([0]), torch.Generator().manual_seed(0), num_iter=2, orders=order)
    stats = sampler.stats
    # step 1 keeps floor(64 cos(pi/4)) = 45 masked: 19 predicted, then the remaining 45
    assert stats["rows_per_step"] == [19, 45]


def test_patchify_roundtrip_with_patches():
    m = tiny(patch_size=2)
    x = torch.randn(2, 16, 8, 8)
    t = m.patchify(x)
    assert t.shape == (2, 16, 64)
    torch.testing.assert_close(m.unpatchify(t), x, rtol=0, atol=0)
    # (c, i, j) order inside a patch
    torch.testing.assert_close(t[0, 0].view(16, 2, 2), x[0, :, :2, :2], rtol=0, atol=0)


def test_training_reduces_loss():
    m = tiny(label_drop_prob=0.0).train()
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(4, 16, 8, 8, generator=g) * 0.5
    cond = Condition.of([0, 1, 2, 3])
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)

    def eval_loss():
        return sum(m.loss(lat, cond, generator=torch.Generator().manual_seed(s)).item() for s in range(3)) / 3

    before = eval_loss()
    for i in range(30):
        loss = m.loss(lat, cond, generator=torch.Generator().manual_seed(100 + i))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.8 * before


def test_save_load_roundtrip(tmp_path):
    m = tiny().eval()
    m.save_pretrained(tmp_path, "generator")
    again = MaskedGenerator.from_pretrained(tmp_path, "generator").eval()
    cond = Condition.of([4])
    a = m.sample(cond, generator=torch.Generator().manual_seed(1), num_iter=3, cfg_scale=3.0)
    b = again.sample(cond, generator=torch.Generator().manual_seed(1), num_iter=3, cfg_scale=3.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pipeline_with_kl_tokenizer(tmp_path):
    from visar import zoo
    from visar.pipeline import Pipeline

    tok = zoo.create("kl-tiny")
    pipe = Pipeline(tok, tiny())
    images = pipe.generate([1, 2], seed=0, num_iter=2, cfg_scale=2.0, num_steps=5)
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1
    pipe.save_pretrained(tmp_path / "pipe")
    again = Pipeline.from_pretrained(tmp_path / "pipe")
    torch.testing.assert_close(again.generate([1, 2], seed=0, num_iter=2, cfg_scale=2.0, num_steps=5), images,
                               rtol=0, atol=0)


def test_bad_sampling_arguments():
    m = tiny().eval()
    cond = Condition.of([0])
    with pytest.raises(ValueError, match="num_iter"):
        m.sample(cond, num_iter=65)
    with pytest.raises(ValueError, match="num_iter"):
        m.sample(cond, num_iter=0)
    with pytest.raises(ValueError, match="num_sampling_steps"):
        m.sample(cond, num_iter=2, num_steps=0)
    with pytest.raises(ValueError, match="temperature"):
        m.sample(cond, num_iter=2, temperature=0.0)
    with pytest.raises(ValueError, match="cfg_schedule"):
        m.sample(cond, num_iter=2, cfg_schedule="cosine")
    with pytest.raises(ValueError, match="class ids"):
        m.sample(Condition.of([10]), num_iter=2)
    with pytest.raises(ValueError, match="orders"):
        m.sample(cond, num_iter=2, orders=torch.arange(10)[None])


def test_bad_tokens():
    m = tiny()
    cond = Condition.of([0, 1])
    with pytest.raises(ValueError, match="latents must have shape"):
        m.loss(torch.randn(2, 8, 8, 8), cond)  # wrong channel count
    with pytest.raises(ValueError, match="latents must have shape"):
        m.loss(torch.randn(2, 16, 16, 16), cond)  # wrong size
    with pytest.raises(ValueError, match="same number"):
        mask = torch.zeros(2, 64)
        mask[0, :3] = 1
        m(torch.randn(2, 64, 16), mask, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class ids"):
        m(torch.randn(2, 64, 16), torch.zeros(2, 64), torch.tensor([0, 11]))


def test_check_tokenizer_pairs_kinds():
    from visar import zoo
    from visar.generators.next_token.llamagen import NextTokenGenerator

    m = tiny()
    kl = zoo.create("kl-tiny")
    m.check_tokenizer(kl)

    class Discrete:
        kind, downsample, latent_channels = "discrete", 4, 16

    with pytest.raises(ValueError, match="continuous"):
        m.check_tokenizer(Discrete())
    with pytest.raises(ValueError, match="stride"):
        tiny(img_size=64, vae_stride=8).check_tokenizer(kl)
    gpt = zoo.create("llamagen-gpt-tiny")
    assert isinstance(gpt, NextTokenGenerator)
    with pytest.raises(ValueError, match="discrete|kind|continuous"):
        gpt.check_tokenizer(kl)


def test_loader_errors(tmp_path, fixtures):
    from visar.convert.mar import load_generator

    d = fixtures("mar")
    ck = torch.load(d / "mar_tiny_checkpoint-last.pth", weights_only=True)
    # optimizer state only
    torch.save({"optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "epoch": 3}, tmp_path / "opt.pth")
    with pytest.raises(CheckpointError, match="optimizer"):
        load_generator(tmp_path / "opt.pth")
    # a training checkpoint with argparse args: refused with extraction instructions
    torch.save({"model": ck["model"], "args": argparse.Namespace(lr=1.0)}, tmp_path / "train.pth")
    with pytest.raises(CheckpointError, match="model_ema"):
        load_generator(tmp_path / "train.pth")
    # model only: falls back to it
    torch.save({"model": ck["model"], "epoch": 3}, tmp_path / "model_only.pth")
    m = load_generator(tmp_path / "model_only.pth", encoder_num_heads=2, decoder_num_heads=2)
    assert m.seq_len == 64
    # non-released width without heads
    with pytest.raises(CheckpointError, match="encoder_num_heads"):
        load_generator(d / "mar_tiny_checkpoint-last.pth")
    # foreign checkpoint
    torch.save({"model": {"tok_embeddings.weight": torch.zeros(3, 3)}}, tmp_path / "gpt.pth")
    with pytest.raises(CheckpointError, match="not a MAR"):
        load_generator(tmp_path / "gpt.pth")
    # a missing tensor is reported by strict loading
    bad = {k: v for k, v in ck["model_ema"].items() if k != "mask_token"}
    torch.save({"model_ema": bad}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="mask_token"):
        load_generator(tmp_path / "bad.pth", encoder_num_heads=2, decoder_num_heads=2)


def test_mask_ratio_is_the_official_truncated_normal():
    from scipy import stats

    from visar.generators.masked.mar import truncated_normal_ratio

    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([truncated_normal_ratio(0.7, g) for _ in range(4000)], dtype=torch.float64)
    ref = stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
    assert draws.min() >= 0.7 and draws.max() <= 1.0
    assert abs(float(draws.mean()) - ref.mean()) < 4 * ref.std() / 4000 ** 0.5
    assert stats.kstest(draws.numpy(), ref.cdf).pvalue > 1e-3


def test_old_option_names_fail_naming_the_new_ones():
    m = tiny().eval()
    cond = Condition.of([0])
    with pytest.raises(TypeError, match="'cfg_scale'"):
        m.sample(cond, num_iter=2, cfg=2.0)
    with pytest.raises(TypeError, match="'num_steps'"):
        m.sample(cond, num_iter=2, num_sampling_steps=5)
    with pytest.raises(TypeError, match="'num_steps'"):
        MaskedSampler(num_sampling_steps=5)


def test_sampler_counts_passes_and_matches_the_default_sampler():
    m = tiny().eval()
    cond = Condition.of([1, 2])
    sampler = MaskedSampler(num_iter=3)
    a = sampler(m, cond, torch.Generator().manual_seed(2), cfg_scale=2.0)
    assert sampler.stats["model_passes"] == 3 and sampler.stats["head_calls"] == 3
    assert sum(sampler.stats["rows_per_step"]) == 2 * 2 * 64  # every token once, both guidance halves
    b = m.sample(cond, torch.Generator().manual_seed(2), num_iter=3, cfg_scale=2.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(TypeError, match="MaskedModel"):
        sampler(torch.nn.Linear(2, 2), cond)
