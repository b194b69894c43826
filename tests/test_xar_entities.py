"""xAR entity types (token, cell, subsample, scale, image) through one model: layouts, NCL training,
sampling, cached == uncached, save/load, bad input. Tiny random models, CPU float32."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visar.generators.components.entities import (ENTITY_TYPES, CellPartition, ImagePartition, ScalePyramid,
                                       SubsamplePartition, TokenPartition, default_scales, make_partition)
from visar.generators.next_x.xar import NextXGenerator

# (entity, options, number of entities, tokens per entity) on an 8 x 8 grid
ENTITIES = [
    ("token", {}, 64, [1] * 64),
    ("cell", {"cell": 4}, 4, [16] * 4),
    ("subsample", {"stride": 2}, 4, [16] * 4),
    ("scale", {"scales": [1, 2, 4, 8]}, 4, [1, 4, 16, 64]),
    ("image", {}, 1, [64]),
]


def tiny(entity, **kw):
    torch.manual_seed(0)
    cfg = dict(num_classes=10, in_channels=4, latent_size=8, width=32, encoder_depth=1, decoder_depth=1,
               num_heads=2, entity=entity)
    return NextXGenerator(**{**cfg, **kw}).eval()


def test_registry_has_every_paper_entity():
    assert set(ENTITY_TYPES) == {"token", "cell", "subsample", "scale", "image"}


@pytest.mark.parametrize("entity,opts,E,sizes", ENTITIES)
def test_layout_round_trip(entity, opts, E, sizes):
    p = make_partition(entity, 8, 8, **opts)
    assert p.num_entities == E and p.sizes == sizes and p.num_tokens == sum(sizes)
    lat = torch.randn(2, 3, 8, 8)
    seq = p.to_sequence(lat)
    assert seq.shape == (2, sum(sizes), 3)
    assert torch.equal(p.from_sequence(seq), lat)
    rows, cols = p.positions()
    assert rows.shape == cols.shape == (sum(sizes),)
    m = p.mask()
    assert m.shape == (sum(sizes), sum(sizes)) and (m[:sizes[0], :sizes[0]] == 0).all()
    if E > 1:
        assert torch.isinf(m[0, sizes[0]]) and (m[-1] == 0).all()


def test_token_and_image_are_cell_aliases():
    lat = torch.randn(1, 2, 8, 8)
    assert torch.equal(TokenPartition(8, 8).to_sequence(lat), CellPartition(8, 8, 1).to_sequence(lat))
    assert torch.equal(ImagePartition(8, 8).to_sequence(lat), CellPartition(8, 8, 8).to_sequence(lat))


def test_subsample_entities_are_strided():
    p = SubsamplePartition(8, 8, 2)
    lat = torch.randn(1, 3, 8, 8)
    seq = p.to_sequence(lat)
    # entity (a, b) = (0, 1): positions (2i, 2j + 1), row-major in (i, j)
    torch.testing.assert_close(seq[:, 16:32], lat[:, :, 0::2, 1::2].flatten(2).transpose(1, 2), atol=0, rtol=0)
    torch.testing.assert_close(seq[:, 48:], lat[:, :, 1::2, 1::2].flatten(2).transpose(1, 2), atol=0, rtol=0)
    rows, cols = p.positions()
    assert rows[16:20].tolist() == [0, 0, 0, 0] and cols[16:20].tolist() == [1, 3, 5, 7]


def test_scale_entities_are_area_downsampled_and_aligned():
    p = ScalePyramid(8, 8, [1, 2, 4, 8])
    lat = torch.randn(2, 3, 8, 8)
    maps = p.split(p.to_sequence(lat))
    torch.testing.assert_close(maps[0], lat.mean((2, 3), keepdim=True))
    torch.testing.assert_close(maps[2], F.avg_pool2d(lat, 2))
    assert torch.equal(maps[3], lat)
    rows, cols = p.positions()
    assert rows[0] == cols[0] == 3.5  # the 1x1 scale sits at the grid centre
    assert rows[1:5].tolist() == [1.5, 1.5, 5.5, 5.5] and cols[1:5].tolist() == [1.5, 5.5, 1.5, 5.5]
    assert rows[-64:].tolist() == [float(i // 8) for i in range(64)]
    assert default_scales(8) == [1, 2, 4, 8] and default_scales(12) == [1, 2, 4, 8, 12]


@pytest.mark.parametrize("entity,opts,E,sizes", ENTITIES)
def test_every_entity_trains_and_samples(entity, opts, E, sizes):
    m = tiny(entity, **opts).train()
    assert m.rope_cos.shape[0] == m.encoder_pos_embed_learned.shape[1] == sum(sizes)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    lat, y = torch.randn(4, 4, 8, 8), torch.tensor([0, 1, 2, 3])
    for i in range(3):
        loss = m.loss(lat, y, generator=torch.Generator().manual_seed(i))
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert m.pred.weight.grad.abs().sum() > 0
        opt.step()
    m.eval()
    out = m.sample([1, 2], generator=torch.Generator().manual_seed(0), num_steps=2, cfg_scale=2.0)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_ncl_draws_one_time_per_entity():
    """Noisy Context Learning: every scale gets its own t (checked through the model's input)."""
    m = tiny("scale", scales=[2, 4, 8])
    seen = {}

    def spy(x_t, t, labels, **kw):
        seen.update(t=t, x=x_t)
        return x_t

    m.forward = spy
    m.loss(torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 2]), generator=torch.Generator().manual_seed(0))
    assert seen["t"].shape == (3, 3) and seen["x"].shape == (3, 4 + 16 + 64, 4)
    assert len(set(seen["t"][0].tolist())) == 3


@pytest.mark.parametrize("entity,opts,E,sizes", ENTITIES)
def test_cache_equals_no_cache(entity, opts, E, sizes):
    m = tiny(entity, **opts)
    steps = 1 if entity == "token" else 3  # token: 64 entities, keep it fast
    calls = []
    a = m.sample([1, 5], generator=torch.Generator().manual_seed(3), num_steps=steps, cfg_scale=2.5,
                 callback=calls.append)
    b = m.sample([1, 5], generator=torch.Generator().manual_seed(3), num_steps=steps, cfg_scale=2.5,
                 use_cache=False)
    assert len(calls) == E * steps
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if E > 1:  # first call of entity 1 re-encodes entity 0 once, together with entity 1
        assert calls[steps]["x"].shape[1] == sizes[0] + sizes[1]


def test_scale_sampling_depends_on_earlier_scales():
    """Block-causal over scales: changing the coarse scale changes the fine prediction, not vice versa."""
    m = tiny("scale", scales=[2, 4, 8])
    x, t, y = torch.randn(1, 84, 4), torch.rand(1, 3), torch.tensor([2])
    x2 = x.clone()
    x2[:, :4] += 1.0
    x3 = x.clone()
    x3[:, 20:] += 1.0
    with torch.no_grad():
        a, b, c = m(x, t, y), m(x2, t, y), m(x3, t, y)
    assert not torch.equal(a[:, 20:], b[:, 20:])
    assert torch.equal(a[:, :20], c[:, :20])


@pytest.mark.parametrize("entity,opts,E,sizes", ENTITIES)
def test_save_load_round_trip(tmp_path, entity, opts, E, sizes):
    m = tiny(entity, **opts)
    m.save_pretrained(tmp_path)
    m2 = NextXGenerator.from_pretrained(tmp_path)
    assert m2.config == m.config and type(m2.partition) is type(m.partition) and m2.partition.sizes == sizes
    x, t = torch.randn(1, sum(sizes), 4), torch.rand(1, E)
    with torch.no_grad():
        assert torch.equal(m(x, t, torch.tensor([1])), m2(x, t, torch.tensor([1])))
    a = m.sample([3], generator=torch.Generator().manual_seed(0), num_steps=1, cfg_scale=1.5)
    b = m2.sample([3], generator=torch.Generator().manual_seed(0), num_steps=1, cfg_scale=1.5)
    assert torch.equal(a, b)


def test_bad_entity_options():
    with pytest.raises(ValueError, match="cell size 3 must divide"):
        tiny("cell", cell=3)
    with pytest.raises(ValueError, match="subsample stride 3 must divide"):
        tiny("subsample", stride=3)
    with pytest.raises(ValueError, match="subsample stride 0"):
        SubsamplePartition(8, 8, 0)
    with pytest.raises(ValueError, match="last scale must equal the latent grid size 8"):
        tiny("scale", scales=[1, 2, 4])
    with pytest.raises(ValueError, match="strictly increasing"):
        tiny("scale", scales=[1, 4, 2, 8])
    with pytest.raises(ValueError, match="positive integers"):
        tiny("scale", scales=[0, 8])
    with pytest.raises(ValueError, match="square"):
        ScalePyramid(8, 4)
    with pytest.raises(ValueError, match="unknown entity type 'pixel'"):
        tiny("pixel")
    p = ScalePyramid(8, 8, [4, 8])
    with pytest.raises(ValueError, match=r"\[B, C, 8, 8\]"):
        p.to_sequence(torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"\[B, 80, C\]"):
        p.from_sequence(torch.randn(1, 64, 2))
    m = tiny("scale", scales=[4, 8])
    with pytest.raises(ValueError, match=r"x_t must be \[B, 80, 4\]"):
        m(torch.randn(1, 64, 4), torch.rand(1, 2), torch.tensor([0]))


@pytest.mark.parametrize("name,entity,sizes", [("xar_shapes_cell", "cell", [16] * 4),
                                               ("xar_shapes_scale", "scale", [1, 4, 16, 64])])
def test_shapes_configs_build(name, entity, sizes, tmp_path):
    from visar.train.config import load_config

    # the tokenizer export may not exist yet: point the config at a stand-in folder
    (tmp_path / "tokenizer.json").write_text("{}")
    cfg = load_config(f"configs/{name}.yaml", [f"tokenizer.path={tmp_path}"])
    assert cfg.train.output_dir == f"runs/{name}" and cfg.export_dir == f"runs/{name}/export"
    with torch.device("meta"):
        m = NextXGenerator(**cfg.model.kwargs)
    assert m.entity == entity and m.partition.sizes == sizes
    assert 1e6 < sum(p.numel() for p in m.parameters()) < 3e6


@pytest.mark.parametrize("entity,opts", [("cell", {"cell": 4}), ("scale", {"scales": [2, 4, 8]})])
def test_ode_sampler(entity, opts):
    """Deterministic Euler ODE: cached == uncached, no noise beyond the initial draw, num_steps calls per entity."""
    m = tiny(entity, **opts)
    calls = []
    a = m.sample([1, 2], generator=torch.Generator().manual_seed(0), num_steps=4, cfg_scale=2.0, method="ode",
                 callback=calls.append)
    b = m.sample([1, 2], generator=torch.Generator().manual_seed(0), num_steps=4, cfg_scale=2.0, method="ode",
                 use_cache=False)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert len(calls) == 4 * m.partition.num_entities and [c["time"] for c in calls[:4]] == [1.0, 0.75, 0.5, 0.25]
    sde = m.sample([1, 2], generator=torch.Generator().manual_seed(0), num_steps=4, cfg_scale=2.0)
    assert not torch.allclose(a, sde)
    with pytest.raises(ValueError, match="method must be"):
        m.sample([1], method="heun")
