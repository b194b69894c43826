"""Every xAR entity type trains on the shapes dataset through the shared trainer (tokens from a KL
tokenizer trained by the same trainer), exports a Pipeline folder and samples images from it."""
from __future__ import annotations

import pytest
import torch

from test_kl_training import SMALL_VAE
from visar.train.config import load_config
from visar.train.trainer import train

# entity options on the 4 x 4 latent grid of SMALL_VAE at 16 px
ENTITY_OPTS = {"token": {}, "cell": {"cell": 2}, "subsample": {"stride": 2}, "scale": {"scales": [1, 2, 4]},
               "image": {}}


@pytest.fixture(scope="module")
def kl_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("kl")
    data = {"task": "tokenizer",
            "model": {"cls": "visar.tokenizers.kl:KLTokenizer",
                      "kwargs": {"vae_config": SMALL_VAE, "scale_factor": "auto"}},
            "data": {"kind": "shapes", "size": 16, "length": 32},
            "optim": {"lr": 1e-3, "warmup_steps": 1},
            "train": {"steps": 2, "batch_size": 8, "save_every": 0, "log_every": 100,
                      "output_dir": str(out / "run"), "progress": False}}
    return train(load_config(None, [], data=data))


@pytest.mark.parametrize("entity", sorted(ENTITY_OPTS))
def test_entity_trains_on_shapes_and_samples(entity, kl_export, tmp_path):
    from visar.pipeline import Pipeline

    kwargs = dict(num_classes=10, in_channels=4, latent_size=4, width=32, encoder_depth=1, decoder_depth=1,
                  num_heads=2, entity=entity, **ENTITY_OPTS[entity])
    data = {"task": "generator",
            "model": {"cls": "visar.generators.next_x.xar:NextXGenerator", "kwargs": kwargs},
            "tokenizer": {"path": str(kl_export)},
            "data": {"kind": "shapes", "size": 16, "length": 32},
            "optim": {"lr": 1e-3, "warmup_steps": 1},
            "train": {"steps": 2, "batch_size": 8, "save_every": 0, "log_every": 100, "sample_every": 2,
                      "output_dir": str(tmp_path / "run"), "progress": False},
            "sample": {"labels": [0, 1], "per_label": 1, "options": {"num_steps": 2, "cfg_scale": 1.5}}}
    export = train(load_config(None, [], data=data))
    assert (tmp_path / "run" / "samples" / "final.png").is_file()
    pipe = Pipeline.from_pretrained(export)
    assert pipe.generator.entity == entity
    images = pipe.generate(torch.tensor([3, 7]), seed=0)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
