"""DistilledSampler: one and two student passes; shapes, determinism, the kept prefix, and named bad inputs."""
from __future__ import annotations

import pytest
import torch

from visar import zoo
from visar.conditions import Condition
from visar.generators.next_token.distilled import DistilledNextToken
from visar.pipeline import Pipeline
from visar.registry import get
from visar.samplers.distilled import DistilledSampler, load_student


@pytest.fixture(scope="module")
def setup():
    """The tiny teacher pipeline (V = 256, 4x4 tokens, C = 8) and a two-step student (t2 = 8) made from it."""
    torch.manual_seed(0)
    tok, gen = zoo.create("llamagen-vq-tiny"), zoo.create("llamagen-gpt-tiny", num_classes=3)
    torch.nn.init.normal_(gen.head.weight, std=0.5)
    student = DistilledNextToken.from_teacher(gen, tok.codebook(), [0, 8]).eval()
    with torch.no_grad():  # a student whose tokens depend visibly on the noise and the indicator (as if trained)
        student.in_proj.weight.normal_(std=1.0)
        student.indicator.weight.normal_(std=0.5)
    return Pipeline(tok, gen), student


def _noise(B, seed=0):
    return torch.randn(B, 16, 8, generator=torch.Generator().manual_seed(seed))


def test_one_step_shapes_dtypes_and_determinism(setup):
    pipe, student = setup
    assert get("sampler", "distilled") is DistilledSampler
    sampler = DistilledSampler(student=student)
    cond = Condition.of([0, 1, 2])
    noise = _noise(3)
    out = sampler(pipe.generator, cond, noise=noise)
    assert out.shape == (3, 4, 4) and out.dtype == torch.int64 and 0 <= int(out.min()) and int(out.max()) < 256
    assert sampler.stats == {"model_passes": 1, "tokens": 16, "t2": None}
    assert torch.equal(out, sampler(pipe.generator, cond, noise=noise.clone()))  # same noise, same tokens
    x, data = student.input_state(noise)
    assert torch.equal(out.flatten(1), student(x, cond, data).argmax(-1))  # argmax of one pass on X_0
    # noise drawn from the generator: the same as giving that draw explicitly
    drawn = sampler(pipe.generator, cond, torch.Generator().manual_seed(4))
    assert torch.equal(drawn, sampler(pipe.generator, cond, noise=_noise(3, seed=4)))
    assert not torch.equal(drawn, out)


def test_two_steps_keep_the_first_t2_tokens_and_reuse_the_noise(setup):
    pipe, student = setup
    cond, noise = Condition.of([2, 0, 1, 1]), _noise(4, seed=1)
    one = DistilledSampler(student=student)(pipe.generator, cond, noise=noise).flatten(1)
    sampler = DistilledSampler(student=student, steps=2)  # t2: the student's trained state, 8
    two = sampler(pipe.generator, cond, noise=noise).flatten(1)
    assert sampler.stats == {"model_passes": 2, "tokens": 16, "t2": 8}
    assert torch.equal(two[:, :8], one[:, :8])
    x, data = student.input_state(noise, one, 8)  # first 8 tokens as codebook vectors, the same noise after
    assert torch.equal(x[:, 8:], noise[:, 8:]) and data[:, :8].all() and not data[:, 8:].any()
    assert torch.equal(two[:, 8:], student(x, cond, data).argmax(-1)[:, 8:])
    assert not torch.equal(two, one)  # the second pass changes some token after t2 (a non-trivial student)
    three = DistilledSampler(student=student, steps=2, t2=3)(pipe.generator, cond, noise=noise).flatten(1)
    assert torch.equal(three[:, :3], one[:, :3])


def test_sampled_draws_follow_the_generator(setup):
    pipe, student = setup
    cond, noise = Condition.of([0, 1]), _noise(2)
    s = DistilledSampler(student=student, draw="sample", temperature=2.0)
    a = s(pipe.generator, cond, torch.Generator().manual_seed(0), noise=noise)
    assert torch.equal(a, s(pipe.generator, cond, torch.Generator().manual_seed(0), noise=noise))
    assert not torch.equal(a, DistilledSampler(student=student)(pipe.generator, cond, noise=noise))


def test_in_the_pipeline_and_from_a_folder(setup, tmp_path):
    pipe, student = setup
    images = pipe.generate([0, 1], seed=0, sampler=DistilledSampler(student=student, steps=2, codebook=pipe.tokenizer))
    assert images.shape == (2, 3, 64, 64)
    student.save_pretrained(tmp_path, "distill")
    loaded = load_student(tmp_path)
    assert isinstance(loaded, DistilledNextToken) and not loaded.training
    by_path = pipe.generate([0, 1], seed=0, sampler="distilled", student=str(tmp_path), steps=2)
    assert torch.equal(by_path, images)
    own = Pipeline(pipe.tokenizer, loaded)  # the student as the pipeline's generator: its default sampler
    assert own.sampler.name == "distilled"
    assert torch.equal(own.generate([0, 1], seed=0, steps=2), images)
    with pytest.raises(FileNotFoundError, match="no distilled student"):
        load_student(tmp_path / "..")


@pytest.mark.parametrize("options, match", [
    ({"noise": torch.randn(2, 16, 8)}, r"noise must be a float tensor \[3, 16, 8\]"),
    ({"noise": torch.randn(3, 16, 4)}, r"noise must be a float tensor \[3, 16, 8\]"),
    ({"noise": torch.zeros(3, 16, 8, dtype=torch.long)}, "noise must be a float tensor"),
    ({"noise": [0.0]}, "noise must be a float tensor"),
    ({"steps": 3}, "steps must be 1"), ({"steps": 0}, "steps must be 1"), ({"steps": True}, "steps must be 1"),
    ({"steps": 2, "t2": 16}, r"t2 must lie in \[1, 16\)"), ({"t2": 0}, "t2 must be an integer"),
    ({"draw": "greedy"}, "draw must be one of"), ({"temperature": 0.0}, "temperature"),
    ({"student": 3}, "student must be"), ({"student": None}, "needs student="),
    ({"codebook": torch.randn(256, 8)}, "distilled for another tokenizer"),
    ({"codebook": torch.randn(256, 4)}, "256 codes of dimension 8"),
    ({"cfg_scale": 2.0}, "no option 'cfg_scale'"),
])
def test_bad_inputs_are_named(setup, options, match):
    pipe, student = setup
    options = {"student": student, **options}
    with pytest.raises((ValueError, TypeError), match=match):
        DistilledSampler()(pipe.generator, Condition.of([0, 1, 2]), **options)


def test_a_student_of_another_tokenizer_or_teacher_is_refused(setup):
    pipe, student = setup
    torch.manual_seed(1)
    small = zoo.create("llamagen-gpt-tiny", vocab_size=128, num_classes=3)
    cb = torch.nn.functional.normalize(torch.randn(128, 8), dim=-1)
    other = DistilledNextToken.from_teacher(small, cb, [0])
    with pytest.raises(ValueError, match="token vocabulary is 128"):
        pipe.generate([0], sampler=DistilledSampler(student=other))
    with pytest.raises(ValueError, match="one step"):
        DistilledSampler(student=other, steps=2)(small, Condition.of([0]))
    with pytest.raises(TypeError, match="neither"):  # MAR emits conditions of a token head, not logits
        DistilledSampler(student=student).check_model(zoo.create("mar-tiny"))
