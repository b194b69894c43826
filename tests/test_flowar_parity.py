"""FlowAR parity with the official code, through ``../shared/fixtures/flowar`` (README there)."""
from __future__ import annotations

import json

import pytest
import torch

from visar import zoo
from visar.convert.flowar import convert_state_dict, infer_config, load_generator
from visar.samplers.next_scale_flow import euler_time_grid
from visar.nn.embeddings import quantize_timestep

VERSIONS = ["v1", pytest.param("v2", marks=pytest.mark.fixtures)]  # the subset ships v1


def _load(fixtures, v):
    from safetensors.torch import load_file

    d = fixtures("flowar")
    return load_generator(d / f"flowar_tiny_{v}.pth"), load_file(str(d / f"flowar_tiny_{v}_io.safetensors"))


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("n", [6, 25, 50])
def test_time_grid_and_integer_timesteps_exact(fixtures, n):
    _, io = _load(fixtures, "v1")
    grid = euler_time_grid(n)
    assert grid.dtype == torch.float64
    assert torch.equal(grid, io[f"euler_t_steps_num_steps{n}"])
    assert torch.equal(quantize_timestep(grid), io[f"euler_t_int_num_steps{n}"])


def test_float64_timestep_product_would_be_wrong(fixtures):
    """The trap the README warns about: a float64 product changes some integers."""
    _, io = _load(fixtures, "v1")
    grid = io["euler_t_steps_num_steps50"]
    assert not torch.equal((grid * 1000).long(), io["euler_t_int_num_steps50"])


@pytest.mark.parametrize("v", VERSIONS)
def test_converter_detects_config(fixtures, v):
    m, _ = _load(fixtures, v)
    cfg = json.loads((fixtures("flowar") / f"flowar_tiny_{v}_config.json").read_text())
    assert m.width == cfg["encoder_embed_dim"] and len(m.encoder_blocks) == cfg["encoder_depth"]
    assert len(m.decoder_blocks) == cfg["decoder_depth"] and m.num_heads == cfg["encoder_num_heads"]
    assert m.flownet.width == cfg["diffloss_w"] and len(m.flownet.res_blocks) == cfg["diffloss_d"]
    assert m.flownet.cross == cfg["cross"] and m.scales == tuple(cfg["scale"])


@pytest.mark.parametrize("v", VERSIONS)
def test_teacher_forced(fixtures, v):
    m, io = _load(fixtures, v)
    targets, inputs = m.teacher_inputs(io["tf.latents"])
    torch.testing.assert_close(targets, io["tf.targets"], atol=1e-4, rtol=0)
    torch.testing.assert_close(inputs, io["tf.next_scale_inputs"], atol=1e-4, rtol=0)
    with torch.no_grad():
        z = m(io["tf.latents"], io["tf.labels"])
    torch.testing.assert_close(z, io["tf.z"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("v", VERSIONS)
@pytest.mark.parametrize("s", ["s1", "s4"])
def test_flow_head(fixtures, v, s):
    m, io = _load(fixtures, v)
    with torch.no_grad():
        out = m.flownet(io[f"head_{s}.x_t"], io[f"head_{s}.t"], io[f"head_{s}.condition"])
    torch.testing.assert_close(out, io[f"head_{s}.velocity"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("v", VERSIONS)
@pytest.mark.parametrize("use_cache", [True, False])
def test_sampler_trace(fixtures, v, use_cache):
    m, io = _load(fixtures, v)
    log = json.loads((fixtures("flowar") / f"flowar_tiny_{v}_sampler_log.json").read_text())["sample_cfg"]
    trace = []
    out = m.sample(io["sample_cfg.labels"], generator=torch.Generator().manual_seed(log["torch_seed"]),
                   num_steps=6, cfg_scale=3.0, guidance_high=0.9, use_cache=use_cache, callback=trace.append)
    assert len(trace) == 5
    for rec, meta in zip(trace, log["per_scale"]):
        k = rec["scale"]
        assert rec["cfg_scale"] == pytest.approx(meta["cfg_scale"])
        assert torch.equal(rec["latents"], io[f"sample_cfg.scale{k}.latents"])
        torch.testing.assert_close(rec["condition"], io[f"sample_cfg.scale{k}.condition"], atol=1e-4, rtol=0)
        ref = io[f"sample_cfg.scale{k}.out"]
        assert rec["out"].dtype == torch.float64
        assert _rel(rec["out"], ref) <= 1e-4, k
    assert _rel(out, io["sample_cfg.tokens"]) <= 1e-4


@pytest.mark.parametrize("v", VERSIONS)
def test_sampler_50_steps(fixtures, v):
    m, io = _load(fixtures, v)
    out = m.sample(io["sample_cfg_steps50.labels"], generator=torch.Generator().manual_seed(0), num_steps=50,
                   cfg_scale=2.4, guidance_high=0.7)
    assert _rel(out, io["sample_cfg_steps50.tokens"]) <= 1e-4


@pytest.mark.parametrize("preset,manifest", [("flowar-s", "small"), ("flowar-l", "large"), ("flowar-h", "huge")])
def test_presets_match_manifests(fixtures, preset, manifest):
    """Build each preset on the meta device; names, shapes and the parameter count match the release."""
    man = json.loads((fixtures("flowar") / f"manifest_flowar_{manifest}.json").read_text())
    with torch.device("meta"):
        model = zoo.create(preset)
        state = {t["name"]: torch.empty(t["shape"]) for t in man["tensors"] if t["kind"] == "parameter"}
    assert sum(p.numel() for p in model.parameters()) == man["num_params"]
    cfg = infer_config({**state, **{t["name"]: torch.empty(t["shape"], device="cpu") for t in man["tensors"]
                                    if t["name"].endswith("rope.freqs")}})
    assert {k: cfg[k] for k in zoo.get_preset(preset).kwargs} == zoo.get_preset(preset).kwargs
    mapped = convert_state_dict(state, model)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ev, off = zoo.get_preset(preset).eval, man["official_eval"]
    assert (ev["num_steps"], ev["cfg_scale"], ev["guidance_high"]) == (off["num_steps"], off["cfg"], off["guidance"])
