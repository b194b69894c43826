"""The bad-input sweep of issue 28, as tables that can be rerun and extended.

Every case is what a user may type or pass; each must fail early with a clear message (CLI: one
``ERROR`` line and exit status 2, or argparse's one-line usage error with status 2; Python: a
``TypeError`` / ``ValueError`` naming the argument), never with a traceback from deep inside.
To add a case, add a row to :data:`CLI_CASES`, :data:`USAGE_CASES`, :data:`API_CASES` or
:data:`LOAD_CASES` (inputs accepted as a diffusers user expects: :data:`ACCEPTED_CASES`).
"""
from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch

from visar import zoo
from visar.cli import main
from visar.generators.base import Generator
from visar.pipeline import Pipeline

# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths the cases name: a tiny saved pipeline and broken copies of it, random bytes, a plain file."""
    root = tmp_path_factory.mktemp("bad")
    import numpy as np

    torch.manual_seed(0)
    pipe = root / "pipe"
    Pipeline(zoo.create("llamagen-vq-tiny"), zoo.create("llamagen-gpt-tiny")).save_pretrained(pipe)
    for name, broken in (("badgen", "generator/config.json"), ("badpipe", "pipeline.json")):
        shutil.copytree(pipe, root / name)
        (root / name / broken).write_text('{"class": "visar.generators')  # cut off mid-string
    shutil.copytree(pipe, root / "nogen")
    shutil.rmtree(root / "nogen" / "generator")  # a component folder named in pipeline.json is missing
    shutil.copytree(pipe, root / "noweights")
    (root / "noweights" / "generator" / "model.safetensors").unlink()
    shutil.copytree(pipe, root / "novisar")  # a config.json of some other library (no "_visar" entry)
    (root / "novisar" / "generator" / "config.json").write_text('{"hidden_size": 32}')
    shutil.copytree(pipe, root / "nantok")
    from visar.utils.io import load_safetensors, save_safetensors

    state = load_safetensors(root / "nantok" / "tokenizer" / "model.safetensors")
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key].view(-1)[0] = float("nan")
    save_safetensors(state, root / "nantok" / "tokenizer" / "model.safetensors")
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    (root / "rand.pt").write_bytes(noise)
    (root / "randpickle.pt").write_bytes(b"\x80\x54" + noise)  # looks like a pickle header (protocol 84)
    (root / "file").write_text("a file, not a folder")
    np.savez(root / "nolabels.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    return {"tmp": str(root), "pipe": str(pipe), "badgen": str(root / "badgen"), "badpipe": str(root / "badpipe"),
            "nantok": str(root / "nantok"), "rand": str(root / "rand.pt"),
            "randpickle": str(root / "randpickle.pt"), "file": str(root / "file"),
            "nolabels": str(root / "nolabels.npz"), "nogen": str(root / "nogen"),
            "noweights": str(root / "noweights"), "novisar": str(root / "novisar")}


def _fill(argv, files, tmp):
    return [a.format(**files, out=str(tmp)) for a in argv]


# ---------------------------------------------------------------------------------------------- CLI: errors
#: (id, argv, text the one ERROR line must hold, path that must not exist afterwards or None)
CLI_CASES = [
    ("sample-classes-abc", ["sample", "--model", "{pipe}", "--classes", "abc", "--out", "{out}/o"],
     "--classes: 'abc' is not a class id", None),
    ("sample-classes-empty", ["sample", "--model", "{pipe}", "--classes", ",", "--out", "{out}/o"],
     "give at least one class id", None),
    ("sample-class-out-of-range", ["sample", "--model", "{pipe}", "--classes", "10", "--out", "{out}/o"],
     "outside [0, 10)", None),
    ("sample-out-unwritable", ["sample", "--model", "{pipe}", "--out", "{file}/sub"], "is a file, not a folder", None),
    ("sample-model-missing", ["sample", "--model", "{tmp}/nope", "--out", "{out}/o"], "neither a bundled model", None),
    ("sample-model-is-a-checkpoint-file", ["sample", "--model", "{rand}", "--out", "{out}/o"],
     "neither a bundled model", None),
    ("sample-old-option-name", ["sample", "--model", "{pipe}", "--option", "topk=3", "--out", "{out}/o"],
     "now called 'top_k'", "{out}/o/grid.png"),
    ("sample-negative-cfg", ["sample", "--model", "{pipe}", "--cfg-scale", "-1", "--out", "{out}/o"],
     "cfg_scale must be >= 0", "{out}/o/grid.png"),
    ("sample-option-wrong-type", ["sample", "--model", "{pipe}", "--option", "cfg_scale=\"2\"", "--out", "{out}/o"],
     "cfg_scale must be a number", None),
    ("sample-invalid-generator-json", ["sample", "--model", "{badgen}", "--out", "{out}/o"],
     "generator/config.json is not valid JSON", None),
    ("sample-invalid-pipeline-json", ["sample", "--model", "{badpipe}", "--out", "{out}/o"],
     "pipeline.json is not valid JSON", None),
    ("sample-nan-tokenizer-weight", ["sample", "--model", "{nantok}", "--out", "{out}/o"],
     "tokenizer/model.safetensors holds NaN or infinite weights", None),
    ("sample-device-typo", ["sample", "--model", "{pipe}", "--device", "gpu", "--out", "{out}/o"],
     "is not a device", None),
    ("convert-folder-as-checkpoint", ["convert", "llamagen", "--tokenizer", "{tmp}", "--generator", "{rand}",
                                      "--out", "{out}/c"], "is a folder, not a file", "{out}/c"),
    ("convert-random-bytes", ["convert", "llamagen", "--tokenizer", "{rand}", "--generator", "{rand}",
                              "--out", "{out}/c"], "not a valid checkpoint (corrupt or another format)", "{out}/c"),
    ("convert-random-bytes-like-a-pickle", ["convert", "llamagen", "--tokenizer", "{randpickle}", "--generator",
                                            "{rand}", "--out", "{out}/c"], "not a valid checkpoint", "{out}/c"),
    ("eval-sample-negative-cfg", ["eval", "sample", "{pipe}", "--out", "{out}/e", "--num", "2", "--labels", "balanced",
                                  "--cfg-scale", "-1"], "cfg_scale must be >= 0", "{out}/e"),
    ("eval-sample-num-steps-on-next-token", ["eval", "sample", "{pipe}", "--out", "{out}/e", "--num", "2", "--labels",
                                             "balanced", "--num-steps", "0"], "no option 'num_steps'", "{out}/e"),
    ("eval-sample-top-p-2", ["eval", "sample", "{pipe}", "--out", "{out}/e", "--num", "2", "--labels", "balanced",
                             "--option", "top_p=2"], "top_p", "{out}/e"),
    ("eval-sample-labels-not-chosen", ["eval", "sample", "{pipe}", "--out", "{out}/e", "--num", "2"],
     "--labels balanced", "{out}/e"),
    ("eval-sample-out-unwritable", ["eval", "sample", "{pipe}", "--out", "{file}/e", "--num", "2", "--labels",
                                    "balanced"], "is a file, not a folder", None),
    ("eval-shapes-npz-without-labels", ["eval", "shapes", "{nolabels}"], "--labels", None),
    ("eval-shapes-bad-labels-arg", ["eval", "shapes", "{nolabels}", "--labels", "a,b"],
     "neither a file nor comma-separated class ids", None),
    ("eval-fid-missing-samples", ["eval", "fid", "{tmp}/nope.npz", "--ref", "{tmp}/nope.npz", "--inception-weights",
                                  "{rand}"], "not found", None),
    ("tokenize-missing-tokenizer", ["tokenize", "--tokenizer", "{tmp}/nope", "--data", "shapes", "--size", "32",
                                    "--length", "4", "--out", "{out}/tok"], "not found", "{out}/tok"),
    ("tokenize-size-not-divisible", ["tokenize", "--tokenizer", "{pipe}", "--data", "shapes", "--size", "36",
                                     "--length", "2", "--out", "{out}/tok"], "not divisible", "{out}/tok"),
    ("tokenize-folder-without-path", ["tokenize", "--tokenizer", "{pipe}", "--out", "{out}/tok"],
     "--data folder needs --path", "{out}/tok"),
    ("models-no-match", ["models", "zzz-no-such"], "no model matches", None),
]


@pytest.mark.parametrize("argv, text, absent", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_user_errors_are_one_error_line_and_exit_2(argv, text, absent, files, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert main(_fill(argv, files, tmp_path)) == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert "\n" not in message and text in message, message
    assert "weights_only" not in message  # never advise unpickling a file visar could not read
    if absent:
        assert not os.path.exists(_fill([absent], files, tmp_path)[0]), "an early error must leave nothing behind"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_says_so(files, tmp_path, caplog):
    assert main(["sample", "--model", files["pipe"], "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    assert "CUDA is not available" in caplog.text and "corrupt" not in caplog.text


def test_unwritable_out_is_refused_before_the_model_loads(files, tmp_path, monkeypatch, caplog):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(zoo, "load", no_load)
    assert main(["sample", "--out", os.path.join(files["file"], "sub")]) == 2
    assert "--out" in caplog.text


# ---------------------------------------------------------------------------------------------- CLI: usage
#: (id, argv, text of argparse's one-line message)
USAGE_CASES = [
    ("sample-batch-size-0", ["sample", "--batch-size", "0"], "--batch-size: must be >= 1"),
    ("sample-num-0", ["sample", "--num", "0"], "--num: must be >= 1"),
    ("sample-num-not-int", ["sample", "--num", "two"], "--num: expected a positive integer"),
    ("sample-threads-negative", ["sample", "--threads", "-1"], "--threads: must be >= 0"),
    ("sample-unknown-flag", ["sample", "--bogus", "2"], "unrecognized arguments"),
    ("sample-unknown-sampler", ["sample", "--sampler", "nope"], "--sampler: invalid choice"),
    ("eval-sample-batch-size-0", ["eval", "sample", "m", "--out", "o", "--batch-size", "0"], "--batch-size"),
    ("eval-sample-num-processes-0", ["eval", "sample", "m", "--out", "o", "--num-processes", "0"], "--num-processes"),
    ("eval-fid-kid-subset-0", ["eval", "fid", "s", "--kid-subset-size", "0"], "--kid-subset-size"),
    ("tokenize-batch-size-0", ["tokenize", "--tokenizer", "t", "--out", "o", "--batch-size", "0"], "--batch-size"),
    ("no-command", [], "required"),
]


@pytest.mark.parametrize("argv, text", [c[1:] for c in USAGE_CASES], ids=[c[0] for c in USAGE_CASES])
def test_usage_errors_are_one_line_and_exit_2(argv, text, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and text in err[0], err


# ---------------------------------------------------------------------------------------------- Python API
def _images(fill=0.0, n=1, dtype=torch.float32):
    return torch.full((n, 3, 64, 64), fill, dtype=dtype)


#: (id, call on the tiny pipeline, exception type, regex of the message)
API_CASES = [
    ("pipe-empty-list", lambda p: p([]), ValueError, "at least one class id"),
    ("pipe-float-class", lambda p: p([0.5]), TypeError, "class_ids must be integer"),
    ("pipe-string", lambda p: p("cat"), TypeError, "class_ids must be integer"),
    ("pipe-bool", lambda p: p([True]), TypeError, "class_ids must be integer"),
    ("pipe-none-and-no-prompt", lambda p: p(None), ValueError, "give class ids"),
    ("pipe-class-out-of-range", lambda p: p([10]), ValueError, r"\[0, 10\)"),
    ("pipe-cfg-as-string", lambda p: p([0], cfg_scale="2"), TypeError, "cfg_scale must be a number"),
    ("pipe-top-p-2", lambda p: p([0], top_p=2.0), ValueError, "top_p"),
    ("pipe-unknown-option", lambda p: p([0], cfg=2.0), TypeError, "now called 'cfg_scale'"),
    ("pipe-seed-as-string", lambda p: p([0], seed="0"), TypeError, "seed must be an int"),
    ("pipeline-arguments-swapped", lambda p: Pipeline(p.generator, p.tokenizer), TypeError,
     r"Pipeline\(tokenizer, generator\)"),
    ("generator-sample-empty", lambda p: p.generator.sample([]), ValueError, "at least one class id"),
    ("encode-empty-batch", lambda p: p.tokenizer.encode(_images(n=0)), ValueError, "empty batch"),
    ("encode-nan", lambda p: p.tokenizer.encode(_images(float("nan"))), ValueError, "NaN or infinite"),
    ("encode-inf", lambda p: p.tokenizer.encode(_images(float("inf"))), ValueError, "NaN or infinite"),
    ("encode-float64", lambda p: p.tokenizer.encode(_images(dtype=torch.float64)), TypeError, "torch.float64"),
    ("encode-uint8", lambda p: p.tokenizer.encode(_images(dtype=torch.uint8)), TypeError, "uint8"),
    ("encode-grayscale", lambda p: p.tokenizer.encode(torch.zeros(1, 1, 64, 64)), ValueError, "RGB"),
    ("pipe-output-type-unknown", lambda p: p([0], output_type="latent"), ValueError, "output_type must be one of"),
    ("pipe-output-type-upper-case", lambda p: p([0], output_type="PIL"), ValueError,
     "the names are lower case: output_type='pil'"),
    ("pipe-compile-yes", lambda p: p([0], compile="yes"), TypeError, "compile must be True or False, got str"),
    ("pipe-guidance-scale-and-cfg-differ", lambda p: p([0], guidance_scale=2.0, cfg_scale=3.0), TypeError,
     "name the same option"),
    ("pipe-to-int-dtype", lambda p: p.to(torch.int8), TypeError, "dtype must be a floating torch dtype"),
    ("pipe-to-dtype-typo", lambda p: p.to("bfloat"), ValueError, r"Pipeline.to\('bfloat'\).*a dtype goes as"),
    ("pipe-to-two-dtypes", lambda p: p.to(torch.float16, dtype="bfloat16"), TypeError, "two dtypes"),
]


@pytest.fixture(scope="module")
def tiny(files):
    return zoo.load(files["pipe"])


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_python_api_bad_inputs(call, exc, match, tiny):
    with pytest.raises(exc, match=match):
        call(tiny)


#: (id, call on the paths of :func:`files`, exception type, regex of the message): loading saved folders
LOAD_CASES = [
    ("load-component-folder-missing", lambda f: Pipeline.from_pretrained(f["nogen"]), FileNotFoundError,
     r"nogen/generator: the component folder 'generator' named in .*pipeline.json is missing"),
    ("load-config-not-json", lambda f: Pipeline.from_pretrained(f["badgen"]), ValueError,
     "generator/config.json is not valid JSON"),
    ("load-config-of-another-library", lambda f: Pipeline.from_pretrained(f["novisar"]), ValueError,
     "generator/config.json is not a visar component config"),
    ("load-weights-missing", lambda f: Pipeline.from_pretrained(f["noweights"]), FileNotFoundError,
     "generator/model.safetensors not found"),
    ("load-torch-dtype-abbreviation", lambda f: Pipeline.from_pretrained(f["pipe"], torch_dtype="bf16"), TypeError,
     "torch_dtype must be a floating torch dtype such as torch.bfloat16 \\(or its name, 'bfloat16'\\), got 'bf16'"),
    ("load-torch-dtype-int", lambda f: Pipeline.from_pretrained(f["pipe"], torch_dtype=torch.int64), TypeError,
     "torch_dtype must be a floating torch dtype"),
    ("load-compile-is-a-sampling-option", lambda f: Pipeline.from_pretrained(f["pipe"], compile=True), TypeError,
     "unexpected keyword argument 'compile'"),
    ("load-generator-from-a-tokenizer-folder",
     lambda f: Generator.from_pretrained(os.path.join(f["pipe"], "tokenizer")), TypeError,
     "VQTokenizer .*which is not a Generator"),
]


@pytest.mark.parametrize("call, exc, match", [c[1:] for c in LOAD_CASES], ids=[c[0] for c in LOAD_CASES])
def test_loading_bad_folders(call, exc, match, files):
    with pytest.raises(exc, match=match):
        call(files)


#: (id, call on the paths of :func:`files`, what the result must satisfy): inputs a diffusers user would
#: expect to work, accepted
ACCEPTED_CASES = [
    ("torch-dtype-by-name", lambda f: Pipeline.from_pretrained(f["pipe"], torch_dtype="bfloat16"),
     lambda p: p.dtype == torch.bfloat16),
    ("to-dtype-by-name", lambda f: zoo.load(f["pipe"]).to("float16"), lambda p: p.dtype == torch.float16),
    ("to-device-and-dtype-by-name", lambda f: zoo.load(f["pipe"]).to("cpu", "torch.float64"),
     lambda p: p.dtype == torch.float64 and p.device.type == "cpu"),
]


@pytest.mark.parametrize("call, check", [c[1:] for c in ACCEPTED_CASES], ids=[c[0] for c in ACCEPTED_CASES])
def test_accepted_like_diffusers(call, check, files):
    assert check(call(files))


def test_empty_batch_of_every_family_is_refused_before_the_model():
    for name in ("xar-tiny", "var-tiny", "mar-tiny", "flowar-tiny", "llamagen-gpt-tiny"):
        with pytest.raises(ValueError, match="at least one class id"):
            zoo.create(name).sample([])


def test_broken_files_name_the_file(files):
    with pytest.raises(ValueError, match="generator/config.json is not valid JSON"):
        zoo.load(files["badgen"])
    with pytest.raises(ValueError, match="pipeline.json is not valid JSON"):
        zoo.load(files["badpipe"])
    with pytest.raises(ValueError, match="tokenizer/model.safetensors holds NaN"):
        zoo.load(files["nantok"])
    from visar.convert.common import CheckpointError, read_checkpoint

    with pytest.raises(CheckpointError, match=r"not a valid checkpoint \(corrupt or another format\)") as e:
        read_checkpoint(files["rand"])
    assert "weights_only" not in str(e.value)
    with pytest.raises(IsADirectoryError, match="is a folder, not a file"):
        read_checkpoint(files["tmp"])
