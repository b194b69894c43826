"""Distilled Decoding students: initialised from the teacher, causal like the teacher map; the loss falls."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visar import zoo
from visar.conditions import Condition
from visar.data.distill_shards import DistillShards
from visar.generators.base import Generator
from visar.generators.next_token.distilled import DistilledNextToken, student_from_teacher
from visar.pipeline import Pipeline
from visar.train.config import ConfigError, load_config
from visar.train.distill_data import make_distill_data
from visar.train.tasks import DistillTask, make_task


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.manual_seed(0)
    gen = zoo.create("llamagen-gpt-tiny", num_classes=3)
    torch.nn.init.normal_(gen.head.weight, std=0.5)
    d = tmp_path_factory.mktemp("teacher")
    Pipeline(zoo.create("llamagen-vq-tiny"), gen).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def pairs_dir(teacher_dir, tmp_path_factory):
    """A few hundred teacher pairs of the tiny teacher (no guidance)."""
    d = tmp_path_factory.mktemp("pairs")
    make_distill_data(teacher_dir, d, 256, shard_size=128, batch_size=128, progress=False)
    return str(d)


SMALL = {"dim": 32, "depth": 1, "num_heads": 2}


def _noise(B, seed=0, L=16, C=8):
    return torch.randn(B, L, C, generator=torch.Generator().manual_seed(seed))


def test_student_starts_from_the_teacher(teacher_dir):
    pipe = Pipeline.from_pretrained(teacher_dir)
    teacher, cb = pipe.generator, pipe.tokenizer.codebook()
    s = student_from_teacher(teacher_dir, [0, 8])
    assert (s.vocab_size, s.codebook_dim, s.num_tokens, s.num_classes, s.timesteps) == (256, 8, 16, 3, [0, 8])
    for part in ("trunk", "head", "cond_embed"):
        mine, theirs = getattr(s, part).state_dict(), getattr(teacher, part).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), part
    assert torch.equal(s.codebook, cb)
    assert torch.equal(s.indicator.weight, torch.zeros_like(s.indicator.weight))
    # in_proj is the least-squares fit of the teacher's token embeddings from the codebook vectors: the residual
    # is orthogonal to the inputs (normal equations)
    a = torch.cat([cb, torch.ones(256, 1)], 1).double()
    resid = (s.in_proj(cb) - teacher.tok_embed.weight).double().detach()
    assert (a.T @ resid).abs().max() < 1e-3 * resid.abs().sum()
    assert resid.norm() < (teacher.tok_embed.weight - teacher.tok_embed.weight.mean(0)).norm()


def test_the_student_sees_what_the_teacher_map_sees(teacher_dir):
    """Token i's logits depend on the label, positions < i and its own input only (causal, like the map)."""
    s = student_from_teacher(teacher_dir, [0])
    cond = Condition.of([1, 2])
    noise = _noise(2)
    x, data = s.input_state(noise)
    assert torch.equal(x, noise) and not data.any()
    base = s(x, cond, data)
    assert base.shape == (2, 16, 256) and base.dtype == torch.float32
    y = noise.clone()
    y[:, 9] += 1.0
    moved = s(y, cond, data)
    assert torch.equal(moved[:, :9], base[:, :9]) and not torch.allclose(moved[:, 9], base[:, 9])
    assert not torch.allclose(s(x, Condition.of([0, 2]), data)[0, 0], base[0, 0])  # the label reaches position 0


def test_input_states_and_the_loss_over_noise_positions(teacher_dir):
    s = student_from_teacher(teacher_dir, [0, 8])
    noise = _noise(3, seed=1)
    tokens = torch.randint(256, (3, 16), generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 8, 15])
    x, data = s.input_state(noise, tokens, t)
    for r in range(3):
        k = int(t[r])
        assert data[r, :k].all() and not data[r, k:].any()
        assert torch.equal(x[r, :k], s.codebook[tokens[r, :k]]) and torch.equal(x[r, k:], noise[r, k:])
    cond = Condition.of([0, 1, 2])
    out = s.training_loss(noise, tokens.view(3, 4, 4), cond, t=t)
    logits = s(x, cond, data)
    keep = ~data
    assert torch.allclose(out["loss"], F.cross_entropy(logits[keep], tokens[keep]))
    assert out["loss"].requires_grad and set(out) == {"loss", "ce", "acc"}
    assert torch.allclose(s.loss(tokens, cond, noise=noise, t=t), out["loss"])
    # drawn states come from the student's timesteps, from the given generator
    drawn = s.draw_timesteps(1000, torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 8}
    assert torch.equal(drawn, s.draw_timesteps(1000, torch.Generator().manual_seed(0)))


def test_regression_head_adds_its_loss(teacher_dir):
    s = student_from_teacher(teacher_dir, [0], regression_weight=0.5)
    noise, tokens, cond = _noise(2), torch.randint(256, (2, 16)), Condition.of([0, 1])
    out = s.training_loss(noise, tokens, cond, t=0)
    assert set(out) == {"loss", "ce", "acc", "mse"}
    assert torch.allclose(out["loss"], out["ce"] + 0.5 * out["mse"])
    assert s(noise, cond, torch.zeros(2, 16, dtype=torch.bool), return_regression=True)[1].shape == (2, 16, 8)


@pytest.mark.parametrize("call, match", [
    (lambda s: s.training_loss(_noise(2, C=4), torch.zeros(2, 16, dtype=torch.long), Condition.of([0, 1])),
     r"noise must be a float tensor \[B, 16, 8\]"),
    (lambda s: s.training_loss(_noise(2), torch.zeros(2, 15, dtype=torch.long), Condition.of([0, 1])),
     "tokens must be"),
    (lambda s: s.training_loss(_noise(2), torch.full((2, 16), 256), Condition.of([0, 1])), r"\[0, 256\)"),
    (lambda s: s.training_loss(_noise(2), torch.zeros(2, 16, dtype=torch.long), Condition.of([0, 3])), "class ids"),
    (lambda s: s.training_loss(_noise(2), torch.zeros(2, 16, dtype=torch.long), Condition.of([0, 1]), t=16), "< 16"),
    (lambda s: s.loss(torch.zeros(2, 16, dtype=torch.long), Condition.of([0, 1])), "noise="),
    (lambda s: s.input_state(_noise(2), None, 4), "tokens are needed"),
    (lambda s: DistilledNextToken(vocab_size=256, grid_size=4, **SMALL, timesteps=[4]), "must contain 0"),
    (lambda s: DistilledNextToken(vocab_size=256, grid_size=4, **SMALL, timesteps=[0, 16]), r"\[0, 16\)"),
    (lambda s: DistilledNextToken(vocab_size=256, grid_size=4, **SMALL)(_noise(1), Condition.of([0]),
                                                               torch.zeros(1, 16, dtype=torch.bool)), "no codebook"),
    (lambda s: DistilledNextToken.from_teacher(zoo.create("llamagen-gpt-tiny"), torch.randn(255, 8)),
     "codebook must be"),
    (lambda s: DistilledNextToken.from_teacher(zoo.create("llamagen-gpt-tiny"), torch.randn(256, 8), depth=3),
     "architecture is the teacher's"),
])
def test_bad_inputs_are_named(teacher_dir, call, match):
    s = student_from_teacher(teacher_dir, [0])
    with pytest.raises((ValueError, TypeError), match=match):
        call(s)


def test_save_load_and_the_tokenizer_check(teacher_dir, tmp_path):
    s = student_from_teacher(teacher_dir, [0, 4]).eval()
    s.save_pretrained(tmp_path, "distill")
    back = Generator.from_pretrained(tmp_path, "distill")
    assert isinstance(back, DistilledNextToken) and back.timesteps == [0, 4]
    x, cond, data = _noise(2), Condition.of([0, 2]), torch.zeros(2, 16, dtype=torch.bool)
    assert torch.equal(back(x, cond, data), s(x, cond, data))
    tok = Pipeline.from_pretrained(teacher_dir).tokenizer
    Pipeline(tok, back)  # its own tokenizer pairs
    torch.manual_seed(5)
    other = zoo.create("llamagen-vq-tiny")  # same size, other codebook
    with pytest.raises(ValueError, match="distilled for another tokenizer"):
        Pipeline(other, back)


def test_the_loss_falls_on_a_toy(pairs_dir, teacher_dir):
    """~50 AdamW steps on 256 teacher pairs: the distillation loss falls clearly (one- and two-step states)."""
    data = DistillShards(pairs_dir)
    torch.manual_seed(0)
    student = student_from_teacher(teacher_dir, [0, 8])
    data.check_student(student)
    task = make_task("distill", student)
    assert isinstance(task, DistillTask)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(50):
        idx = torch.randint(len(data), (32,), generator=g)
        batch = {"noise": data.noise[idx], "tokens": data.tokens[idx], "label": data.labels[idx]}
        out = task(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)


def test_task_and_config_checks(pairs_dir, tmp_path):
    with pytest.raises(TypeError, match="not a distilled student"):
        make_task("distill", zoo.create("llamagen-gpt-tiny"))
    with pytest.raises(ValueError, match="no noise"):
        task = DistillTask(DistilledNextToken(vocab_size=256, grid_size=4, **SMALL))
        task({"tokens": torch.zeros(1, 16), "label": [0]})
    for name in ("configs/shapes_distill_one.yaml", "configs/shapes_distill_two.yaml"):
        cfg = load_config(name, [f"data.path={pairs_dir}"])
        assert cfg.task == "distill" and cfg.data.kind == "distill_shards"
    with pytest.raises(ConfigError, match="visar distill-data"):
        load_config("configs/shapes_distill_one.yaml", [f"data.path={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match="task=distill trains on teacher pairs"):
        load_config("configs/shapes_distill_one.yaml", ["data.kind=shapes"])
    with pytest.raises(ConfigError, match="task=distill trains on teacher pairs"):
        load_config("configs/shapes_distill_one.yaml", [f"data.path={pairs_dir}", "task=generator",
                                                         f"tokenizer.path={tmp_path}"])
