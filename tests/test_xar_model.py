"""xAR generator behaviour on tiny random models: entities, cache, cfg = 1, save/load, training, bad input."""
from __future__ import annotations

import pytest
import torch

from visar import zoo
from visar.convert.common import CheckpointError
from visar.generators.components.entities import CellPartition, GridPartition, block_causal_mask
from visar.generators.next_x.xar import NextXGenerator
from visar.samplers.next_x import em_time_grid


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(num_classes=10, latent_size=8, cell=4, width=32, encoder_depth=1, decoder_depth=1, num_heads=2)
    return NextXGenerator(**{**cfg, **kw}).eval()


@pytest.mark.parametrize("cell", [1, 2, 4, 8])
def test_cell_partition_round_trip_and_mask(cell):
    p = CellPartition(8, 8, cell)
    lat = torch.randn(2, 3, 8, 8)
    assert torch.equal(p.from_sequence(p.to_sequence(lat)), lat)
    assert p.num_entities == (8 // cell) ** 2 and p.sizes == [cell * cell] * p.num_entities
    seq = p.to_sequence(lat)
    # first entity = the top-left cell, row-major
    assert torch.equal(seq[:, :cell * cell], lat[:, :, :cell, :cell].flatten(2).transpose(1, 2))
    m = p.mask()
    assert m.shape == (64, 64) and (m[:cell * cell, :cell * cell] == 0).all()
    if p.num_entities > 1:
        assert torch.isinf(m[0, cell * cell])


def test_block_causal_mask_blocks():
    m = block_causal_mask([1, 2])
    assert m.tolist() == [[0, float("-inf"), float("-inf")], [0, 0, 0], [0, 0, 0]]


@pytest.mark.parametrize("cell,num_steps", [(4, 3), (4, 2), (4, 1), (2, 3)])
def test_cache_equals_no_cache(cell, num_steps):
    """Includes num_steps < 3, where the official code extends its cache twice and fails."""
    m = tiny(cell=cell)
    a = m.sample([1, 2], generator=torch.Generator().manual_seed(5), num_steps=num_steps, cfg_scale=2.0)
    b = m.sample([1, 2], generator=torch.Generator().manual_seed(5), num_steps=num_steps, cfg_scale=2.0,
                 use_cache=False)
    assert a.shape == (2, 16, 8, 8) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_calls_per_entity_and_cache_extension():
    m = tiny()
    calls = []
    m.sample([3], generator=torch.Generator().manual_seed(0), num_steps=3, cfg_scale=2.0, callback=calls.append)
    assert len(calls) == 4 * 3
    # first call of entity k >= 1 re-encodes the previous entity (at t = 0) together with the current one
    assert [c["x"].shape[1] for c in calls[:6]] == [16, 16, 16, 32, 16, 16]
    assert [c["x"].shape[0] for c in calls] == [2] * 12


def test_cfg_one_runs_without_unconditional_half():
    m = tiny()
    calls = []
    out = m.sample([3, 4, 5], generator=torch.Generator().manual_seed(0), num_steps=3, cfg_scale=1.0,
                   callback=calls.append)
    assert out.shape == (3, 16, 8, 8) and {c["x"].shape[0] for c in calls} == {3}
    assert (calls[0]["labels"] < 10).all()


def test_seeded_sampling_is_deterministic():
    m = tiny()
    a = m.sample([4], generator=torch.Generator().manual_seed(1), num_steps=3)
    b = m.sample([4], generator=torch.Generator().manual_seed(1), num_steps=3)
    assert torch.equal(a, b)


def test_save_load_round_trip(tmp_path):
    m = tiny(cell=2)
    m.save_pretrained(tmp_path)
    m2 = NextXGenerator.from_pretrained(tmp_path)
    assert m2.config == m.config and m2.partition.cell == 2
    x, t = torch.randn(1, 64, 16), torch.rand(1, 16)
    with torch.no_grad():
        assert torch.equal(m(x, t, torch.tensor([1])), m2(x, t, torch.tensor([1])))


def test_block_causal_teacher_forcing():
    """Changing a later entity never changes earlier entities' outputs."""
    m = tiny()
    x, t, y = torch.randn(1, 64, 16), torch.rand(1, 4), torch.tensor([2])
    x2 = x.clone()
    x2[:, 32:] += 1.0
    with torch.no_grad():
        a, b = m(x, t, y), m(x2, t, y)
    assert torch.equal(a[:, :32], b[:, :32]) and not torch.equal(a[:, 32:], b[:, 32:])


def test_loss_trains_and_decreases():
    m = tiny().train()
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    lat, y = torch.randn(4, 16, 8, 8), torch.tensor([0, 1, 2, 3])
    losses = []
    for i in range(30):
        loss = m.loss(lat, y, generator=torch.Generator().manual_seed(i % 2))
        opt.zero_grad()
        loss.backward()
        if i == 0:
            for name in ("time_embed.mlp.0.weight", "encoder_blocks.0.ada_lin.1.weight", "pred.weight"):
                assert m.get_parameter(name).grad.abs().sum() > 0, name
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4])


def test_bad_inputs():
    with pytest.raises(ValueError, match="must divide"):
        NextXGenerator(latent_size=16, cell=5, width=32, num_heads=2)
    m = tiny()
    with pytest.raises(ValueError, match="class ids"):
        m.sample([-1], num_steps=3)
    with pytest.raises(ValueError, match="num_steps"):
        m.sample([1], num_steps=0)
    with pytest.raises(ValueError, match="num_steps"):
        em_time_grid(True)
    with pytest.raises(ValueError, match=r"\[B, 16, 8, 8\]"):
        m.loss(torch.randn(2, 16, 16, 16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one time per entity"):
        m(torch.randn(1, 64, 16), torch.rand(1, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"\[0, 1.0\]"):
        m(torch.randn(1, 64, 16), torch.full((1, 4), 1.5), torch.tensor([0]))
    with pytest.raises(ValueError, match="class ids"):
        m(torch.randn(1, 64, 16), torch.rand(1, 4), torch.tensor([11]))


def test_foreign_and_truncated_checkpoints(tmp_path, fixtures):
    from visar.convert.xar import load_generator

    flowar = fixtures("flowar") / "flowar_tiny_v1.pth"
    with pytest.raises(CheckpointError, match="not a xAR checkpoint"):
        load_generator(flowar)
    data = (fixtures("xar") / "xar_tiny.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        load_generator(tmp_path / "cut.pth")
    state = torch.load(fixtures("xar") / "xar_tiny.pth", weights_only=True)
    with pytest.raises(CheckpointError, match="cell-ordered"):  # the file was made with 8x8 cells
        torch.save(state, tmp_path / "x.pth")
        load_generator(tmp_path / "x.pth", cell=4)


def test_tiny_preset_builds_and_is_small():
    m = zoo.create("xar-tiny")
    assert sum(p.numel() for p in m.parameters()) < 1_000_000
    assert zoo.list_models("xar-*") == ["xar-b", "xar-h", "xar-l", "xar-tiny"]
    assert m.family == "xar" and m.token_kind == "continuous"


def test_bfloat16_smoke():
    """bf16 weights run end to end (tiny shapes only)."""
    m = tiny().to(torch.bfloat16)
    out = m.sample([1], generator=torch.Generator().manual_seed(0), num_steps=2, cfg_scale=2.0)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


class _Bands(GridPartition):
    """Test-only entity type with unequal entities: 1 row, then 3 rows, then the rest (raster order)."""

    def __init__(self, height, width, cell):
        super().__init__(height, width)

    def raster_order(self):
        H, W = self.height, self.width
        return list(range(H * W)), [W, 3 * W, (H - 4) * W]


def test_generator_works_for_any_partition(monkeypatch):
    """The model, its cache and its sampler only rely on the partition interface (unequal entities here)."""
    from visar.generators.components import entities

    monkeypatch.setitem(entities.ENTITY_TYPES, "bands", _Bands)
    m = tiny(entity="bands")
    assert m.partition.sizes == [8, 24, 32]
    a = m.sample([1], generator=torch.Generator().manual_seed(0), num_steps=2, cfg_scale=2.0)
    b = m.sample([1], generator=torch.Generator().manual_seed(0), num_steps=2, cfg_scale=2.0, use_cache=False)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown entity type"):
        tiny(entity="pyramid")
