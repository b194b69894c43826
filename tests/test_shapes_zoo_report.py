"""benchmarks/shapes_zoo_report.py on the bundled model (tiny sample counts: checks wiring, not quality)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from benchmark_loader import load_benchmark
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


zr = load_benchmark("shapes_zoo_report")


def test_report_two_models(tmp_path):
    from PIL import Image

    threads = torch.get_num_threads()
    bundled = str(ROOT / "visar" / "assets" / "shapes-llamagen")
    try:
        report = zr.main(["--out-dir", str(tmp_path), "--model", f"a={bundled}", "--model", f"b={bundled}",
                          "--option", "b:cfg_scale=1.0", "--samples", "10", "--batch", "5", "--speed-batches", "1",
                          "--num-reference", "20", "--grid-per-class", "2", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    a, b = report["models"]
    assert (a["name"], b["name"]) == ("a", "b")
    stored = json.loads((ROOT / "visar" / "assets" / "shapes-llamagen" / "pipeline.json").read_text())
    assert a["stored_defaults"] == stored["sampling_defaults"] and a["stored_defaults"]["cfg_scale"] > 1.0
    assert a["sampling_options"]["cfg_scale"] == stored["sampling_defaults"]["cfg_scale"]
    assert b["sampling_options"]["cfg_scale"] == 1.0 and b["overrides"] == {"cfg_scale": 1.0}
    for r in (a, b):
        assert r["num_samples"] == 10 and r["image_size"] == 32
        assert 0.0 <= r["class_fidelity"] <= 1.0 and abs(r["class_fidelity"] * 10 - round(r["class_fidelity"] * 10)) < 1e-6
        assert r["images_per_s"] > 0 and r["fcd"] >= 0
        assert r["network_passes"] == {"trunk.blocks": 64}  # one AR step per token of the 8x8 grid
        assert r["generator_params"] == sum(p.numel() for p in
                                            __import__("visar").Pipeline.from_pretrained(bundled).generator.parameters())
        w, h = Image.open(r["grid"]).size
        assert h > 4 * w  # 10 class rows of 2 samples
    assert json.loads((tmp_path / "report.json").read_text())["models"][1]["overrides"] == {"cfg_scale": 1.0}
    md = (tmp_path / "report.md").read_text()
    assert md.count("| NextTokenGenerator |") == 2 and "cfg_scale=1.0" in md
    assert "| model | circle | square |" in md and md.count("\n| a | ") == 2  # main table and per-class table
    for r in (a, b):
        assert sum(map(sum, r["confusion"])) == 10 and len(r["per_class_fidelity"]) == 10


def test_pass_counter_counts_first_block_of_each_stack():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
            self.b = nn.ModuleList([nn.Sequential(nn.ModuleList([nn.Linear(2, 2)]))])

    net, x = Net(), torch.zeros(1, 2)
    with zr.PassCounter(net) as c:
        for _ in range(3):
            net.a[1](net.a[0](x))
        net.b[0][0][0](x)  # nested stack: not counted on its own
    net.a[0](x)  # after the context: hooks removed
    assert c.counts == {"a": 3, "b": 0}


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="NAME=PATH"):
        zr.parse_models(["just_a_path"])
    with pytest.raises(ValueError, match="twice"):
        zr.parse_models(["a=x", "a=y"])
    with pytest.raises(ValueError, match="names model 'c'"):
        zr.parse_options(["c:cfg_scale=2"], ["a", "b"])
    assert zr.parse_options(["cfg_scale=2", "a:top_k=[1, 2]"], ["a"]) == ({"cfg_scale": 2}, {"a": {"top_k": [1, 2]}})
    with pytest.raises(SystemExit, match="at least one"):
        zr.main(["--out-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="not a multiple of a's 10 classes"):
        zr.main(["--out-dir", str(tmp_path), "--model", f"a={ROOT / 'visar/assets/shapes-llamagen'}", "--samples", "7"])
