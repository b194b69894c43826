"""Distilled Decoding for VAR: teacher pairs of the next-scale flow map, the next-scale student, its sampler."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from visar import zoo
from visar.cli import main
from visar.conditions import Condition
from visar.data.distill_shards import DistillShards, read_manifest, shard_name
from visar.generators.base import Generator
from visar.generators.next_scale.distilled import DistilledNextScale, student_from_teacher
from visar.generators.next_token.distilled import DistilledNextToken
from visar.pipeline import Pipeline
from visar.samplers.distilled import DistilledSampler, load_student
from visar.samplers.flow_map import NextScaleFlowMapSampler
from visar.train.config import load_config
from visar.train.distill_data import NEXT_SCALE_SEED_RULE, make_distill_data, pair_noise
from visar.train.tasks import make_task

SCALES = [1, 2, 3, 4]  # var-tiny: L = 1 + 4 + 9 + 16 = 30 tokens, V = 64 codes of dimension C = 16
L, V, C = 30, 64, 16


def _teacher(seed=0, **kw):
    """A tiny VAR teacher with a random, non-zero logits head and block gates (VAR starts them near zero: a
    uniform teacher whose scales hardly see each other)."""
    torch.manual_seed(seed)
    gen = zoo.create("var-tiny", num_classes=3, **kw)
    torch.nn.init.normal_(gen.head.weight, std=0.5)
    for block in gen.blocks:
        for w in (block.ada_lin[-1].weight, block.attn.qkv.weight, block.attn.proj.weight):
            torch.nn.init.normal_(w, std=0.2)
    return gen


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("var_teacher")
    torch.manual_seed(0)
    tok = zoo.create("var-vqvae-tiny")
    Pipeline(tok, _teacher(), sampling_defaults={"cfg_scale": 1.5}).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def pipe(teacher_dir):
    return Pipeline.from_pretrained(teacher_dir)


@pytest.fixture(scope="module")
def pairs_dir(teacher_dir, tmp_path_factory):
    """256 teacher pairs of the tiny VAR teacher."""
    d = tmp_path_factory.mktemp("var_pairs")
    make_distill_data(teacher_dir, d, 256, shard_size=128, batch_size=128, progress=False)
    return str(d)


@pytest.fixture(scope="module")
def student(pipe):
    """A two-step student (t2 = 2 scales) whose tokens depend visibly on the indicator (as if trained)."""
    s = DistilledNextScale.from_teacher(pipe.generator, pipe.tokenizer.quantize.embedding.weight, [0, 2]).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        s.indicator.weight.normal_(std=0.5)
    return s


def _noise(B, seed=0):
    return torch.randn(B, L, C, generator=torch.Generator().manual_seed(seed))


def _make(teacher, out, num=10, **kw):
    return make_distill_data(teacher, out, num, **{"shard_size": 4, "batch_size": 3, "progress": False, **kw})


# ---------------------------------------------------------------------------------------------- teacher pairs

def test_pairs_are_the_var_teacher_map(teacher_dir, pipe, tmp_path):
    m = _make(teacher_dir, tmp_path / "a", seed=3, top_k=20)
    s = m["settings"]
    assert m["version"] == 2 and m["complete"] and m["num_shards"] == 3
    assert (s["kind"], s["scales"], s["num_tokens"], s["grid_size"], s["vocab_size"], s["codebook_dim"]) == \
        ("next_scale", SCALES, L, 4, V, C)
    assert s["seed_rule"] == NEXT_SCALE_SEED_RULE
    assert s["options"] == {"cfg_scale": 1.5, "top_k": 20, "top_p": 1.0, "num_flow_steps": 16, "solver": "heun"}
    ds = DistillShards(tmp_path / "a")
    assert torch.equal(ds.codebook, pipe.tokenizer.quantize.embedding.weight)
    assert torch.equal(ds.noise, pair_noise(3, 0, 10, L, C)) and torch.equal(ds.labels, torch.arange(10) % 3)
    # the VAR flow-map sampler on the same noise gives the same tokens (scales concatenated, coarse to fine)
    want = NextScaleFlowMapSampler()(pipe.generator, Condition(labels=ds.labels), noise=ds.noise, cfg_scale=1.5,
                                     top_k=20)
    assert torch.equal(ds.tokens, torch.cat([t.reshape(10, -1) for t in want], 1))
    assert len({tuple(t.tolist()) for t in ds.tokens}) == 10
    item = ds[4]
    assert item["noise"].shape == (L, C) and item["tokens"].shape == (L,) and item["label"] == 1


def test_resume_and_refusals(teacher_dir, tmp_path):
    out = tmp_path / "r"
    _make(teacher_dir, out)
    first = DistillShards(out)
    (out / shard_name(1)).unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))  # as a killed run leaves it
    kept = {k: os.stat(out / shard_name(k)).st_mtime_ns for k in (0, 2)}
    _make(teacher_dir, out, batch_size=5)
    assert {k: os.stat(out / shard_name(k)).st_mtime_ns for k in (0, 2)} == kept
    again = DistillShards(out)
    assert torch.equal(again.tokens, first.tokens) and torch.equal(again.noise, first.noise)
    with pytest.raises(ValueError, match="other settings.*options"):
        _make(teacher_dir, out, top_k=5)
    with pytest.raises(ValueError, match="teacher-map options cfg_scale, top_k.*temperature"):
        _make(teacher_dir, tmp_path / "t", temperature=0.5)  # VAR's map has no temperature
    assert not (tmp_path / "t").exists()


def test_version_1_next_token_folders_still_read_and_resume(tmp_path):
    torch.manual_seed(0)
    gen = zoo.create("llamagen-gpt-tiny", num_classes=3)
    Pipeline(zoo.create("llamagen-vq-tiny"), gen).save_pretrained(tmp_path / "lg")
    out = tmp_path / "v1"
    _make(str(tmp_path / "lg"), out, num=5)
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("kind", "scales"):  # what a version 1 folder lacks
        del manifest["settings"][key]
    (out / "manifest.json").write_text(json.dumps({**manifest, "version": 1, "complete": False}))
    (out / shard_name(1)).unlink()
    assert read_manifest(out)["settings"]["kind"] == "next_token"
    _make(str(tmp_path / "lg"), out, num=5)  # same settings: resumed, not refused
    assert read_manifest(out)["version"] == 2 and len(DistillShards(out)) == 5


# ---------------------------------------------------------------------------------------------- the student

def test_student_starts_from_the_teacher(teacher_dir, pipe):
    s = student_from_teacher(teacher_dir, [0, 2])
    assert isinstance(s, DistilledNextScale) and s.family == "var-distilled"
    assert (s.vocab_size, s.codebook_dim, s.num_tokens, s.num_states, s.scales, s.timesteps) == (V, C, L, 4, SCALES,
                                                                                                 [0, 2])
    mine, theirs = s.transformer.state_dict(), pipe.generator.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(s.codebook, pipe.tokenizer.quantize.embedding.weight)
    assert torch.equal(s.indicator.weight, torch.zeros_like(s.indicator.weight))
    assert s.transformer.class_dropout == 0.0
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        student_from_teacher(teacher_dir, [0, 4])  # states count scales: 4 fixes every scale


def test_the_student_is_block_causal_over_scales(student):
    """Scale s's logits depend on the label, the coarser scales and scale s's own noise, nothing finer."""
    cond = Condition.of([1, 2])
    noise = _noise(2)
    x, data = student.input_state(noise)
    base = student(x, cond, data)
    assert base.shape == (2, L, V) and base.dtype == torch.float32
    moved = noise.clone()
    moved[:, 5:14] += 1.0  # scale 2 (3x3) holds tokens 5..13
    out = student(moved, cond, data)
    assert torch.equal(out[:, :5], base[:, :5]) and not torch.allclose(out[:, 5:14], base[:, 5:14])
    assert not torch.allclose(student(x, Condition.of([0, 2]), data)[0, 0], base[0, 0])  # the label reaches scale 0


def test_states_fix_whole_scales_and_the_loss_covers_the_noise_positions(student):
    noise = _noise(3, seed=1)
    flat = torch.randint(V, (3, L), generator=torch.Generator().manual_seed(2))
    per_scale = student.tokens_out(flat)
    assert [tuple(t.shape) for t in per_scale] == [(3, pn, pn) for pn in SCALES]
    t = torch.tensor([0, 2, 3])
    x, data = student.input_state(noise, per_scale, t)
    for r, n in enumerate((0, 5, 14)):  # tokens of the t coarsest scales
        assert data[r, :n].all() and not data[r, n:].any()
        assert torch.equal(x[r, :n], student.codebook[flat[r, :n]]) and torch.equal(x[r, n:], noise[r, n:])
    cond = Condition.of([0, 1, 2])
    out = student.training_loss(noise, per_scale, cond, t=t)
    keep = ~data
    assert torch.allclose(out["loss"], F.cross_entropy(student(x, cond, data)[keep], flat[keep]))
    assert torch.allclose(student.training_loss(noise, flat, cond, t=t)["loss"], out["loss"])  # [B, L] too
    assert set(student.draw_timesteps(500, torch.Generator().manual_seed(0)).tolist()) == {0, 2}
    with pytest.raises(ValueError, match="< 4"):
        student.training_loss(noise, flat, cond, t=4)


def test_the_loss_falls_on_a_toy(pairs_dir, teacher_dir):
    """40 AdamW steps on 256 teacher pairs: the distillation loss falls clearly (one- and two-step states)."""
    data = DistillShards(pairs_dir)
    assert data.manifest["settings"]["kind"] == "next_scale"
    torch.manual_seed(0)
    s = student_from_teacher(teacher_dir, [0, 2])
    data.check_student(s)
    task = make_task("distill", s)
    opt = torch.optim.AdamW(s.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        idx = torch.randint(len(data), (32,), generator=g)
        out = task({"noise": data.noise[idx], "tokens": data.tokens[idx], "label": data.labels[idx]})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)


def test_pairs_and_students_of_other_teachers_do_not_mix(pairs_dir, teacher_dir):
    data = DistillShards(pairs_dir)
    lg = DistilledNextToken.from_teacher(zoo.create("llamagen-gpt-tiny", num_classes=3, vocab_size=64),
                                         F.normalize(torch.randn(64, 16), dim=-1), [0])
    with pytest.raises(ValueError, match="num_tokens=30"):
        data.check_student(lg)
    other = DistilledNextScale.from_teacher(_teacher(scales=[1, 2, 3, 5]), torch.randn(V, C), [0])
    with pytest.raises(ValueError, match="num_tokens"):
        data.check_student(other)


# ---------------------------------------------------------------------------------------------- the sampler

def test_one_step_shapes_dtypes_and_determinism(pipe, student):
    sampler = DistilledSampler(student=student)
    cond, noise = Condition.of([0, 1, 2]), _noise(3)
    out = sampler(pipe.generator, cond, noise=noise)
    assert [tuple(t.shape) for t in out] == [(3, pn, pn) for pn in SCALES]
    assert all(t.dtype == torch.int64 and 0 <= int(t.min()) and int(t.max()) < V for t in out)
    assert sampler.stats == {"model_passes": 1, "tokens": L, "t2": None}
    again = sampler(pipe.generator, cond, noise=noise.clone())
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    x, data = student.input_state(noise)
    assert torch.equal(torch.cat([t.flatten(1) for t in out], 1), student(x, cond, data).argmax(-1))
    drawn = sampler(pipe.generator, cond, torch.Generator().manual_seed(4))  # noise drawn as one [B, L, C] tensor
    explicit = sampler(pipe.generator, cond, noise=_noise(3, seed=4))
    assert all(torch.equal(a, b) for a, b in zip(drawn, explicit))


def test_two_steps_keep_the_first_pass_prefix_scales(pipe, student):
    cond, noise = Condition.of([2, 0, 1, 1]), _noise(4, seed=1)
    flat = lambda toks: torch.cat([t.flatten(1) for t in toks], 1)  # noqa: E731
    one = flat(DistilledSampler(student=student)(pipe.generator, cond, noise=noise))
    sampler = DistilledSampler(student=student, steps=2)  # t2: the student's trained state, 2 scales = 5 tokens
    two = flat(sampler(pipe.generator, cond, noise=noise))
    assert sampler.stats == {"model_passes": 2, "tokens": L, "t2": 2}
    assert torch.equal(two[:, :5], one[:, :5])
    x, data = student.input_state(noise, one, 2)  # the two coarsest scales as codebook vectors, the same noise after
    assert torch.equal(x[:, 5:], noise[:, 5:]) and data[:, :5].all() and not data[:, 5:].any()
    assert torch.equal(two[:, 5:], student(x, cond, data).argmax(-1)[:, 5:])
    assert not torch.equal(two, one)
    three = flat(DistilledSampler(student=student, steps=2, t2=3)(pipe.generator, cond, noise=noise))
    assert torch.equal(three[:, :14], one[:, :14])


def test_in_the_pipeline_from_a_folder_and_the_cli(pipe, student, teacher_dir, tmp_path):
    images = pipe.generate([0, 1], seed=0, sampler=DistilledSampler(student=student, steps=2, codebook=pipe.tokenizer))
    assert images.shape == (2, 3, 64, 64)
    student.save_pretrained(tmp_path / "s", "distill")
    loaded = load_student(tmp_path / "s")
    assert isinstance(loaded, DistilledNextScale) and not loaded.training and loaded.scales == SCALES
    by_path = pipe.generate([0, 1], seed=0, sampler="distilled", student=str(tmp_path / "s"), steps=2)
    assert torch.equal(by_path, images)
    own = Pipeline(pipe.tokenizer, loaded)  # the student as the pipeline's generator: its default sampler
    assert own.sampler.name == "distilled" and torch.equal(own.generate([0, 1], seed=0, steps=2), images)
    assert isinstance(Generator.from_pretrained(tmp_path / "s", "distill"), DistilledNextScale)
    assert main(["sample", "--model", teacher_dir, "--sampler", "distilled", "--student", str(tmp_path / "s"),
                 "--option", "steps=2", "--num", "2", "--out", str(tmp_path / "grid.png"), "--quiet"]) == 0
    assert (tmp_path / "grid.png").is_file()


@pytest.mark.parametrize("options, match", [
    ({"noise": torch.randn(2, L, C)}, r"noise must be a float tensor \[3, 30, 16\]"),
    ({"noise": torch.randn(3, 29, C)}, r"noise must be a float tensor \[3, 30, 16\] \(L = 30 tokens of all scales"),
    ({"noise": torch.randn(3, L, 8)}, r"noise must be a float tensor \[3, 30, 16\]"),
    ({"steps": 3}, "steps must be 1"), ({"steps": 0}, "steps must be 1"),
    ({"steps": 2, "t2": 4}, r"t2 must lie in \[1, 4\) \(scales kept"),
    ({"codebook": torch.randn(V, C)}, "distilled for another tokenizer"),
    ({"codebook": torch.randn(V, 8)}, "64 codes of dimension 16"),
])
def test_bad_inputs_are_named(pipe, student, options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DistilledSampler(student=student, **options)(pipe.generator, Condition.of([0, 1, 2]))


def test_a_student_for_another_tokenizer_or_teacher_is_refused(pipe, student):
    for kw, what in (({"vocab_size": 32}, "token vocabulary is 64"), ({"scales": [1, 2, 3, 5]}, r"scales is \[1, 2"),
                     ({"token_dim": 8}, "code dimension is 16")):
        with pytest.raises(ValueError, match=what):
            DistilledSampler(student=student)(_teacher(**kw), Condition.of([0]))
    with pytest.raises(ValueError, match="next-scale student stands in for a VAR teacher"):
        DistilledSampler(student=student)(zoo.create("llamagen-gpt-tiny", num_classes=3), Condition.of([0]))
    lg = DistilledNextToken.from_teacher(zoo.create("llamagen-gpt-tiny", num_classes=3, vocab_size=64),
                                         F.normalize(torch.randn(64, 16), dim=-1), [0])
    with pytest.raises(ValueError, match="next-token student stands in for a next-token teacher"):
        DistilledSampler(student=lg)(pipe.generator, Condition.of([0]))
    torch.manual_seed(5)
    with pytest.raises(ValueError, match="distilled for another tokenizer"):
        Pipeline(zoo.create("var-vqvae-tiny"), student)  # same sizes, another codebook
    with pytest.raises(ValueError, match=r"scales \[1, 2, 4\]"):
        Pipeline(zoo.create("var-vqvae-tiny", scales=[1, 2, 4]), student)
    with pytest.raises(ValueError, match=r"codebook must be \[V=64, C=16\]"):
        DistilledNextScale.from_teacher(pipe.generator, torch.randn(V, 8))
    with pytest.raises(ValueError, match="architecture is the teacher's"):
        DistilledNextScale.from_teacher(pipe.generator, torch.randn(V, C), depth=3)
    with pytest.raises(TypeError, match="VAR NextScaleGenerator"):
        DistilledNextScale.from_teacher(zoo.create("llamagen-gpt-tiny"), torch.randn(V, C))


def test_configs_load_with_a_teacher_override(pairs_dir, teacher_dir):
    for name, steps in (("configs/shapes_var_distill_one.yaml", [0]), ("configs/shapes_var_distill_two.yaml", [0, 3])):
        cfg = load_config(name, [f"data.path={pairs_dir}", f"model.kwargs.teacher={teacher_dir}"])
        assert cfg.task == "distill" and cfg.data.kind == "distill_shards"
        assert cfg.model.cls == "visar.generators.next_scale.distilled:student_from_teacher"
        assert cfg.model.kwargs["timesteps"] == steps
