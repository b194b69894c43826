"""Killing a multi-process command leaves no orphan (issue 28): ``visar eval sample --num-processes 2``
launches through ``accelerate launch`` with the launcher tied to the command and every worker tied to
the launcher (:mod:`visar.utils.lifeline`)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

psutil = pytest.importorskip("psutil")

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the tie uses prctl (Linux)")


def _gone(procs, deadline_s: float = 30.0) -> list:
    """The processes of ``procs`` still running (zombies count as ended) after up to ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while True:
        alive = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > end:
            return alive
        time.sleep(0.1)


def _child_pid(parent: subprocess.Popen) -> int:
    line = parent.stdout.readline().strip()
    assert line.isdigit(), line
    return int(line)


def _kill_all(procs) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


#: a worker: ties itself to its parent, says so, then idles
_WORKER = """
import time
from visar.utils.lifeline import die_with_parent
die_with_parent()
print("ready", flush=True)
time.sleep(600)
"""
#: parents that start a child and print its pid: with a plain Popen (the child ties itself) or with call_tied
_PARENTS = {
    "die_with_parent": """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
child.stdout.readline()
print(child.pid, flush=True)
time.sleep(600)
""",
    "call_tied": """
import sys, threading, time
import psutil
from visar.utils.lifeline import call_tied
def report():
    while not psutil.Process().children():
        time.sleep(0.01)
    print(psutil.Process().children()[0].pid, flush=True)
threading.Thread(target=report, daemon=True).start()
call_tied([sys.executable, "-c", "import time; time.sleep(600)"])
""",
}


@linux_only
@pytest.mark.parametrize("tie", sorted(_PARENTS))
def test_a_tied_child_ends_with_its_killed_parent(tie):
    """The two links: a worker that calls ``die_with_parent``, a launcher started by ``call_tied``."""
    parent = subprocess.Popen([sys.executable, "-c", _PARENTS[tie], _WORKER], stdout=subprocess.PIPE, text=True)
    try:
        child = psutil.Process(_child_pid(parent))
        assert child.is_running()
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        left = _gone([child])
        _kill_all(left)
        assert not left, "the child outlived its killed parent"
    finally:
        parent.kill()


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    import torch

    from visar import zoo
    from visar.pipeline import Pipeline

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("pipe") / "tiny"
    Pipeline(zoo.create("llamagen-vq-tiny"), zoo.create("llamagen-gpt-tiny")).save_pretrained(d)
    return d


@linux_only
@pytest.mark.slow
def test_killing_eval_sample_stops_its_workers(pipeline_dir, tmp_path):
    """Slow (two fresh interpreters importing torch, 30-90 s on a loaded 2-core CPU): kill -9 the command
    while its two workers write images; every process it started ends and no image is written after."""
    out = tmp_path / "samples"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "visar.eval.cli", "sample", str(pipeline_dir), "--out", str(out), "--num", "5000",
           "--labels", "balanced", "--batch-size", "1", "--num-processes", "2", "--quiet"]
    log = open(tmp_path / "log.txt", "w")
    top = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    family = []
    try:
        images = out / "images"
        end = time.monotonic() + 400
        while not (images.is_dir() and any(p.suffix == ".png" for p in images.iterdir())):
            assert top.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
            assert time.monotonic() < end, "no image after 400 s"
            time.sleep(0.2)
        family = psutil.Process(top.pid).children(recursive=True)
        workers = [p for p in family if p.environ().get("LOCAL_RANK") is not None]
        assert len(workers) == 2, [(p.name(), p.cmdline()) for p in family]
        top.send_signal(signal.SIGKILL)
        top.wait(timeout=30)
        left = _gone(family)
        assert not left, [p.cmdline() for p in left]
        written = len(list(images.iterdir()))
        time.sleep(1.0)
        assert len(list(images.iterdir())) == written  # nothing keeps writing into the folder
    finally:
        top.kill()
        _kill_all(family)
        log.close()
