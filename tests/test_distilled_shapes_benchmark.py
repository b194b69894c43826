"""benchmarks/distilled_shapes.py on the bundled teacher and untrained students (tiny counts: wiring, not quality)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from benchmark_loader import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "visar" / "assets" / "shapes-llamagen"


ds = load_benchmark("distilled_shapes")


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    from visar.generators.next_token.distilled import student_from_teacher

    root = tmp_path_factory.mktemp("students")
    torch.manual_seed(0)
    for name, steps in (("one", [0]), ("two", [0, 32])):
        student_from_teacher(str(BUNDLED), steps).save_pretrained(root / name, "distill")
    return root


def test_report_teacher_and_students(students, tmp_path):
    from PIL import Image

    threads = torch.get_num_threads()
    try:
        report = ds.main(["--teacher", str(BUNDLED), "--student", f"one={students / 'one'}",
                          "--student", f"two={students / 'two'}:2", "--samples", "10", "--batch", "5",
                          "--speed-batches", "1", "3", "--repeats", "1", "--num-reference", "20",
                          "--grid-per-class", "1", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    teacher, one, two = report["rows"]
    assert [r["name"] for r in report["rows"]] == ["teacher", "one", "two"]
    assert teacher["network_passes"] == {"trunk.blocks": 64}  # one AR step per token of the 8x8 grid
    assert one["network_passes"] == {"trunk.blocks": 1} and two["network_passes"] == {"trunk.blocks": 2}
    assert (one["steps"], two["steps"]) == (1, 2)
    for r in report["rows"]:
        assert r["num_samples"] == 10 and 0.0 <= r["class_fidelity"] <= 1.0 and r["fcd"] >= 0
        assert set(r["seconds_per_image"]) == {"1", "3"}
        assert all(v["wall"] > 0 and v["cpu"] > 0 for v in r["seconds_per_image"].values())
        assert Image.open(r["grid"]).size[1] > 4 * Image.open(r["grid"]).size[0]  # 10 class rows of 1 sample
    assert Image.open(tmp_path / "grids.png").size[0] > 3 * Image.open(teacher["grid"]).size[0]
    assert json.loads((tmp_path / "report.json").read_text())["meta"]["teacher_options"] == "cfg_scale=2.5"
    md = (tmp_path / "report.md").read_text()
    assert md.count("\n| ") == 5  # header, rule, 3 rows and "| 1.0x |" in md


@pytest.mark.parametrize("spec, match", [("one", "NAME=FOLDER"), ("teacher=x", "may not be 'teacher'"),
                                         ("a=b:3", "1 or 2"), ("a=/no/such/folder", "no folder")])
def test_bad_student_specs_are_named(spec, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        ds.parse_students([spec])


def test_a_name_given_twice_is_refused(students):
    with pytest.raises(ValueError, match="twice"):
        ds.parse_students([f"a={students / 'one'}", f"a={students / 'two'}:2"])
