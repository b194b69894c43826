"""xAR parity with the official code, through ``../shared/fixtures/xar`` (README there)."""
from __future__ import annotations

import json

import pytest
import torch

from visar import zoo
from visar.convert.xar import convert_state_dict, infer_config, load_generator
from visar.samplers.next_x import em_time_grid
from visar.nn.embeddings import quantize_timestep


def _load(fixtures):
    from safetensors.torch import load_file

    d = fixtures("xar")
    return load_generator(d / "xar_tiny.pth"), load_file(str(d / "xar_tiny_io.safetensors"))


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("n", [4, 40, 50])
def test_time_grid_and_integer_timesteps_exact(fixtures, n):
    _, io = _load(fixtures)
    grid = em_time_grid(n)
    assert torch.equal(grid, io[f"em_t_steps_num_steps{n}"])
    # the model is called at every grid point but the last (t = 0)
    assert torch.equal(quantize_timestep(grid[:-1]), io[f"em_t_int_num_steps{n}"])


def test_converter_detects_config(fixtures):
    m, _ = _load(fixtures)
    cfg = json.loads((fixtures("xar") / "xar_tiny_config.json").read_text())
    assert (m.width, len(m.encoder_blocks), len(m.decoder_blocks), m.num_heads) == (
        cfg["encoder_embed_dim"], cfg["encoder_depth"], cfg["decoder_depth"], cfg["encoder_num_heads"])
    assert m.partition.num_entities == cfg["clusters"] and m.partition.cell == 8


def test_cell_order_is_clusterify(fixtures):
    """Sequence = cells (0,0), (0,1), (1,0), (1,1), each row-major; un-doing it is exact."""
    m, io = _load(fixtures)
    lat = io["tf.latents"]
    seq = m.partition.to_sequence(lat)
    ref = lat.view(2, 16, 2, 8, 2, 8).permute(0, 2, 4, 3, 5, 1).reshape(2, 256, 16)
    assert torch.equal(seq, ref)
    assert torch.equal(m.partition.from_sequence(seq), lat)


def test_teacher_forced_velocity(fixtures):
    m, io = _load(fixtures)
    t_int = io["tf.t_int"].view(4, 2).t()  # stored cell-major: [cell0 of each image, cell1 ...]
    with torch.no_grad():
        v = m(io["tf.x_t"], t_int, io["tf.labels"])
    torch.testing.assert_close(v, io["tf.velocity"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_sampler_every_call(fixtures, use_cache):
    m, io = _load(fixtures)
    log = json.loads((fixtures("xar") / "xar_tiny_sampler_log.json").read_text())["sample_cfg"]
    calls = []
    out = m.sample(io["sample_cfg.labels"], generator=torch.Generator().manual_seed(log["torch_seed"]),
                   num_steps=4, cfg_scale=2.5, use_cache=use_cache, callback=calls.append)
    assert len(calls) == len(log["calls"]) == 16
    for j, (rec, meta) in enumerate(zip(calls, log["calls"])):
        p = f"sample_cfg.call{j:02d}."
        assert rec["entity"] == meta["scale_index"]
        assert torch.equal(rec["labels"], io[p + "label"])
        assert rec["time"] == pytest.approx(float(io[p + "time_input"][-1]), abs=1e-7)
        torch.testing.assert_close(rec["out"], io[p + "out"], atol=1e-4, rtol=0)
        if use_cache:  # the cached path feeds exactly the official inputs (128 tokens on cache updates)
            assert list(rec["x"].shape) == meta["x_shape"]
            torch.testing.assert_close(rec["x"], io[p + "x"], atol=1e-4, rtol=0)
        else:
            torch.testing.assert_close(rec["x"][:, -io[p + "x"].shape[1]:], io[p + "x"], atol=1e-4, rtol=0)
    assert _rel(out, io["sample_cfg.tokens"]) <= 1e-4


def test_sampler_40_steps(fixtures):
    m, io = _load(fixtures)
    out = m.sample(io["sample_cfg_steps40.labels"], generator=torch.Generator().manual_seed(0), num_steps=40,
                   cfg_scale=2.7)
    assert _rel(out, io["sample_cfg_steps40.tokens"]) <= 1e-4


@pytest.mark.parametrize("preset,manifest", [("xar-b", "base"), ("xar-l", "large"), ("xar-h", "huge")])
def test_presets_match_manifests(fixtures, preset, manifest):
    man = json.loads((fixtures("xar") / f"manifest_xar_{manifest}.json").read_text())
    with torch.device("meta"):
        model = zoo.create(preset)
        state = {t["name"]: torch.empty(t["shape"]) for t in man["tensors"] if t["kind"] == "parameter"}
    assert sum(p.numel() for p in model.parameters()) == man["num_params"]
    freqs = {t["name"]: torch.empty(t["shape"], device="cpu") for t in man["tensors"]
             if t["name"].endswith("rope.freqs")}
    cfg = infer_config({**state, **freqs})
    assert {k: cfg[k] for k in zoo.get_preset(preset).kwargs} == zoo.get_preset(preset).kwargs
    mapped = convert_state_dict(state, model)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ev, off = zoo.get_preset(preset).eval, man["official_eval"]
    assert (ev["num_steps"], ev["cfg_scale"]) == (off["num_steps"], off["cfg"])
