"""FlowAR generator behaviour on tiny random models: cache, cfg = 1, save/load, training, bad input."""
from __future__ import annotations

import pytest
import torch

from visar import zoo
from visar.convert.common import CheckpointError
from visar.generators.next_scale.flowar import NextScaleFlowGenerator
from visar.samplers.next_scale_flow import euler_time_grid


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(num_classes=10, scales=(1, 2, 4), width=32, encoder_depth=1, decoder_depth=1, num_heads=2,
               head_width=32, head_depth=1, head_num_heads=2)
    return NextScaleFlowGenerator(**{**cfg, **kw}).eval()


@pytest.mark.parametrize("cross", [False, True])
def test_cache_equals_no_cache(cross):
    m = tiny(head_cross=cross)
    kw = dict(num_steps=6, cfg_scale=2.0, guidance_high=0.9)
    a = m.sample([1, 2, 3], generator=torch.Generator().manual_seed(3), use_cache=True, **kw)
    b = m.sample([1, 2, 3], generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert a.shape == (3, 16, 4, 4)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_seeded_sampling_is_deterministic():
    m = tiny()
    a = m.sample([4, 5], generator=torch.Generator().manual_seed(1), num_steps=4)
    b = m.sample([4, 5], generator=torch.Generator().manual_seed(1), num_steps=4)
    c = m.sample([4, 5], generator=torch.Generator().manual_seed(2), num_steps=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cfg_one_runs_without_unconditional_half():
    """The official sampler fails for cfg == 1; visar runs only the conditional rows."""
    m = tiny()
    rows = []
    orig = m.flownet.forward
    m.flownet.forward = lambda x, t, z: (rows.append(x.shape[0]), orig(x, t, z))[1]
    out = m.sample([7, 8], generator=torch.Generator().manual_seed(0), num_steps=4, cfg_scale=1.0)
    assert out.shape == (2, 16, 4, 4) and torch.isfinite(out).all()
    assert set(rows) == {2}
    rows.clear()
    m.sample([7, 8], generator=torch.Generator().manual_seed(0), num_steps=4, cfg_scale=2.0)
    assert set(rows) == {4}


def test_guided_rows_share_conditional_input():
    """Inside the guidance interval the head sees [x_c; x_c]; outside it each half has its own state."""
    m = tiny()
    seen = []
    orig = m.flownet.forward
    m.flownet.forward = lambda x, t, z: (seen.append((float(t[0]), x.clone())), orig(x, t, z))[1]
    m.sample([1], generator=torch.Generator().manual_seed(0), num_steps=6, cfg_scale=3.0, guidance_high=0.5)
    for t, x in seen[6:]:  # scales >= 1 (scale 0 has cfg 1 and is never guided)
        assert torch.equal(x[0], x[1]) == (t <= 0.5)


def test_cfg_schedule_constant_guides_every_scale():
    """``cfg_schedule="linear"`` (official) ramps 1 -> cfg over scales; ``"constant"`` guides scale 0 too."""
    m = tiny()
    seen = {}
    for schedule in ("linear", "constant"):
        trace = []
        m.sample([1], generator=torch.Generator().manual_seed(0), num_steps=4, cfg_scale=3.0,
                 cfg_schedule=schedule, callback=trace.append)
        seen[schedule] = [t["cfg_scale"] for t in trace]
    assert seen["linear"] == [1.0, 2.0, 3.0] and seen["constant"] == [3.0, 3.0, 3.0]
    default = m.sample([1], generator=torch.Generator().manual_seed(0), num_steps=4, cfg_scale=3.0)
    linear = m.sample([1], generator=torch.Generator().manual_seed(0), num_steps=4, cfg_scale=3.0,
                      cfg_schedule="linear")
    constant = m.sample([1], generator=torch.Generator().manual_seed(0), num_steps=4, cfg_scale=3.0,
                        cfg_schedule="constant")
    assert torch.equal(default, linear) and not torch.equal(default, constant)
    with pytest.raises(ValueError, match="cfg_schedule"):
        m.sample([1], num_steps=4, cfg_schedule="cosine")


def test_save_load_round_trip(tmp_path):
    m = tiny(head_cross=True)
    m.save_pretrained(tmp_path)
    m2 = NextScaleFlowGenerator.from_pretrained(tmp_path)
    assert m2.config == m.config
    lat = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(m(lat, torch.tensor([1, 2])), m2(lat, torch.tensor([1, 2])), atol=0, rtol=0)


def test_loss_trains_every_part():
    m = tiny().train()
    loss = m.loss(torch.randn(2, 16, 4, 4), torch.tensor([0, 9]), generator=torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for name in ("z_proj.weight", "encoder_blocks.0.attn.qkv.weight", "decoder_blocks.0.mlp.w2.weight",
                 "flownet.res_blocks.0.ada_lin.1.weight", "class_emb.embedding_table.weight"):
        assert m.get_parameter(name).grad.abs().sum() > 0, name


def test_loss_decreases_on_one_batch():
    m = tiny().train()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    lat, y = torch.randn(4, 16, 4, 4), torch.tensor([0, 1, 2, 3])
    losses = []
    for i in range(30):
        loss = m.loss(lat, y, generator=torch.Generator().manual_seed(i % 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])


def test_bad_inputs():
    m = tiny()
    with pytest.raises(ValueError, match="class ids"):
        m.sample([10], num_steps=4)
    with pytest.raises(ValueError, match="num_steps"):
        m.sample([1], num_steps=1)
    with pytest.raises(ValueError, match="num_steps"):
        euler_time_grid(2.5)
    with pytest.raises(ValueError, match="guidance"):
        m.sample([1], num_steps=4, guidance_high=1.5)
    with pytest.raises(ValueError, match="cfg_scale"):
        m.sample([1], num_steps=4, cfg_scale=float("nan"))
    with pytest.raises(ValueError, match=r"\[B, 16, 4, 4\]"):
        m(torch.randn(2, 16, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class ids"):
        m(torch.randn(1, 16, 4, 4), torch.tensor([11]))  # 10 is the null class, 11 is out of range
    with pytest.raises(ValueError, match="strictly increasing"):
        NextScaleFlowGenerator(scales=(1, 4, 2))


def test_foreign_and_truncated_checkpoints(tmp_path):
    from visar.convert.flowar import load_generator

    torch.save({"tok_embeddings.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a FlowAR checkpoint"):
        load_generator(tmp_path / "other.pth")
    m = tiny()
    state = {k.replace("embedding_table.", ""): v for k, v in m.state_dict().items()}
    torch.save(state, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_generator(tmp_path / "cut.pth")


def test_converter_rejects_wrong_mask(fixtures, tmp_path):
    from visar.convert.flowar import load_generator

    state = torch.load(fixtures("flowar") / "flowar_tiny_v1.pth", weights_only=True)
    state["mask"] = torch.zeros_like(state["mask"])
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="block-causal"):
        load_generator(tmp_path / "bad.pth")


def test_tiny_preset_builds_and_is_small():
    m = zoo.create("flowar-tiny")
    assert sum(p.numel() for p in m.parameters()) < 1_000_000
    assert "flowar-s" in zoo.list_models("flowar-*") and m.family == "flowar" and m.token_kind == "continuous"


def test_bfloat16_smoke():
    """bf16 weights run end to end (correctness of bf16 numerics is a GPU matter; tiny shapes only)."""
    m = tiny().to(torch.bfloat16)
    out = m.sample([1], generator=torch.Generator().manual_seed(0), num_steps=2, cfg_scale=2.0)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
