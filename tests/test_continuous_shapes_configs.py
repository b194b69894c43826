"""configs/kl_shapes.yaml and the continuous generators trained on it: parse, sizes, compatibility."""
from __future__ import annotations

import inspect

import pytest
import torch

from visar.train.config import load_config
from visar.utils.config import resolve_class

GENERATORS = ["mar_shapes", "causal_shapes", "flowar_shapes"]


def _cls(cfg):
    return resolve_class(cfg.model.cls.replace(":", "."))


def _sampling_options(cls) -> set:
    """Options of the family's default sampler (or of its own ``sample`` if it still has one)."""
    from visar.generators.base import Generator
    from visar.registry import get

    if cls.sample is Generator.sample:
        return set(get("sampler", cls.default_sampler).defaults)
    return set(inspect.signature(cls.sample).parameters)


@pytest.fixture(scope="module")
def kl_tokenizer():
    cfg = load_config("configs/kl_shapes.yaml")
    assert cfg.task == "tokenizer" and cfg.train.output_dir == "runs/kl_shapes"
    assert cfg.data.kind == "shapes" and cfg.data.size == 32 and cfg.train.batch_size == 256
    tok = _cls(cfg)(**cfg.model.kwargs)
    assert 0.5e6 < sum(p.numel() for p in tok.parameters()) < 2e6
    return tok


def test_kl_shapes_tokenizer_shapes(kl_tokenizer):
    x = torch.zeros(2, 3, 32, 32)
    with torch.no_grad():
        z = kl_tokenizer.encode(x)
        assert z.shape == (2, 4, 8, 8) and kl_tokenizer.decode(z).shape == (2, 3, 32, 32)
    assert hasattr(kl_tokenizer, "latent_std")  # scale_factor: auto


@pytest.mark.parametrize("name", GENERATORS)
def test_generator_configs_match_the_tokenizer(name, kl_tokenizer, tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")  # the export may not exist yet: a stand-in folder
    cfg = load_config(f"configs/{name}.yaml", [f"tokenizer.path={tmp_path}"])
    assert cfg.task == "generator" and cfg.train.output_dir == f"runs/{name}"
    assert cfg.export_dir == f"runs/{name}/export" and cfg.train.batch_size == 256
    cls = _cls(cfg)
    torch.manual_seed(0)
    m = cls(**cfg.model.kwargs)
    assert 1e6 < sum(p.numel() for p in m.parameters()) < 4e6
    m.check_tokenizer(kl_tokenizer)  # channels, stride
    with torch.no_grad():  # the tokenizer's latents are what the model trains on
        tokens = kl_tokenizer.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    from visar.generators.base import Condition

    loss = m.loss(tokens, Condition(labels=torch.tensor([0, 9])))
    loss = loss["loss"] if isinstance(loss, dict) else loss
    assert loss.dim() == 0 and torch.isfinite(loss)
    accepted = _sampling_options(cls)
    assert set(cfg.sample.options) <= set(accepted), f"{name}: unknown sampling options"
