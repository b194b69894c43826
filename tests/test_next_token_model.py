"""NextTokenGenerator on random tiny models: cache semantics, training loss, save/load, bad inputs."""
from __future__ import annotations

import types

import pytest
import torch

from visar.generators.base import Condition
from visar.generators.next_token.llamagen import NextTokenGenerator


def tiny(seed: int = 0, **kw) -> NextTokenGenerator:
    """A random ~0.1M-parameter model with a non-zero logits head (LlamaGen starts the head at zero)."""
    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, dim=64, depth=2, num_heads=2, grid_size=4, num_classes=5)
    cfg.update(kw)
    m = NextTokenGenerator(**cfg).eval()
    with torch.no_grad():
        torch.nn.init.normal_(m.head.weight, std=0.3)
        for blk in m.trunk.blocks:  # larger weights than the 0.02 init so the logits depend on the context
            torch.nn.init.normal_(blk.attn.qkv.weight, std=0.2)
            torch.nn.init.normal_(blk.mlp.w2.weight, std=0.2)
    return m


def tiny_text(seed: int = 0) -> NextTokenGenerator:
    return tiny(seed, caption_dim=16, cls_token_num=8)


def text_cond(B: int, valid: list[int], T: int = 8, D: int = 16, seed: int = 1) -> Condition:
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(B, T, D, generator=g)
    mask = torch.zeros(B, T)
    for b, n in enumerate(valid):
        mask[b, T - n:] = 1
    return Condition(text=text * mask[..., None], text_mask=mask)


def random_tokens(B: int, L: int = 16, V: int = 64, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("text", [False, True])
def test_cached_logits_equal_teacher_forced(text):
    m = tiny_text() if text else tiny()
    cond = text_cond(3, [2, 5, 8]) if text else Condition.of([0, 3, 4])
    tokens = random_tokens(3)
    tf = torch.cat([m(tokens, cond), m(tokens, m.null_condition(cond))])  # [2B, L, V]
    # one token per call
    state, first = m.start(cond, guided=True)
    per_token = [first] + [m.step(state, tokens[:, t:t + 1], t)[:, 0] for t in range(15)]
    torch.testing.assert_close(torch.stack(per_token, 1), tf, atol=1e-5, rtol=1e-5)
    # all tokens in one call (a speculative verify pass)
    state, first = m.start(cond, guided=True)
    many = torch.cat([first[:, None], m.step(state, tokens[:, :15], 0)], 1)
    torch.testing.assert_close(many, tf, atol=1e-5, rtol=1e-5)
    assert state.token_lengths.tolist() == [15] * 6


@torch.no_grad()
def test_rewind_then_restep_gives_same_logits():
    m = tiny()
    cond = Condition.of([1, 2])
    tokens, other = random_tokens(2, seed=3), random_tokens(2, seed=4)
    state, _ = m.start(cond, guided=True)
    ref = m.step(state, tokens[:, :8], 0)  # [4, 8, V]
    m.rewind(state, 5)
    assert state.token_lengths.tolist() == [3] * 4
    # overwrite positions 3..7 with other tokens, roll back again, then re-feed the original ones
    m.step(state, other[:, 3:8], 3)
    m.rewind(state, 5)
    again = m.step(state, tokens[:, 3:8], 3)
    torch.testing.assert_close(again, ref[:, 3:8], atol=1e-5, rtol=1e-5)
    # rolling back by a smaller pos also works without rewind()
    once_more = m.step(state, tokens[:, 5:8], 5)
    torch.testing.assert_close(once_more, ref[:, 5:8], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_per_row_positions_are_independent():
    """Rows at different positions in one call give the same logits as when run alone."""
    m = tiny()
    cond = Condition.of([0, 4])
    tokens = random_tokens(2, seed=5)
    state, _ = m.start(cond)  # no CFG: R = B
    m.step(state, tokens[:, :6], 0)
    m.rewind(state, torch.tensor([0, 3]))  # row 0 holds 6 tokens, row 1 holds 3
    fed = torch.stack([tokens[0, 6:8], tokens[1, 3:5]])
    ragged = m.step(state, fed, torch.tensor([6, 3]))
    full = m(tokens, cond)
    torch.testing.assert_close(ragged[0], full[0, 7:9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ragged[1], full[1, 4:6], atol=1e-5, rtol=1e-5)
    assert state.token_lengths.tolist() == [8, 5]


@torch.no_grad()
def test_static_attention_over_whole_cache_matches_prefix():
    """The compile-friendly path (attend to every cache slot, masked by position) equals the eager one."""
    m = tiny()
    state, _ = m.start(Condition.of([2]))
    tokens = random_tokens(1, seed=6)
    a = m.decode_step(state, tokens[:, :4], torch.tensor([0]), attend_len=None)
    m.rewind(state, 4)
    b = m.decode_step(state, tokens[:, :4], torch.tensor([0]), attend_len=1 + 4)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_loss_and_label_dropout():
    m = tiny().train()
    tokens = random_tokens(4).view(4, 4, 4)
    cond = Condition.of([0, 1, 2, 3])
    loss = m.loss(tokens, cond, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert m.tok_embed.weight.grad is not None and m.cond_embed.embedding_table.weight.grad is not None
    # the same generator seed gives the same dropout pattern; drop_prob=1 uses only the null class
    m.zero_grad()
    m.loss(tokens, cond, generator=torch.Generator().manual_seed(0), drop_prob=1.0).backward()
    grad = m.cond_embed.embedding_table.weight.grad
    assert grad[:5].abs().sum() == 0 and grad[5].abs().sum() > 0
    m.eval()
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(m(tokens.flatten(1), cond).flatten(0, 1), tokens.flatten())
        torch.testing.assert_close(m.loss(tokens, cond), expected)


def test_text_loss_caption_dropout():
    m = tiny_text().train()
    cond = text_cond(2, [3, 8])
    m.loss(random_tokens(2), cond, generator=torch.Generator().manual_seed(0), drop_prob=1.0).backward()
    assert m.cond_embed.proj.fc1.weight.grad is not None


def test_save_load_round_trip(tmp_path):
    for m in (tiny(), tiny_text()):
        m.save_pretrained(tmp_path / type(m).__name__ / str(m.text_conditional))
        back = NextTokenGenerator.from_pretrained(tmp_path / type(m).__name__ / str(m.text_conditional)).eval()
        assert back.config == m.config
        cond = text_cond(2, [3, 8]) if m.text_conditional else Condition.of([1, 2])
        tokens = random_tokens(2)
        with torch.no_grad():
            torch.testing.assert_close(back(tokens, cond), m(tokens, cond), atol=0, rtol=0)


def test_presets_build_and_tiny_runs():
    from visar import zoo

    names = zoo.list_models("llamagen-gpt-*")
    assert {"llamagen-gpt-b", "llamagen-gpt-l", "llamagen-gpt-xl", "llamagen-gpt-xxl", "llamagen-gpt-3b",
            "llamagen-gpt-xl-t2i", "llamagen-gpt-tiny"} <= set(names)
    for name in names:
        preset = zoo.get_preset(name)
        assert preset.paper
        if name != "llamagen-gpt-tiny":
            assert {"cfg_scale", "top_k", "image_size", "source"} <= set(preset.eval)
    g = zoo.create("llamagen-gpt-tiny")
    assert sum(p.numel() for p in g.parameters()) < 1_000_000
    out = g.sample(Condition.of([1, 2]), generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 4, 4) and out.dtype == torch.long


# ------------------------------------------------------------------------------------ bad inputs
def test_bad_class_ids():
    m = tiny()
    for bad in ([5], [-1], [0, 7]):
        with pytest.raises(ValueError, match=r"\[0, 5\)"):
            m.sample(Condition.of(bad))
    with pytest.raises(ValueError, match="class-conditional"):
        m.sample(text_cond(1, [3], D=64))


def test_bad_text_features():
    m = tiny_text()
    with pytest.raises(ValueError, match="caption features must be"):
        m.sample(text_cond(1, [3], D=12))
    with pytest.raises(ValueError, match="at most 8"):
        m.sample(text_cond(1, [3], T=9))
    with pytest.raises(ValueError, match="text-conditional"):
        m.sample(Condition.of([1]))


def test_bad_tokens():
    m = tiny()
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        m(torch.full((1, 16), 64), Condition.of([0]))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        m.loss(torch.full((1, 4, 4), -1), Condition.of([0]))
    with pytest.raises(TypeError):
        m(torch.zeros(1, 16), Condition.of([0]))
    with pytest.raises(ValueError, match="exceed"):
        m(torch.zeros(1, 17, dtype=torch.long), Condition.of([0]))
    state, _ = m.start(Condition.of([0]))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        m.step(state, torch.full((1, 1), 99), 0)
    with pytest.raises(ValueError, match="skip"):
        m.step(state, torch.zeros(1, 1, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="rewind"):
        m.rewind(state, 1)


def test_tokenizer_mismatch():
    m = tiny()
    m.check_tokenizer(types.SimpleNamespace(kind="discrete", vocab_size=64))
    with pytest.raises(ValueError, match="64"):
        m.check_tokenizer(types.SimpleNamespace(kind="discrete", vocab_size=256))
    with pytest.raises(ValueError, match="continuous"):
        m.check_tokenizer(types.SimpleNamespace(kind="continuous", vocab_size=None))


@pytest.mark.parametrize("opts, match", [
    (dict(cfg_scale=-1.0), "cfg_scale"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(temperature=0.0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(cfg_interval=-2), "cfg_interval"),
])
def test_bad_sampling_options(opts, match):
    with pytest.raises(ValueError, match=match):
        tiny().sample(Condition.of([0]), **opts)


def test_nan_logits_raise():
    m = tiny()
    with torch.no_grad():
        m.head.weight[3, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        m.sample(Condition.of([0]))


class _SpeculativeAdapter:
    """The toy-model protocol of docs/design/samplers.md section 4, bridged onto the step interface."""

    def __init__(self, model: NextTokenGenerator):
        self.model = model

    def forward(self, tokens, labels):  # [B, T] -> [B, T + 1, V]
        pad = torch.zeros_like(tokens[:, :1])
        return self.model(torch.cat([tokens, pad], 1), Condition.of(labels))

    def new_cache(self, batch):
        return {"batch": batch}

    def prefill(self, labels, cache):  # -> [B, V]
        cache["state"], logits = self.model.start(Condition.of(labels))
        return logits

    def extend(self, tokens, cache, pos):  # [B, n] at per-row pos -> [B, n, V]; smaller pos = rollback
        return self.model.step(cache["state"], tokens, pos)


@torch.no_grad()
def test_speculative_protocol_adapter():
    m = _SpeculativeAdapter(tiny())
    labels = torch.tensor([0, 3])
    tokens = random_tokens(2, L=9, seed=8)
    full = m.forward(tokens[:, :8], labels)  # [2, 9, V]
    cache = m.new_cache(2)
    torch.testing.assert_close(m.prefill(labels, cache), full[:, 0], atol=1e-5, rtol=1e-5)
    draft = random_tokens(2, L=5, seed=9)
    m.extend(draft, cache, torch.tensor([0, 0]))  # a rejected draft of 5 tokens
    # roll row 0 back to 0 and row 1 back to 2 (row 1 keeps the first two drafted tokens)
    tokens[1, :2] = draft[1, :2]
    full = m.forward(tokens[:, :8], labels)
    ragged = m.extend(torch.stack([tokens[0, 0:3], tokens[1, 2:5]]), cache, torch.tensor([0, 2]))
    torch.testing.assert_close(ragged[0], full[0, 1:4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ragged[1], full[1, 3:6], atol=1e-5, rtol=1e-5)
