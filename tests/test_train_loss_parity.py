"""Training-loss parity with the official training code, through ``../shared/fixtures/<family>/train_loss.*``
(each README's "Training loss" section): the family's ``loss`` on the tiny official checkpoint, fed the
recorded batch and every recorded random draw as keyword arguments (no monkeypatching), gives the recorded
loss and gradients.

Tolerances: the loss within ``rtol=1e-6`` (measured on the CPU these fixtures were checked on: **bit for
bit** for LlamaGen, VAR, MAR, FlowAR and xAR); gradient norms per recorded state-dict name within
``rtol=1e-5`` (measured: bitwise for FlowAR, <= 1e-6 relative elsewhere; the official step itself moves by up
to 4e-6 between float32 and float64, so another BLAS may reorder sums by that much); the few full gradient
tensors the fixtures keep within 1e-5 of their largest entry.

Dropout masks are not loss draws (``nn.Dropout`` draws them from torch's global RNG inside the network): the
LlamaGen dropout variant replays them by swapping each ``nn.Dropout`` module for one applying the recorded
mask. MAR's ``drop.*`` variant cannot be replayed: visar draws the attention-probability dropout inside
``scaled_dot_product_attention``.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from visar.conditions import Condition
from visar.nn.embeddings import quantize_timestep

LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-5


def _fixture(fixtures, family):
    from safetensors.torch import load_file

    d = fixtures(family)
    return d, load_file(str(d / "train_loss.safetensors")), json.loads((d / "train_loss.json").read_text())


def _sub(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _check_loss(loss: torch.Tensor, ref: torch.Tensor) -> None:
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert math.isclose(loss.item(), ref.item(), rel_tol=LOSS_RTOL, abs_tol=0.0), (loss.item(), ref.item())


def _check_grads(model: nn.Module, ref: dict, names: dict[str, str]) -> None:
    """``ref``: the case's tensors (``grad_norm.<official name>``, ``grad_norm_total``, ``grad.<name>``);
    ``names``: official name -> visar name of every recorded gradient."""
    params = dict(model.named_parameters())
    for off, ours in names.items():
        g = params[ours].grad
        assert g is not None, f"{ours} ({off}) got no gradient"
        if f"grad_norm.{off}" in ref:
            want = ref[f"grad_norm.{off}"].item()
            assert math.isclose(g.norm().item(), want, rel_tol=GRAD_RTOL, abs_tol=1e-12), (off, g.norm().item(), want)
        if f"grad.{off}" in ref:
            want = ref[f"grad.{off}"].reshape(g.shape)
            torch.testing.assert_close(g, want, rtol=0, atol=1e-5 * float(want.abs().max()), msg=off)
    total = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None))
    assert math.isclose(total.item(), ref["grad_norm_total"].item(), rel_tol=GRAD_RTOL)


def _recorded_names(ref: dict, meta_names: list[str]) -> list[str]:
    extra = [k[len("grad."):] for k in ref if k.startswith("grad.")]
    return list(dict.fromkeys([*meta_names, *extra]))


# ---------------------------------------------------------------------------------------------- LlamaGen
class _ReplayDropout(nn.Module):
    """Applies a recorded 0/1 keep mask the way ATen's CPU dropout does: ``x * (keep / (1 - p))``."""

    def __init__(self, keep: torch.Tensor, p: float):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep.to(x.dtype).div(1 - self.p)


_LLAMAGEN_DROPOUT = [(r"^tok_dropout$", "trunk.drop"),
                     (r"^layers\.(\d+)\.attention\.resid_dropout$", r"trunk.blocks.\1.attn.proj_drop"),
                     (r"^layers\.(\d+)\.feed_forward\.ffn_dropout$", r"trunk.blocks.\1.mlp.drop")]


@pytest.mark.fixtures
@pytest.mark.parametrize("variant", ["nodrop", "dropout"])
def test_llamagen_loss_and_gradients(fixtures, variant):
    from visar.convert.common import rename_keys
    from visar.convert.llamagen import GPT_KEY_RULES, load_generator

    d, tensors, meta = _fixture(fixtures, "llamagen")
    ref = _sub(tensors, f"{variant}.")
    off = dict(token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0) if variant == "nodrop" else {}
    model = load_generator(d / "gpt_tiny_c2i.pt", grid_size=4, **off).train()
    for rec in meta["variants"][variant]["dropout_mask_order"]:
        name = rename_keys({rec["module"]: None}, _LLAMAGEN_DROPOUT).popitem()[0]
        assert isinstance(model.get_submodule(name), nn.Dropout) and model.get_submodule(name).p == rec["p"]
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, _ReplayDropout(ref[f"dropout_keep.{rec['module']}"], rec["p"]))
    drop = ref["class_drop_uniform"] < meta["model_args"]["class_dropout_prob"]
    assert torch.equal(drop, ref["class_drop_mask"])
    loss = model.loss(tensors["z_indices"], Condition(labels=tensors["c_indices"]), drop=drop)
    _check_loss(loss, ref["loss"])
    loss.backward()
    names = _recorded_names(ref, meta["grad_names"])
    _check_grads(model, ref, dict(zip(names, rename_keys({n: None for n in names}, GPT_KEY_RULES))))


# ---------------------------------------------------------------------------------------------- VAR
@pytest.mark.fixtures
@pytest.mark.parametrize("case", ["p4", "p10", "p4saln"])
def test_var_trainer_step_loss_and_gradients(fixtures, case):
    from visar.convert.common import rename_keys
    from visar.convert.var import GENERATOR_RULES, load_generator, load_tokenizer

    d, tensors, meta = _fixture(fixtures, "var")
    ref, info = _sub(tensors, f"{case}."), meta["cases"][case]
    tok = load_tokenizer(d / info["vqvae"], scales=info["patch_nums"])
    model = load_generator(d / info["checkpoint"], drop_path=info["drop_path_rate"]).train()
    model.bind_tokenizer(tok)
    image = ref["image"] if "image" in ref else ref["image_u8"].float() / 255 * 2 - 1
    with torch.no_grad():
        ids = tok.encode(image)
        assert torch.equal(torch.cat([i.flatten(1) for i in ids], 1), ref["gt_idx_BL"])
        torch.testing.assert_close(tok.teacher_forcing_inputs(ids), ref["x_BLCv_wo_first_l"], rtol=0, atol=1e-5)
    B = image.shape[0]
    drop_path = None
    if info["drop_path_draws"]:  # [depth, 2 branches, B] keep masks; blocks without DropPath keep everything
        drop_path = torch.ones(model.depth, 2, B)
        for row, draw in zip(ref["drop_path_keep"], info["drop_path_draws"]):
            drop_path[draw["block"], ("attn", "ffn").index(draw["branch"])] = row
            assert model.blocks[draw["block"]].drop_path.p == pytest.approx(draw["drop_prob"], rel=1e-6)
    drop = ref["cond_drop_uniform"] < info["cond_drop_rate"]
    assert torch.equal(drop, ref["cond_drop_mask"])
    loss = model.loss(ids, ref["labels"], drop=drop, drop_path=drop_path)
    _check_loss(loss, ref["loss"])
    loss.backward()
    names = _recorded_names(ref, info["grad_names"])
    _check_grads(model, ref, dict(zip(names, rename_keys({n: None for n in names}, GENERATOR_RULES))))


# ---------------------------------------------------------------------------------------------- MAR
def _mar(d):
    from visar.convert.mar import load_generator

    # the fixture's main tensors were recorded with every dropout at p = 0 (README, "Training loss")
    return load_generator(d / "mar_tiny_checkpoint-last.pth", use_ema=False, encoder_num_heads=2,
                          decoder_num_heads=2, attn_dropout=0.0, proj_dropout=0.0).train()


@pytest.mark.fixtures
def test_mar_posterior_sample_with_recorded_noise(fixtures):
    """The latent MAR trains on: ``(mean + std * posterior_noise) * 0.2325`` of the tiny KL-VAE."""
    from visar.convert.mar import load_tokenizer

    d, ref, _ = _fixture(fixtures, "mar")
    tok = load_tokenizer(d / "vae_tiny.ckpt", sample_size=64)
    with torch.no_grad():
        mean, std = tok.posterior(ref["image"])
        x = tok.encode(ref["image"], noise=ref["posterior_noise"])
    torch.testing.assert_close(mean, ref["posterior_mean"], rtol=0, atol=1e-5)
    torch.testing.assert_close(std, ref["posterior_std"], rtol=0, atol=1e-5)
    torch.testing.assert_close(x, ref["x"], rtol=0, atol=1e-5)
    assert torch.equal((ref["posterior_mean"] + ref["posterior_std"] * ref["posterior_noise"]) * tok.scale_factor,
                       ref["x"])


@pytest.mark.fixtures
def test_mar_loss_and_gradients(fixtures):
    d, ref, meta = _fixture(fixtures, "mar")
    model = _mar(d)
    assert torch.equal(model.patchify(ref["x"]).reshape(-1, 16).repeat(4, 1), ref["diff.target"])
    mask = ref["mask"].bool()
    assert int(mask.sum(1)[0]) == int(ref["num_masked_tokens"]) and torch.equal(mask.reshape(-1).repeat(4).float(),
                                                                               ref["diff.row_mask"])
    drop = ref["label_drop_uniform"] < meta["label_drop_prob"]
    assert torch.equal(drop, ref["label_drop_mask"])
    loss = model.loss(ref["x"], Condition(labels=ref["labels"]), mask=mask, drop=drop, t=ref["diff.t"],
                      noise=ref["diff.noise"])
    _check_loss(loss, ref["loss"])
    loss.backward()
    names = _recorded_names(ref, meta["grad_names"])
    _check_grads(model, ref, {n: "head." + n[len("diffloss."):] if n.startswith("diffloss.") else n for n in names})


@pytest.mark.fixtures
def test_mar_head_rows_including_t0(fixtures):
    """Per-row head loss (MSE + VLB, the discretised decoder NLL at ``t = 0``) on the fixture's edge rows."""
    d, ref, _ = _fixture(fixtures, "mar")
    head = _mar(d).head
    n = ref["edge.t"].shape[0]
    assert int((ref["edge.t"] == 0).sum()) == 2
    with torch.no_grad():
        rows = torch.stack([head.loss(ref["edge.x_start"], ref["edge.c"], torch.eye(n)[i], t=ref["edge.t"],
                                      noise=ref["edge.noise"]) for i in range(n)])
    torch.testing.assert_close(rows, ref["edge.loss"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- FlowAR
@pytest.mark.fixtures
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_flowar_loss_and_gradients(fixtures, variant):
    from visar.convert.flowar import convert_state_dict, load_generator

    d, tensors, meta = _fixture(fixtures, "flowar")
    ref = _sub(tensors, f"{variant}.")
    model = load_generator(d / meta["variants"][variant]["checkpoint"]).train()
    drop = ref["label_drop_uniform"] < 0.1
    assert torch.equal(drop, ref["label_drop_mask"])
    loss = model.loss(tensors["x"], Condition(labels=tensors["labels"]), drop=drop, t=ref["t"], noise=ref["noise"])
    _check_loss(loss, ref["loss"])
    loss.backward()
    names = _recorded_names(ref, meta["grad_names"])
    _check_grads(model, ref, dict(zip(names, convert_state_dict({n: torch.zeros(1) for n in names}, model))))


# ---------------------------------------------------------------------------------------------- xAR
def test_xar_noisy_context_loss_and_gradients(fixtures):
    from visar.convert.xar import convert_state_dict, load_generator

    d, ref, meta = _fixture(fixtures, "xar")
    model = load_generator(d / meta["checkpoint"]).train()
    B, K = ref["labels"].shape[0], meta["config"]["clusters"]
    t = ref["t"].view(K, B).T  # official row k * B + b = cell k of image b
    noise = ref["noise"].reshape(B, -1, ref["noise"].shape[-1])  # [B, cell, token, C] -> sequence order
    drop = ref["label_drop_uniform"] < meta["config"]["label_drop_prob"]
    assert torch.equal(drop, ref["label_drop_mask"])
    assert torch.equal(quantize_timestep(t), ref["t_int"].view(K, B).T)  # what the time embedding sees
    loss = model.loss(ref["x"], Condition(labels=ref["labels"]), drop=drop, t=t, noise=noise)
    _check_loss(loss, ref["loss"])
    loss.backward()
    names = _recorded_names(ref, meta["grad_names"])
    _check_grads(model, ref, dict(zip(names, convert_state_dict({n: torch.zeros(1) for n in names}, model))))


# ---------------------------------------------------------------------------------------------- draw order
# Without explicit draws a loss draws from its ``generator``; making the same draws by hand, in the documented
# order, and passing them explicitly must give the same loss bit for bit (tiny presets, no fixtures needed).

def _same_loss(model, tokens, cond, draws_from) -> None:
    torch.manual_seed(0)  # nn.Dropout inside the network uses the global RNG
    a = model.loss(tokens, cond, generator=torch.Generator().manual_seed(3))
    draws = draws_from(torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    b = model.loss(tokens, cond, generator=torch.Generator().manual_seed(99), **draws)
    assert torch.equal(a, b)


def test_llamagen_draws_replay_generator():
    from visar import zoo

    m = zoo.create("llamagen-gpt-tiny", class_dropout=0.5).train()
    tokens, cond = torch.randint(0, m.vocab_size, (3, 4, 4)), Condition(labels=torch.tensor([1, 2, 3]))
    _same_loss(m, tokens, cond, lambda g: dict(drop=torch.rand(3, generator=g) < 0.5))


def test_var_draws_replay_generator():
    from visar.generators.next_scale.var import NextScaleGenerator
    from visar.tokenizers.msvq_quantizer import MultiScaleResidualQuantizer

    m = NextScaleGenerator(num_classes=10, vocab_size=64, token_dim=16, scales=[1, 2, 4], depth=3, width=32,
                           num_heads=2, class_dropout=0.5, drop_path=0.6).train()
    m.bind_tokenizer(MultiScaleResidualQuantizer(64, 16, [1, 2, 4]))
    tokens = [torch.randint(0, 64, (3, s, s)) for s in (1, 2, 4)]

    def draws(g):
        drop = torch.rand(3, generator=g) < 0.5
        keep = torch.ones(3, 2, 3)
        for i, b in enumerate(m.blocks):  # block 0 has rate 0: no draw
            for branch in range(2 if b.drop_path.p > 0 else 0):
                keep[i, branch] = torch.empty(3).bernoulli_(1 - b.drop_path.p, generator=g)
        return dict(drop=drop, drop_path=keep)

    _same_loss(m, tokens, torch.tensor([1, 2, 3]), draws)
    bad = torch.ones(3, 2, 3)
    bad[0, 1, 2] = 0  # block 0 has DropPath rate 0
    with pytest.raises(ValueError, match=r"blocks \[0\], which have no DropPath"):
        m.loss(tokens, torch.tensor([1, 2, 3]), drop_path=bad)


def test_mar_draws_replay_generator():
    from visar import zoo
    from visar.generators.masked.mar import mask_by_order, truncated_normal_ratio

    m = zoo.create("mar-tiny", label_drop_prob=0.5).train()
    B, L, C, N = 3, m.seq_len, m.token_embed_dim, m.diffusion_batch_mul * 3 * m.seq_len

    def draws(g):
        orders = torch.argsort(torch.rand(B, L, generator=g), dim=1)
        mask = mask_by_order(math.ceil(L * truncated_normal_ratio(m.mask_ratio_min, g)), orders)
        drop = torch.rand(B, generator=g) < 0.5
        return dict(mask=mask, drop=drop, t=torch.randint(0, 1000, (N,), generator=g),
                    noise=torch.randn(N, C, generator=g))

    _same_loss(m, torch.randn(B, 16, 8, 8), Condition(labels=torch.tensor([1, 2, 3])), draws)


def test_flowar_draws_replay_generator():
    from visar import zoo

    m = zoo.create("flowar-tiny", label_drop_prob=0.5).train()

    def draws(g):
        drop = torch.rand(3, generator=g) < 0.5
        ts, eps = [], []
        for s in m.scales:
            ts.append(torch.rand(3, generator=g))
            eps.append(torch.randn(3, s * s, m.in_channels, generator=g))
        return dict(drop=drop, t=torch.stack(ts), noise=torch.cat(eps, 1))

    _same_loss(m, torch.randn(3, 16, 16, 16), Condition(labels=torch.tensor([1, 2, 3])), draws)


def test_xar_draws_replay_generator():
    from visar import zoo

    m = zoo.create("xar-tiny", label_drop_prob=0.5).train()
    E, N = m.partition.num_entities, m.partition.num_tokens

    def draws(g):
        t = torch.sigmoid(torch.randn(3, E, generator=g))
        noise = torch.randn(3, N, m.in_channels, generator=g)
        return dict(t=t, noise=noise, drop=torch.rand(3, generator=g) < 0.5)

    _same_loss(m, torch.randn(3, 16, 16, 16), Condition(labels=torch.tensor([1, 2, 3])), draws)


def test_bad_draws_are_named():
    from visar import zoo

    m = zoo.create("xar-tiny").train()
    x, cond = torch.randn(2, 16, 16, 16), Condition(labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"drop must have shape \[2\]"):
        m.loss(x, cond, drop=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"t must lie in \[0.0, 1.0\]"):
        m.loss(x, cond, t=torch.full((2, 4), 1.5))
    with pytest.raises(TypeError, match="noise must be a float tensor"):
        m.loss(x, cond, noise=torch.zeros(2, 256, 16, dtype=torch.long))
    mar = zoo.create("mar-tiny").train()
    mask = torch.zeros(2, mar.seq_len, dtype=torch.bool)
    mask[0, :3], mask[1, :4] = True, True
    with pytest.raises(ValueError, match="same number"):
        mar.loss(torch.randn(2, 16, 8, 8), cond, mask=mask)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
        mar.loss(torch.randn(2, 16, 8, 8), cond, t=torch.full((4 * 2 * 64,), 1000))
    with pytest.raises(ValueError, match="permutation"):
        mar.loss(torch.randn(2, 16, 8, 8), cond, orders=torch.zeros(2, 64, dtype=torch.long))
