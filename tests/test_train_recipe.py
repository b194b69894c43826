"""Multi-stage recipes (``visar train RECIPE.yaml``): a tiny tokenizer -> token cache -> generator recipe runs
end to end, a rerun skips finished stages, an interrupted stage resumes, bad recipes fail before anything runs,
and the shipped recipes are valid."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from visar.train import launch, recipe as rc
from visar.utils.io import load_safetensors

ROOT = Path(__file__).resolve().parents[1]

VQ = {"task": "tokenizer",
      "model": {"cls": "visar.tokenizers.vq:VQTokenizer",
                "kwargs": {"codebook_size": 16, "codebook_embed_dim": 4, "ch": 32, "ch_mult": [1, 2],
                           "num_res_blocks": 1, "z_channels": 32}},
      "data": {"kind": "shapes", "size": 8, "length": 64},
      "optim": {"lr": 1e-3, "warmup_steps": 1},
      "train": {"steps": 5, "batch_size": 4, "save_every": 2, "log_every": 100, "progress": False, "threads": 1,
                "output_dir": "runs/never_used"}}
GPT = {"task": "generator",
       "model": {"cls": "visar.generators.next_token.llamagen:NextTokenGenerator",
                 "kwargs": {"vocab_size": 16, "dim": 32, "depth": 1, "num_heads": 2, "grid_size": 4,
                            "num_classes": 10}},
       "tokenizer": {"path": "runs/never_used/export"},
       "data": {"kind": "token_cache", "path": "runs/never_used_tokens"},
       "optim": {"lr": 1e-3, "warmup_steps": 1},
       "train": {"steps": 5, "batch_size": 4, "save_every": 2, "log_every": 100, "progress": False, "threads": 1,
                 "output_dir": "runs/never_used_gpt"},
       "sample": {"labels": [0, 1], "per_label": 1}}


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture()
def tiny(tmp_path) -> Path:
    """A 3-stage recipe in tmp_path/recipes/tiny.yaml, its configs in tmp_path/configs (found through the folder
    above the recipe's)."""
    _write(tmp_path / "configs" / "vq.yaml", VQ)
    _write(tmp_path / "configs" / "gpt.yaml", GPT)
    return _write(tmp_path / "recipes" / "tiny.yaml", {
        "name": "tiny",
        "overrides": ["train.threads=1"],
        "result": "${stages.gpt.export}",
        "stages": [
            {"name": "vq", "train": "configs/vq.yaml"},
            {"name": "tokens", "tokenize": {"tokenizer": "${stages.vq.export}", "data": "shapes", "size": 8,
                                            "length": 300, "seed": 1, "batch_size": 100, "threads": 1,
                                            "quiet": True}},
            {"name": "gpt", "train": "configs/gpt.yaml",
             "overrides": ["tokenizer.path=${stages.vq.export}", "data.path=${stages.tokens}"]},
        ]})


def _train(*argv: str) -> int:
    return launch.main([str(a) for a in argv])


def test_tiny_recipe_runs_skips_and_resumes(tiny, tmp_path, monkeypatch, caplog, capsys):
    import visar.train.trainer as tr

    run = tmp_path / "run"
    # an interrupted first attempt: the generator dies during its step 4, after its step-2 checkpoint
    real_update = tr.EMA.update

    def dying(self, model, step):
        if step + 1 == 4 and model.__class__.__name__ == "NextTokenGenerator":
            raise KeyboardInterrupt("killed")
        real_update(self, model, step)

    monkeypatch.setattr(tr.EMA, "update", dying)
    assert _train(tiny, "--out", run) == 130
    assert rc.checkpoint_step(run / "gpt") == 2
    done = sorted(p.stem for p in (run / "recipe" / "done").glob("*.json"))
    assert done == ["tokens", "vq"]
    cache = json.loads((run / "tokens" / "index.json").read_text())
    assert cache["complete"] and cache["num_items"] == 300
    monkeypatch.setattr(tr.EMA, "update", real_update)

    # dry run: two stages skipped, the generator resumes at step 2
    capsys.readouterr()
    assert _train(tiny, "--out", run, "--dry-run") == 0
    text = capsys.readouterr().out
    assert "vq [train] finished: skipped" in text and "tokens [tokenize] finished: skipped" in text
    assert "gpt [train] would resume at step 2 of 5" in text
    assert f"visar tokenize --tokenizer {run / 'vq' / 'export'}" in text

    caplog.clear()
    with caplog.at_level("INFO", logger="visar.train"):
        assert _train(tiny, "--out", run) == 0
    msgs = [r.getMessage() for r in caplog.records]
    assert any("stage 1/3 vq: finished, skipped" in m for m in msgs)
    assert any("stage 2/3 tokens: finished, skipped" in m for m in msgs)
    assert any("resumed from" in m and "step_00000002" in m and "at step 2" in m for m in msgs)
    assert f"recipe tiny finished: {run / 'gpt' / 'export'}" in capsys.readouterr().out
    assert (run / "gpt" / "export" / "pipeline.json").is_file()
    assert (run / "recipe" / "recipe.yaml").read_bytes() == tiny.read_bytes()

    # the resumed generator ends where an uninterrupted one does (same inputs: --stages reuses vq and tokens)
    marker = json.loads((run / "recipe" / "done" / "gpt.json").read_text())
    assert marker["deps"] == {d: json.loads((run / "recipe" / "done" / f"{d}.json").read_text())["id"]
                              for d in ("vq", "tokens")}
    ref = tmp_path / "ref"
    cfg_args = marker["command"][2:]  # visar train CONFIG overrides...
    cfg_args = [a for a in cfg_args if not a.startswith(("train.output_dir=", "export_dir="))]
    assert _train(*cfg_args, f"train.output_dir={ref}") == 0
    for f in ("model.safetensors", "ema.safetensors"):
        a = load_safetensors(run / "gpt" / "checkpoints" / "step_00000005" / f)
        b = load_safetensors(ref / "checkpoints" / "step_00000005" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # a rerun does nothing; a changed setting of a finished stage is refused, naming what to delete
    caplog.clear()
    with caplog.at_level("INFO", logger="visar.train"):
        assert _train(tiny, "--out", run) == 0
    assert sum("finished, skipped" in r.getMessage() for r in caplog.records) == 3
    caplog.clear()
    assert _train(tiny, "--out", run, "optim.lr=5e-4") == 2
    err = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(err) == 1 and "vq finished with other settings (optim.lr: 0.001 -> 0.0005" in err[0]
    assert str(run / "vq") in err[0] and str(run / "gpt") in err[0]


def _bad(tmp_path: Path, stages: list, **top) -> Path:
    _write(tmp_path / "configs" / "vq.yaml", VQ)
    _write(tmp_path / "configs" / "gpt.yaml", GPT)
    return _write(tmp_path / "recipes" / "bad.yaml", {"name": "bad", **top, "stages": stages})


@pytest.mark.parametrize("stages, top, message", [
    ([{"name": "a", "eval": "x"}], {}, "exactly one kind, train: CONFIG or tokenize: {options}; got none (unknown key 'eval')"),
    ([{"name": "a", "train": "configs/nope.yaml"}], {}, "config configs/nope.yaml not found"),
    ([{"name": "a", "train": "configs/vq.yaml", "overrides": ["train.stepz=3"]}], {}, "unknown config key train.stepz"),
    ([{"name": "a", "train": "configs/vq.yaml", "overrides": ["train.steps"]}], {}, "must look like key=value"),
    ([{"name": "a", "train": "configs/vq.yaml", "overrides": ["train.output_dir=x"]}], {}, "set by the recipe"),
    ([{"name": "a", "train": "configs/gpt.yaml", "overrides": ["tokenizer.path=${stages.b.export}"]},
      {"name": "b", "train": "configs/vq.yaml"}], {}, "${stages.b.export} names no earlier stage"),
    ([{"name": "a", "train": "configs/vq.yaml"},
      {"name": "t", "tokenize": {"tokenizer": "${stages.a.export}", "outt": 3}}], {}, "unknown visar tokenize option 'outt'"),
    ([{"name": "a", "train": "configs/vq.yaml"},
      {"name": "t", "tokenize": {"tokenizer": "${stages.a.export}", "size": "big"}}], {}, "size must be int"),
    ([{"name": "a", "train": "configs/vq.yaml"},
      {"name": "t", "tokenize": {"tokenizer": "${stages.a}", "out": "x"}}], {}, "remove out"),
    ([{"name": "a", "train": "configs/vq.yaml"},
      {"name": "g", "train": "configs/gpt.yaml", "overrides": ["tokenizer.path=${stages.a.export}"]}], {},
     "data.path=runs/never_used_tokens does not exist"),
    ([{"name": "a", "train": "configs/vq.yaml"}, {"name": "a", "train": "configs/vq.yaml"}], {}, "must be unique"),
    ([{"name": "a", "train": "configs/vq.yaml"}], {"overrides": "train.steps=3"}, "must be a list of key=value"),
    ([{"name": "a", "train": "configs/vq.yaml"}], {"stagez": 1}, "unknown key 'stagez'"),
    ([{"name": "a", "train": "configs/vq.yaml", "overrides": ["model.kwargs.ch=16"]}], {}, "multiple of 32"),
    ([{"name": "a", "train": "configs/vq.yaml", "overrides": ["train.batch_size=3", "train.grad_accum=2"]}], {},
     "must be divisible by processes x train.grad_accum"),
    ([{"name": "a", "train": "configs/vq.yaml", "overrides": ["x=${nope}"]}], {}, "unknown placeholder ${nope}"),
])
def test_bad_recipes_fail_before_any_stage_runs(tmp_path, caplog, stages, top, message):
    path = _bad(tmp_path, stages, **top)
    run = tmp_path / "run"
    assert _train(path, "--out", run) == 2
    err = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(err) == 1 and message in err[0], err
    assert not (run / "a").exists()  # nothing ran


def test_subsets_and_flags(tiny, tmp_path, caplog, capsys):
    run = tmp_path / "run"
    # --stages with an unfinished input that it leaves out
    assert _train(tiny, "--out", run, "--stages", "gpt") == 2
    assert "reads the outputs of vq, tokens, which have not finished" in caplog.records[-1].getMessage()
    assert _train(tiny, "--out", run, "--from", "zzz") == 2
    assert _train(tiny, "--out", run, "--from", "gpt", "--stages", "gpt") == 2
    capsys.readouterr()
    assert _train(tiny, "--out", run, "--from", "tokens", "--dry-run") == 2  # tokens reads vq, not finished
    assert _train(tiny, "--out", run, "--stages", "vq", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "vq [train] would run" in out and "gpt [train] not selected" in out
    # recipe flags on a plain config; a recipe writing into the package
    assert _train(tmp_path / "configs" / "vq.yaml", "--dry-run") == 2
    assert "--dry-run applies to recipes" in caplog.records[-1].getMessage()
    import visar

    assert _train(tiny, "--out", Path(visar.__file__).parent / "assets" / "x", "--dry-run") == 2
    assert "inside the installed visar package" in caplog.records[-1].getMessage()


def test_tokenize_options_match_the_command():
    """The recipe's list of visar tokenize options is the command's own (minus --out)."""
    import argparse

    from visar.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    dests = {a.dest for a in sub.choices["tokenize"]._actions if a.dest not in ("help", "func")}
    assert dests == set(rc.TOKENIZE_OPTIONS) | {"out"}
    flags = {a.dest for a in sub.choices["tokenize"]._actions if a.nargs == 0 and a.dest != "help"}
    assert flags == {k for k, t in rc.TOKENIZE_OPTIONS.items() if t is bool}


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_are_valid(path, tmp_path, capsys, monkeypatch):
    """Every shipped recipe reads and checks (a dry run in an empty run folder: every stage would run), and
    every stage reads and writes only the run folder (or the bundled assets it reads, never writes)."""
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    assert launch.main([str(path), "--out", str(run), "--dry-run"]) == 0
    r = rc.load_recipe(path, run)
    assert capsys.readouterr().out.count("would run") == len(r.stages)
    rc.check(r, r.stages)
    for s in r.stages:
        if s.kind == "train":
            c = s.cfg
            reads = [c.tokenizer.path or ""] if c.task == "generator" else []  # may be a bundled asset
            paths = [c.train.output_dir, str(c.export_path()), c.data.cache, c.data.path or "", c.model.init_from]
            paths += reads
        else:
            reads = []
            paths = [str(s.folder), s.options["tokenizer"], s.options.get("cache", "")]
        for p in filter(None, paths):
            bundled = p in reads and (ROOT / p).resolve().is_relative_to(ROOT / "visar" / "assets")
            assert Path(p).is_relative_to(run) or bundled, (s.name, p)
