"""Training recipes: each family's official weight-decay groups and EMA rule, and the trainer's plumbing.

The official rules, as each official training script states them:

* LlamaGen ``train_c2i.py: creat_optimizer``: decay every tensor with ``dim() >= 2``;
* VAR ``train.py`` + ``utils/lr_control.py: filter_params``: no decay if ``ndim == 1``, the name ends with
  ``bias`` or contains one of ``nowd_keys``;
* MAR / FlowAR / xAR ``util/misc.py: add_weight_decay``: no decay if 1-D, ``*.bias`` or ``diffloss`` in the
  name (FlowAR's head is ``flownet`` and xAR has none, so for them only 1-D tensors and biases).

They are applied here to the **official** parameter names (from the tiny official checkpoints through each
family's converter, or the inverse renames on the tiny presets) and compared with the groups visar's
optimizer builder makes from the visar names.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from train_helpers import NoisyAE

from visar import zoo
from visar.train.optim import EMA, ema_rule, no_decay_names, param_groups

VAR_NOWD_KEYS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
                 "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")


def _mae_rule(name: str, p: torch.Tensor) -> bool:
    return len(p.shape) == 1 or name.endswith(".bias") or "diffloss" in name


OFFICIAL_NO_DECAY = {
    "llamagen": lambda name, p: p.dim() < 2,
    "var": lambda name, p: p.ndim == 1 or name.endswith("bias") or any(k in name for k in VAR_NOWD_KEYS),
    "mar": _mae_rule, "flowar": _mae_rule, "xar": _mae_rule,
}


def _check_groups(model: nn.Module, family: str, official_name: dict[str, str]) -> None:
    """visar's official groups == the official rule on the official names of the same parameters."""
    params = dict(model.named_parameters())
    assert set(official_name) == set(params), "every parameter needs its official name"
    want = {n for n, p in params.items() if OFFICIAL_NO_DECAY[family](official_name[n], p)}
    assert no_decay_names(model, "official") == want
    decay, no_decay = param_groups(model, 0.05)
    assert {id(p) for p in no_decay["params"]} == {id(params[n]) for n in want}
    assert len(decay["params"]) + len(no_decay["params"]) == len(params)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


# ---------------------------------------------------------------------------------------------- official files
def _from_official_file(family: str, d, case: str):
    """(visar model, {visar name: official name}) of a tiny official checkpoint, mapped by tensor identity
    through the family's converter."""
    from visar.convert.common import read_checkpoint, rename_keys, unwrap_state_dict

    if family == "llamagen":
        from visar.convert.llamagen import gpt_state_from_official, load_generator

        path = d / "gpt_tiny_c2i.pt"
        state = unwrap_state_dict(read_checkpoint(path), path=str(path))
        ours, model = gpt_state_from_official(state), load_generator(path, grid_size=4)
    elif family == "var":
        from visar.convert.var import GENERATOR_RULES, load_generator, read_generator_state

        path = d / f"var_{case}_d2.pth"
        state = read_generator_state(path)
        ours, model = rename_keys(state, GENERATOR_RULES), load_generator(path)
    elif family == "mar":
        from visar.convert.mar import load_generator

        path = d / "mar_tiny_checkpoint-last.pth"
        state = read_checkpoint(path)["model"]
        ours = {("head." + k[len("diffloss."):] if k.startswith("diffloss.") else k): v for k, v in state.items()}
        model = load_generator(path, use_ema=False, encoder_num_heads=2, decoder_num_heads=2)
    else:
        import importlib

        conv = importlib.import_module(f"visar.convert.{family}")
        path = d / (f"flowar_tiny_{case}.pth" if family == "flowar" else "xar_tiny.pth")
        state = unwrap_state_dict(read_checkpoint(path), path=str(path))
        model = conv.load_generator(path)
        ours = conv.convert_state_dict(state, model)
    by_id = {id(v): k for k, v in state.items()}
    params = dict(model.named_parameters())
    return model, {n: by_id[id(t)] for n, t in ours.items() if n in params}


@pytest.mark.parametrize("family,case", [pytest.param("llamagen", "", marks=pytest.mark.fixtures),
                                         pytest.param("var", "p4", marks=pytest.mark.fixtures),
                                         pytest.param("var", "p4saln", marks=pytest.mark.fixtures), ("mar", ""),
                                         ("flowar", "v1"), pytest.param("flowar", "v2", marks=pytest.mark.fixtures),
                                         ("xar", "")])
def test_official_groups_on_official_checkpoints(fixtures, family, case):
    model, names = _from_official_file(family, fixtures(family), case)
    _check_groups(model, family, names)


# ---------------------------------------------------------------------------------------------- tiny presets
def _official_names_of_preset(family: str, model: nn.Module) -> dict[str, str]:
    from visar.convert.common import rename_keys

    names = [n for n, _ in model.named_parameters()]
    if family == "llamagen":
        from visar.convert.llamagen import GPT_KEY_RULES_INVERSE

        return dict(zip(names, rename_keys({n: None for n in names}, GPT_KEY_RULES_INVERSE)))
    if family == "var":
        from visar.convert.var import generator_to_official

        by_ptr = {v.data_ptr(): k for k, v in generator_to_official(model).items()}
        return {n: by_ptr[p.data_ptr()] for n, p in model.named_parameters()}
    if family == "mar":
        return {n: "diffloss." + n[len("head."):] if n.startswith("head.") else n for n in names}
    # FlowAR / xAR: the converter's renames (class table, SwiGLU w1/w3/w2 <- fc1_g/fc1_x/fc2, the head's
    # ada_lin) change no part of a name the rule reads (no ".bias" suffix, no "diffloss")
    return {n: n for n in names}


PRESETS = {"llamagen": "llamagen-gpt-tiny", "var": "var-tiny", "mar": "mar-tiny", "flowar": "flowar-tiny",
           "xar": "xar-tiny"}


@pytest.mark.parametrize("family", sorted(PRESETS))
def test_official_groups_on_tiny_presets(family):
    model = zoo.create(PRESETS[family])
    _check_groups(model, family, _official_names_of_preset(family, model))


def test_official_groups_differ_from_the_legacy_rule_where_the_issue_says():
    """Legacy exempted every name with ``embed``; the official rules decay VAR's ``word_embed``, MAR's
    ``decoder_embed`` and positional tables, and exempt MAR's whole head and VAR's ``scale_mul``."""
    var, mar = zoo.create("var-tiny"), zoo.create("mar-tiny")
    assert "word_embed.weight" in no_decay_names(var, "legacy")
    assert "word_embed.weight" not in no_decay_names(var)
    assert {"blocks.0.attn.scale_mul", "pos_1LC", "lvl_embed.weight"} <= no_decay_names(var)
    official = no_decay_names(mar)
    assert "decoder_embed.weight" not in official and "encoder_pos_embed_learned" not in official
    assert "head.net.res_blocks.0.mlp.0.weight" in official
    assert "head.net.res_blocks.0.mlp.0.weight" not in no_decay_names(mar, "legacy")
    llama = zoo.create("llamagen-gpt-tiny")
    assert no_decay_names(llama) == {n for n, p in llama.named_parameters() if p.dim() < 2}


def test_models_without_a_rule_keep_legacy_and_bad_rules_are_named():
    m = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    assert no_decay_names(m) == no_decay_names(m, "legacy") == {"0.weight", "1.bias", "2.weight", "2.bias"}
    with pytest.raises(ValueError, match="weight_decay_groups must be one of official, legacy"):
        no_decay_names(m, "timm")

    class Listed(nn.Linear):
        def no_weight_decay(self):
            return {"weight", "nope"}

    with pytest.raises(ValueError, match="does not have.*nope"):
        no_decay_names(Listed(2, 2))


# ---------------------------------------------------------------------------------------------- EMA
@pytest.mark.parametrize("family,decay", [("llamagen", 0.0), ("var", 0.0), ("mar", 0.9999), ("flowar", 0.9999),
                                          ("xar", 0.9999)])
def test_official_ema_rule(family, decay):
    model = zoo.create(PRESETS[family])
    assert ema_rule(model, "official", 0.5) == dict(decay=decay, warmup=False, average_buffers=False)
    assert ema_rule(model, "constant", 0.5) == dict(decay=0.5, warmup=False, average_buffers=False)
    assert ema_rule(model, "warmup", 0.5) == dict(decay=0.5, warmup=True, average_buffers=True)


def test_ema_updates_per_rule():
    import copy

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    m(torch.randn(4, 3))  # non-zero running statistics
    start = copy.deepcopy(m)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
        m[1].running_mean.add_(1.0)
    s0, now = start.state_dict(), m.state_dict()
    const = EMA(start, **ema_rule(m, "constant", 0.9))
    const.update(m, step=0)  # no warmup: 0.9 from the first step, parameters only
    torch.testing.assert_close(const.shadow["0.weight"], 0.9 * s0["0.weight"] + 0.1 * now["0.weight"])
    assert torch.equal(const.shadow["1.running_mean"], now["1.running_mean"])  # buffers follow the model
    warm = EMA(start, **ema_rule(m, "warmup", 0.9))
    assert warm.decay_at(0) == pytest.approx(0.1) and warm.decay_at(10 ** 6) == 0.9
    warm.update(m, step=0)
    torch.testing.assert_close(warm.shadow["1.running_mean"], 0.1 * s0["1.running_mean"] + 0.9 * now["1.running_mean"])
    none = EMA(start, decay=0.0, warmup=False, average_buffers=False)  # official VAR / LlamaGen: no averaging
    none.update(m, step=5)
    assert all(torch.equal(none.shadow[k], v) for k, v in m.state_dict().items())


def test_official_ema_needs_a_declared_rule():
    with pytest.raises(ValueError, match="declares no official EMA rule"):
        ema_rule(nn.Linear(2, 2), "official", 0.999)
    with pytest.raises(ValueError, match="optim.ema must be one of warmup, constant, official"):
        ema_rule(nn.Linear(2, 2), "timm", 0.999)


# ---------------------------------------------------------------------------------------------- trainer plumbing
def _cfg(out, **over):
    from visar.train.config import load_config

    data = {
        "task": "tokenizer",
        "model": {"cls": "test_train_recipes:RuledAE", "kwargs": {"width": 8}},
        "data": {"kind": "shapes", "size": 16, "length": 32},
        "optim": {"lr": 1e-2, "warmup_steps": 1, "weight_decay": 0.5},
        "train": {"steps": 4, "batch_size": 8, "save_every": 2, "log_every": 100, "output_dir": str(out),
                  "progress": False, "ema_decay": 0.9},
    }
    return load_config(None, [f"{k}={v}" for k, v in over.items()], data=data)


class RuledAE(NoisyAE):
    """The trainer tests' autoencoder with a declared rule, so official and legacy groups differ in size."""

    def no_weight_decay(self) -> set[str]:
        return {"dec.weight"}


def test_config_keys_are_checked():
    from visar.train.config import ConfigError

    with pytest.raises(ConfigError, match="optim.weight_decay_groups must be one of official, legacy"):
        _cfg("runs/x", **{"optim.weight_decay_groups": "all"})
    with pytest.raises(ConfigError, match="optim.ema must be one of warmup, constant, official"):
        _cfg("runs/x", **{"optim.ema": "fast"})


def test_trainer_builds_the_selected_groups():
    from visar.train.trainer import build_optimizer

    model = RuledAE(width=8)
    for rule, n_decay in (("official", 1), ("legacy", 2)):  # official: enc.weight; legacy: enc + dec weights
        opt = build_optimizer(model, _cfg("runs/x", **{"optim.weight_decay_groups": rule}))
        assert [len(g["params"]) for g in opt.param_groups] == [n_decay, 6 - n_decay]


def test_runs_from_before_the_key_resume_with_legacy_groups(tmp_path):
    from visar.train import checkpoint as ckpt
    from visar.train.trainer import CheckpointMismatch, train
    from visar.utils.io import load_safetensors

    full = tmp_path / "full"
    train(_cfg(full, **{"optim.weight_decay_groups": "legacy"}))
    old = tmp_path / "old"
    train(_cfg(old, **{"optim.weight_decay_groups": "legacy", "train.steps": 2}))
    meta_path = old / "checkpoints" / ckpt.step_dir_name(2) / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["optim"]["weight_decay_groups"]  # as written before the key existed
    meta_path.write_text(json.dumps(meta))
    train(_cfg(old))  # the default (official) would group differently: resumes with legacy
    last = old / "checkpoints" / ckpt.step_dir_name(4)
    assert json.loads((last / "meta.json").read_text())["config"]["optim"]["weight_decay_groups"] == "legacy"
    a = load_safetensors(full / "checkpoints" / ckpt.step_dir_name(4) / "model.safetensors")
    b = load_safetensors(last / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointMismatch, match="weight_decay_groups=legacy"):
        train(_cfg(old, **{"train.steps": 6}))
