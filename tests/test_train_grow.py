"""Growing a trained generator deeper (``model.init_deepen``): the deeper model starts as the same
function, its new blocks sit where the docs say, and bad settings say what to do."""
import pytest
import torch

from visar.generators.base import Condition
from visar.generators.next_token.llamagen import NextTokenGenerator
from visar.train.config import ConfigError, ModelConfig, TrainConfig, load_config
from visar.train.grow import block_depth, deepen_state
from visar.train.trainer import init_and_freeze
from visar.utils.io import save_safetensors

KW = {"vocab_size": 32, "dim": 32, "num_heads": 2, "grid_size": 4, "num_classes": 3}
ZERO = ["attn.proj.weight", "mlp.w2.weight"]


def _trained(depth: int) -> NextTokenGenerator:
    torch.manual_seed(0)
    g = NextTokenGenerator(depth=depth, **KW)
    with torch.no_grad():  # non-zero everywhere, unlike a fresh init's zeroed parts
        for p in g.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return g.eval()


def test_deepened_model_is_the_same_function(tmp_path):
    small = _trained(2)
    path = tmp_path / "small.safetensors"
    save_safetensors(small.state_dict(), path)
    cfg = TrainConfig(model=ModelConfig(cls="x:y", init_from=str(path),
                                        init_deepen={"blocks": "trunk.blocks", "zero": ZERO}))
    big = init_and_freeze(NextTokenGenerator(depth=5, **KW), cfg).eval()
    assert block_depth(big.state_dict(), "trunk.blocks") == 5
    tokens, labels = torch.randint(0, 32, (6, 4, 4)), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(big.loss(tokens, Condition(labels=labels)),
                                   small.loss(tokens, Condition(labels=labels)), rtol=1e-6, atol=1e-6)
        a = small.sample(Condition(labels=labels), generator=torch.Generator().manual_seed(3), cfg_scale=2.0)
        b = big.sample(Condition(labels=labels), generator=torch.Generator().manual_seed(3), cfg_scale=2.0)
    assert torch.equal(a, b)
    # 2 -> 5: old blocks at floor(i * 5 / 2) = 0, 2; new 1 copies old 0, new 3 and 4 copy old 1
    s, b_state = small.state_dict(), big.state_dict()
    for new, old in ((0, 0), (1, 0), (2, 1), (3, 1), (4, 1)):
        for name in ("attn.qkv.weight", "mlp.w1.weight", "attn_norm.weight"):
            assert torch.equal(b_state[f"trunk.blocks.{new}.{name}"], s[f"trunk.blocks.{old}.{name}"])
        fresh = new in (1, 3, 4)
        for name in ZERO:
            assert bool(b_state[f"trunk.blocks.{new}.{name}"].abs().sum() == 0) == fresh, (new, name)
    # the new blocks learn: their zeroed projections get a gradient
    big.train()
    big.loss(tokens, Condition(labels=labels)).backward()
    assert big.trunk.blocks[1].attn.proj.weight.grad.abs().sum() > 0


def test_deepen_errors_say_what_to_do(tmp_path):
    state = _trained(3).state_dict()
    with pytest.raises(ValueError, match="needs more blocks"):
        deepen_state(state, 3, "trunk.blocks", ZERO)
    with pytest.raises(ValueError, match="not parameters of trunk.blocks.0.*attn.proj.weight"):
        deepen_state(state, 4, "trunk.blocks", ["attn.out.weight"])
    with pytest.raises(ValueError, match="must list the block parameters"):
        deepen_state(state, 4, "trunk.blocks", [])
    with pytest.raises(ValueError, match="no parameters named layers"):
        deepen_state(state, 4, "layers", ZERO)
    base = {"task": "classifier", "model": {"cls": "visar.eval.classifier:ShapesClassifier"},
            "data": {"kind": "shapes", "size": 16}, "train": {"steps": 2}}
    with pytest.raises(ConfigError, match="init_deepen needs model.init_from"):
        load_config(None, ["model.init_deepen={blocks: trunk.blocks, zero: [mlp.w2.weight]}"], data=base)
    path = tmp_path / "w.safetensors"
    save_safetensors(state, path)
    with pytest.raises(ConfigError, match="model.init_deepen must be"):
        load_config(None, [f"model.init_from={path}", "model.init_deepen={blocks: trunk.blocks}"], data=base)


def test_init_exclude_starts_a_text_model_from_a_class_model(tmp_path):
    """``model.init_exclude``: the trunk, token embedding and head load from a class-conditioned model, the
    caption projection keeps the new model's own initialisation, and a wrong prefix is named."""
    cls_model = _trained(2)
    path = tmp_path / "cls.safetensors"
    save_safetensors(cls_model.state_dict(), path)
    text_kw = {k: v for k, v in KW.items() if k != "num_classes"}
    torch.manual_seed(1)
    fresh = NextTokenGenerator(depth=2, caption_dim=8, cls_token_num=3, **text_kw)
    own = {k: v.clone() for k, v in fresh.state_dict().items()}
    cfg = TrainConfig(model=ModelConfig(cls="x:y", init_from=str(path), init_exclude=["cond_embed"]))
    text = init_and_freeze(fresh, cfg)
    state, src = text.state_dict(), cls_model.state_dict()
    for name, value in state.items():
        expected = own[name] if name.startswith("cond_embed.") else src[name]
        assert torch.equal(value, expected), name
    with pytest.raises(ValueError, match="init_exclude prefix 'cond_emb'.*top-level groups"):
        init_and_freeze(NextTokenGenerator(depth=2, caption_dim=8, cls_token_num=3, **text_kw),
                        TrainConfig(model=ModelConfig(cls="x:y", init_from=str(path), init_exclude=["cond_emb"])))
    # without the exclusion the class embedding does not fit: the strict load says so
    with pytest.raises(Exception, match="cond_embed"):
        init_and_freeze(NextTokenGenerator(depth=2, caption_dim=8, cls_token_num=3, **text_kw),
                        TrainConfig(model=ModelConfig(cls="x:y", init_from=str(path))))
