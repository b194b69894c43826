"""Official LlamaGen GPT checkpoints -> NextTokenGenerator (visar.convert.llamagen.load_generator)."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from visar.convert.common import CheckpointError
from visar.convert.llamagen import gpt_state_to_official, load_generator
from visar.generators.base import Condition
from visar.generators.next_token.llamagen import NextTokenGenerator

OFFICIAL_PRESETS = {
    "llamagen-gpt-b": "GPT-B c2i", "llamagen-gpt-l": "GPT-L c2i", "llamagen-gpt-xl": "GPT-XL c2i",
    "llamagen-gpt-xxl": "GPT-XXL c2i", "llamagen-gpt-3b": "GPT-3B c2i", "llamagen-gpt-xl-t2i": "GPT-XL t2i",
}


def tiny_official(text: bool = False) -> tuple[NextTokenGenerator, dict]:
    torch.manual_seed(0)
    kw = dict(caption_dim=16, cls_token_num=8) if text else dict(num_classes=5)
    m = NextTokenGenerator(vocab_size=64, dim=64, depth=2, num_heads=2, grid_size=4, **kw).eval()
    torch.nn.init.normal_(m.head.weight, std=0.3)
    return m, gpt_state_to_official(m.state_dict())


@pytest.mark.parametrize("preset", sorted(OFFICIAL_PRESETS))
def test_preset_matches_official_manifest(preset, fixtures):
    from visar import zoo

    manifest = json.loads((fixtures("llamagen") / "manifest_official.json").read_text())
    arch = manifest["architectures"][OFFICIAL_PRESETS[preset]]
    with torch.device("meta"):
        model = zoo.create(preset)
    ours = {k: list(v.shape) for k, v in gpt_state_to_official(model.state_dict()).items()}
    theirs = {name: shape for name, shape, _ in arch["state_dict"]}
    assert ours == theirs
    assert model.trunk.head_dim == arch["head_dim"]
    assert model.trunk.blocks[0].mlp.w1.out_features == arch["ffn_hidden"]
    assert sum(p.numel() for p in model.parameters()) == arch["n_params"]


@pytest.mark.parametrize("container", ["model", "module", "state_dict", None])
def test_containers_and_detection(tmp_path, container):
    m, state = tiny_official()
    state = dict(state, freqs_cis=torch.zeros(17, 16, 2))  # ignored
    path = tmp_path / "c2i_T_64.pt"
    torch.save(state if container is None else {container: state}, path)
    g = load_generator(path, grid_size=4, num_heads=2)  # width 64 is not in the official width table
    assert (g.config["depth"], g.config["dim"], g.config["vocab_size"], g.num_classes) == (2, 64, 64, 5)
    assert not g.training
    tokens = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(g(tokens, Condition.of([1, 4])), m(tokens, Condition.of([1, 4])), atol=0, rtol=0)


def test_text_model_and_grid_from_file_name(tmp_path):
    m, state = tiny_official(text=True)
    path = tmp_path / "t2i_T_stage1_64.safetensors"
    from safetensors.torch import save_file

    save_file(state, str(path))
    g = load_generator(path, grid_size=4, num_heads=2)
    assert g.text_conditional and g.caption_dim == 16 and g.cls_token_num == 8
    torch.testing.assert_close(g.cond_embed.uncond_embedding, m.cond_embed.uncond_embedding)
    # grid from the file name: _384 -> 24x24 tokens (ds16); explicit override wins
    big = tmp_path / "c2i_T_384.pt"
    torch.save({"model": tiny_official()[1]}, big)
    assert load_generator(big).grid_size == 24
    assert load_generator(big, grid_size=8).grid_size == 8


def test_heads_from_official_width_table():
    from visar.convert.llamagen import detect_gpt_config

    state = {"tok_embeddings.weight": torch.empty(16384, 3200, device="meta"),
             "output.weight": torch.empty(16384, 3200, device="meta"),
             "layers.0.feed_forward.w1.weight": torch.empty(8704, 3200, device="meta"),
             "layers.23.attention.wqkv.weight": torch.empty(9600, 3200, device="meta"),
             "cls_embedding.embedding_table.weight": torch.empty(1001, 3200, device="meta")}
    cfg = detect_gpt_config(state)
    assert cfg == dict(vocab_size=16384, dim=3200, depth=24, num_heads=32, num_classes=1000, cls_token_num=1)


def test_other_family_is_refused(tmp_path):
    var_like = {"word_embed.weight": torch.zeros(4, 4), "blocks.0.attn.mat_qkv.weight": torch.zeros(12, 4)}
    torch.save({"model": var_like}, tmp_path / "var.pt")
    with pytest.raises(CheckpointError, match="not a LlamaGen GPT"):
        load_generator(tmp_path / "var.pt")
    vq_like = {"encoder.conv_in.weight": torch.zeros(1), "quantize.embedding.weight": torch.zeros(1)}
    torch.save({"model": vq_like}, tmp_path / "vq.pt")
    with pytest.raises(CheckpointError, match="load_tokenizer"):
        load_generator(tmp_path / "vq.pt")


def test_truncated_and_pickled_files(tmp_path):
    _, state = tiny_official()
    path = tmp_path / "full.pt"
    torch.save({"model": state}, path)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_generator(tmp_path / "cut.pt")
    torch.save({"model": state, "args": argparse.Namespace(gpt_model="GPT-B")}, tmp_path / "train.pt")
    with pytest.raises(CheckpointError, match="pickled"):
        load_generator(tmp_path / "train.pt")


def test_shape_mismatch_is_reported(tmp_path):
    _, state = tiny_official()
    torch.save({"model": state}, tmp_path / "c2i.pt")
    with pytest.raises(CheckpointError, match="shape"):
        load_generator(tmp_path / "c2i.pt", num_heads=4, ffn_hidden=128)
