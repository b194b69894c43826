"""benchmarks/speculative_continuous.py on two trained-pipeline folders (tiny random stand-ins): runs, prints
the speed, acceptance and class-fidelity lines, and refuses a flow head left without last-step noise."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visar import zoo
from visar.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "speculative_continuous.py"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    pytest.importorskip("diffusers")
    d = tmp_path_factory.mktemp("cspd_bench")
    torch.manual_seed(0)
    tok = zoo.create("kl-tiny").eval()
    defaults = {"num_iter": 4, "cfg_scale": 2.0, "cfg_schedule": "linear", "num_steps": 2}
    geo = dict(vae_stride=4, img_size=32)  # kl-tiny: stride 4, so 32 px images of 8 x 8 tokens
    target = zoo.create("mar-tiny", head="flow", num_sampling_steps=2, **geo).eval()
    draft = zoo.create("mar-tiny", head="flow", diffloss_w=16, diffloss_d=1, num_sampling_steps=2, **geo).eval()
    Pipeline(tok, target, sampling_defaults=defaults).save_pretrained(d / "target")
    Pipeline(tok, draft, sampling_defaults=defaults).save_pretrained(d / "draft")
    return d


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


def test_trained_mode_reports_speed_acceptance_and_fidelity(folders):
    r = run("--target", str(folders / "target"), "--draft", str(folders / "draft"), "--final-std", "0.1",
            "--batches", "1", "--pairs", "1", "--relaxation", "2.0", "--fidelity", "10")
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "layout masked" in out and "final_std 0.1" in out and "'num_iter': 4" in out
    assert "[exact B= 1]" in out and "[lossy lambda=2.0 B= 1]" in out and "cap hits 0" in out
    for name in ("plain, final_noise", "plain, official (no last-step noise)", "cspd exact",
                 "cspd lossy lambda=2.0", "draft alone, final_noise"):
        assert f"class fidelity, {name}: " in out and "% of 10" in out


def test_trained_mode_refuses_bad_input(folders):
    r = run("--target", str(folders / "target"), "--draft", str(folders / "draft"), "--batches", "1", "--pairs", "1")
    assert r.returncode != 0 and "noise-free last step" in r.stderr
    r = run("--target", str(folders / "target"), "--final-std", "0.1")
    assert r.returncode != 0 and "--target and --draft go together" in r.stderr
    r = run("--target", str(folders / "target"), "--draft", str(folders / "draft"), "--final-std", "0")
    assert r.returncode != 0 and "--final-std must be > 0" in r.stderr
