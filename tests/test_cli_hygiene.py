"""CLI hygiene and documented paths (issue 28): --version, python -m visar, help and default of every
option, one quiet flag, one --threads flag, `visar models` as a table, substring patterns, progress by
step, KID subset size from the set size, and README / architecture snippets that run as written."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from visar.cli import DEFAULT_THREADS, HelpFormatter, build_parser, main
from visar.eval import cli as eval_cli

ROOT = Path(__file__).resolve().parents[1]


def _sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def test_version_in_process_and_python_m_visar(capsys):
    import visar

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"visar {visar.__version__}")
    out = subprocess.run([sys.executable, "-m", "visar", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith(f"visar {visar.__version__}")


@pytest.mark.parametrize("command", ["sample", "fid", "eval sample", "tokenize"])
def test_every_option_has_a_help_text_and_shows_its_default(command):
    parser = _sub(eval_cli.build_parser(), "fid") if command == "fid" else (
        _sub(eval_cli.build_parser(), "sample") if command == "eval sample" else _sub(build_parser(), command))
    assert parser.formatter_class is HelpFormatter
    visible = [a for a in parser._actions if a.option_strings and a.help is not argparse.SUPPRESS
               and not isinstance(a, argparse._HelpAction)]
    missing = [a.option_strings[0] for a in visible if not a.help]
    assert not missing, f"options without help: {missing}"
    formatter = parser._get_formatter()
    silent = [a.option_strings[0] for a in visible
              if a.nargs != 0 and not a.required and "default" not in formatter._get_help_string(a).lower()]
    assert not silent, f"options whose help does not state the default: {silent}"
    assert "--no-progress" not in parser.format_help()  # the hidden alias of --quiet


@pytest.mark.parametrize("argv", [["sample"], ["tokenize", "--tokenizer", "t", "--out", "o"]])
def test_quiet_and_threads_are_one_flag_each(argv):
    for flag in ("--quiet", "--no-progress"):
        assert build_parser().parse_args([*argv, flag]).quiet
    assert build_parser().parse_args(argv).threads == DEFAULT_THREADS == 1
    assert build_parser().parse_args([*argv, "--threads", "0"]).threads == 0


def test_eval_commands_take_the_same_flags():
    p = eval_cli.build_parser()
    for argv in (["sample", "m", "--out", "o"], ["fid", "s"]):
        for flag in ("--quiet", "--no-progress"):
            assert p.parse_args([*argv, flag]).quiet
    args = p.parse_args(["sample", "m", "--out", "o"])
    assert args.threads == DEFAULT_THREADS and p.parse_args(["sample", "m", "--out", "o", "--threads", "3"]).threads == 3
    assert p.parse_args(["fid", "s"]).kid_subset_size is None  # chosen from the set sizes


def test_models_table_and_substring_patterns(capsys):
    assert main(["models", "-"]) == 0  # every name with a dash: the whole table
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:] if line.strip()
            and not line.startswith("(")}
    assert rows["shapes-llamagen"][1:4] == ["trained", "pipeline", "llamagen"]
    assert rows["llamagen-gpt-tiny"][1:4] == ["random", "generator", "llamagen"]
    assert rows["var-tiny"][1] == "random" and rows["var-tiny"][3] == "var"
    assert re.fullmatch(r"[\d.]+[KMB]?", rows["llamagen-gpt-b"][4])
    assert main(["models", "llamagen", "--names"]) == 0
    names = capsys.readouterr().out.split()
    assert "llamagen-gpt-b" in names and "shapes-llamagen" in names and "var-d16" not in names
    assert main(["models", "var-*", "--names"]) == 0  # globs still work
    assert set(capsys.readouterr().out.split()) >= {"var-d16", "var-tiny"}
    assert main(["eval", "protocols", "llamagen"]) == 0
    protocols = json.loads(capsys.readouterr().out)
    assert "llamagen-gpt-xl" in protocols and not any(n.startswith("var-") for n in protocols)


def test_sampling_progress_is_by_step(tmp_path, capsys):
    from visar import zoo
    from visar.pipeline import Pipeline

    torch.manual_seed(0)
    Pipeline(zoo.create("llamagen-vq-tiny"), zoo.create("llamagen-gpt-tiny")).save_pretrained(tmp_path / "p")
    assert main(["sample", "--model", str(tmp_path / "p"), "--num", "2", "--batch-size", "2",
                 "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "tokens" in err and "sampling" in err  # the sampler's bar by decode step inside the bar over images
    assert main(["sample", "--model", str(tmp_path / "p"), "--num", "2", "--batch-size", "2", "--quiet",
                 "--out", str(tmp_path / "q")]) == 0
    assert "tokens" not in capsys.readouterr().err


def test_kid_subset_size_follows_small_sets(monkeypatch):
    from visar.eval import metrics

    seen = {}

    def kid(f1, f2, kid_subsets, kid_subset_size, **kw):
        seen["size"] = kid_subset_size
        return {"kernel_inception_distance_mean": 0.0, "kernel_inception_distance_std": 0.0}

    import torch_fidelity.metric_kid as tf_kid

    monkeypatch.setattr(tf_kid, "kid_features_to_metric", kid)
    monkeypatch.setattr(metrics, "resolve_weights", lambda w: "w")
    monkeypatch.setattr(metrics, "sha256_file", lambda p: metrics.WEIGHTS_SHA256_PREFIX)
    monkeypatch.setattr(metrics, "build_extractor", lambda w, d: None)
    monkeypatch.setattr(metrics, "_extract", lambda e, inp, *a: (np.random.default_rng(inp.num).normal(
        size=(inp.num, 8)).astype(np.float32), np.zeros((inp.num, 4), np.float32)))
    ims = lambda n: np.zeros((n, 8, 8, 3), np.uint8)  # noqa: E731
    out = metrics.compute_metrics(ims(30), ims(50), fid=False, isc=False, prc=False, use_cache=False, progress=False)
    assert seen["size"] == 30 and "kernel_inception_distance_mean" in out
    with pytest.raises(ValueError, match="kid_subset_size=40"):
        metrics.compute_metrics(ims(30), ims(50), fid=False, isc=False, prc=False, kid_subset_size=40,
                                use_cache=False, progress=False)


# ------------------------------------------------------------------------------------- docs snippets
#: first line of a ```python block that needs files visar cannot ship (official checkpoints): not run here
NEEDS_MARKER = "# needs: official checkpoints"


def _python_blocks(path: Path) -> list[tuple[str, str]]:
    text = path.read_text()
    return [(f"{path.name}:{text[:m.start()].count(chr(10)) + 1}", m.group(1))
            for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


SNIPPETS = [b for doc in ("README.md", "docs/architecture.md") for b in _python_blocks(ROOT / doc)]


@pytest.mark.parametrize("code", [c for _, c in SNIPPETS], ids=[i for i, _ in SNIPPETS])
def test_readme_and_architecture_snippets_run_as_written(code, tmp_path, monkeypatch):
    if code.lstrip().startswith(NEEDS_MARKER):
        pytest.skip("needs official checkpoints (marked in the doc)")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<snippet>", "exec"), {"__name__": "__snippet__"})


def test_every_doc_snippet_is_run_or_marked():
    assert SNIPPETS and any(not c.lstrip().startswith(NEEDS_MARKER) for _, c in SNIPPETS)
    for where, code in SNIPPETS:
        if "load_tokenizer(" in code or "load_generator(" in code:
            assert code.lstrip().startswith(NEEDS_MARKER), f"{where} reads official files: mark it {NEEDS_MARKER!r}"
