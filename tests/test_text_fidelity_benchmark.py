"""benchmarks/t2i_caption_fidelity.py: captions parse to the renderer's ground truth, the attribute readers
recover it from real shapes, they fail on images of other captions, and the script runs end to end on a
tiny text-to-image pipeline (wiring only, not quality)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from visar.data.shapes import BACKGROUNDS, CLASSES, COLOURS, ShapesDataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    path = ROOT / "benchmarks" / "t2i_caption_fidelity.py"
    spec = importlib.util.spec_from_file_location("t2i_caption_fidelity", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _size(scale: float) -> str:
    return "small" if scale < 0.48 else ("medium" if scale < 0.64 else "large")


def test_captions_parse_to_the_renderers_ground_truth(bench):
    ds = ShapesDataset(size=32, length=600, split="test")
    a = ds.attributes(range(600))
    for i, caption in enumerate(ds.captions(range(600))):
        got = bench.parse_caption(caption)
        assert got["shape"] == CLASSES[a["label"][i]] and got["colour"] == list(COLOURS)[a["fg"][i]]
        assert got["background"] == list(BACKGROUNDS)[a["bg"][i]] and got["size"] == _size(a["scale"][i])
        assert got["position"] == bench._position_name(a["cx"][i], a["cy"][i])
    with pytest.raises(ValueError, match="not a shapes caption"):
        bench.parse_caption("a photo of a cat")
    assert bench.held_out_phrase("a small brown set of stripes on a grey background") == "brown set of stripes"
    assert bench.held_out_phrase("a small red circle on a dark red background") is None


def test_readers_recover_real_shapes_and_fail_on_other_captions(bench):
    from visar.eval.classifier import load_classifier

    ds = ShapesDataset(size=32, length=300, split="test")
    asked = [bench.parse_caption(c) for c in ds.captions(range(300))]
    images = ds.render(range(300))[0]
    geometry, clf = bench.shape_geometry(), load_classifier()
    right = bench.score(asked, bench.read_images(images, asked, clf, geometry))
    assert right["num"] == 300 and min(right[a] for a in ("shape", "colour", "background")) >= 0.98
    assert right["size"] >= 0.93 and right["position"] >= 0.93 and right["all_correct"] >= 0.88
    shuffled = torch.roll(images, 1, dims=0)  # each image read against the caption of another one
    wrong = bench.score(asked, bench.read_images(shuffled, asked, clf, geometry))
    assert wrong["all_correct"] < 0.05 and wrong["colour"] < 0.3 and wrong["shape"] < 0.3


def test_readers_only_mode(bench):
    res = bench.main(["--readers-only", "--num", "40"])
    assert res["rendered"]["num"] == res["through_tokenizer"]["num"] == 40
    assert res["rendered"]["colour"] >= 0.95 and res["through_tokenizer"]["shape"] >= 0.85


def test_script_runs_end_to_end_on_a_tiny_pipeline(bench, tmp_path):
    from visar import zoo
    from visar.pipeline import Pipeline
    from visar.text.tiny import TinyTextEncoder

    torch.manual_seed(0)
    vq = zoo.create("llamagen-vq-tiny", ch_mult=(1, 1, 2))  # downsamples by 4: 8x8 tokens, 32 px like the shapes VQ
    gen = zoo.create("llamagen-gpt-tiny", grid_size=8, caption_dim=16, cls_token_num=24)
    Pipeline(vq, gen, text_encoder=TinyTextEncoder(dim=16, max_length=24)).save_pretrained(tmp_path / "m")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "captions.json").write_text(json.dumps({"captions": []}))
    with pytest.warns(UserWarning, match="truncated"):
        res = bench.main(["--model", str(tmp_path / "m"), "--num", "3", "--batch-size", "3", "--cfg-scale", "1.0",
                          "--train-cache", str(cache), "--out", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["groups"].keys() == res["groups"].keys() == {
        "seen_pairs", "seen_pairs_novel_caption", "held_out_pairs"}
    assert res["groups"]["held_out_pairs"]["num"] == 3 and res["groups"]["seen_pairs_novel_caption"]["num"] == 3
    assert res["options"]["cfg_scale"] == 1.0 and set(res["reader_ceiling"]) == {"seen_pairs", "held_out_pairs"}
    assert sum(v["num"] for v in res["groups"]["seen_pairs"]["shape_by_asked"]["size"].values()) == 3


def test_breakdown_counts_each_asked_value(bench):
    asked = [{"shape": "star", "size": "small"}, {"shape": "star", "size": "large"}, {"shape": "ring", "size": "small"}]
    read = [{"shape": "star", "size": "small"}, {"shape": "circle", "size": "large"}, {"shape": "ring", "size": "large"}]
    assert bench.breakdown(asked, read, "shape", "size") == {"large": {"num": 1, "accuracy": 0.0},
                                                             "small": {"num": 2, "accuracy": 1.0}}
    assert bench.breakdown(asked, read, "size", "shape") == {"ring": {"num": 1, "accuracy": 0.0},
                                                             "star": {"num": 2, "accuracy": 1.0}}
