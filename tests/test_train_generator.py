"""Tokenizer -> generator -> Pipeline through the trainer, with on-the-fly tokens and a token cache."""
import pytest
import torch

from visar.data.shapes import ShapesDataset
from visar.data.token_cache import build_token_cache
from visar.pipeline import Pipeline
from visar.tokenizers.base import Tokenizer
from visar.train.config import load_config
from visar.train.trainer import train

VQ = {"cls": "visar.tokenizers.vq:VQTokenizer",
      "kwargs": {"codebook_size": 16, "codebook_embed_dim": 4, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                 "z_channels": 32}}
GPT = {"cls": "visar.generators.next_token.llamagen:NextTokenGenerator",
       "kwargs": {"vocab_size": 16, "dim": 32, "depth": 1, "num_heads": 2, "grid_size": 4, "num_classes": 10}}
LOOP = {"steps": 2, "batch_size": 4, "log_every": 1, "progress": False, "threads": 1}


@pytest.fixture(scope="module")
def vq_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("vq")
    cfg = load_config(None, [], data={"task": "tokenizer", "model": VQ, "data": {"kind": "shapes", "size": 8},
                                      "train": {**LOOP, "output_dir": str(out)}})
    return train(cfg)


def test_generator_trains_on_the_fly_and_exports_a_pipeline(vq_export, tmp_path):
    out = tmp_path / "gpt"
    cfg = load_config(None, [], data={
        "task": "generator", "model": GPT, "tokenizer": {"path": str(vq_export)},
        "data": {"kind": "shapes", "size": 8}, "sample": {"labels": [0, 1], "per_label": 1},
        "train": {**LOOP, "output_dir": str(out), "sample_every": 2}})
    export = train(cfg)
    assert (out / "samples" / "step_00000002.png").is_file()
    pipe = Pipeline.from_pretrained(export)
    a = pipe.generate([1, 2], seed=0)
    b = pipe.generate([1, 2], seed=0)
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, b)


def test_generator_trains_on_a_token_cache(vq_export, tmp_path):
    tok = Tokenizer.from_pretrained(vq_export, "tokenizer")
    cache = build_token_cache(tok, ShapesDataset(size=8, length=16), tmp_path / "cache", batch_size=8,
                              shard_size=8, progress=False)
    cfg = load_config(None, [], data={
        "task": "generator", "model": GPT, "tokenizer": {"path": str(vq_export)},
        "data": {"kind": "token_cache", "path": str(cache), "flip": True},
        "train": {**LOOP, "output_dir": str(tmp_path / "gpt")}})
    export = train(cfg)
    assert (export / "generator" / "model.safetensors").is_file() and (export / "pipeline.json").is_file()


def test_generator_trains_with_oversampled_classes_of_a_token_cache(vq_export, tmp_path):
    from visar.data.label_repeat import LabelRepeat
    from visar.train.trainer import build_dataset

    tok = Tokenizer.from_pretrained(vq_export, "tokenizer")
    cache = build_token_cache(tok, ShapesDataset(size=8, length=20), tmp_path / "cache", batch_size=10,
                              progress=False)
    data = {"kind": "token_cache", "path": str(cache), "flip": True, "label_repeat": {6: 3, 8: 2}}
    cfg = load_config(None, [], data={"task": "generator", "model": GPT, "tokenizer": {"path": str(vq_export)},
                                      "data": data, "train": {**LOOP, "output_dir": str(tmp_path / "gpt")}})
    ds = build_dataset(cfg.data)
    assert isinstance(ds, LabelRepeat) and len(ds) == 40 + 2 * 2 * 2 + 2 * 2 * 1  # items 6, 16 (+ mirrors) x3
    labels = ds.item_labels()
    assert [(labels == c).sum().item() for c in range(10)] == [4, 4, 4, 4, 4, 4, 12, 4, 8, 4]
    base = ds.dataset
    for i in range(len(ds)):
        item = ds[i]
        assert item["label"] == labels[i]
        assert torch.equal(item["tokens"], base[int(ds.positions[i])]["tokens"])
    export = train(cfg)
    assert (export / "generator" / "model.safetensors").is_file()
