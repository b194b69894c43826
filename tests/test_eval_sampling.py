"""Sharded evaluation sampling: index-stable seeds and labels, resume, sidecar, npz, two processes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from visar.eval import sampling
from visar.eval.io import finished_indices
from visar.eval.sidecar import SampleRecord, load_sidecar, save_sidecar
from visar.generators.base import Condition, Generator
from visar.pipeline import Pipeline
from visar.tokenizers.base import Tokenizer
from visar.utils.config import register_config


class TinyTokenizer(Tokenizer):
    """Test double of the discrete Tokenizer interface: 4x4 tokens -> 16x16 images."""

    kind = "discrete"
    downsample = 4

    @register_config
    def __init__(self, vocab_size: int = 16, dim: int = 8):
        super().__init__()
        self.vocab_size = vocab_size
        self.codebook = nn.Embedding(vocab_size, dim)
        self.enc = nn.Conv2d(3, dim, 4, stride=4)
        self.dec = nn.ConvTranspose2d(dim, 3, 4, stride=4)

    def encode(self, images):
        self.check_images(images)
        z = self.enc(images).permute(0, 2, 3, 1)  # [B, h, w, C]
        return torch.cdist(z.flatten(1, 2), self.codebook.weight[None]).argmin(-1).view(z.shape[:3])

    def decode(self, tokens):
        return torch.tanh(self.dec(self.codebook(tokens).permute(0, 3, 1, 2)))


class TinyGenerator(Generator):
    """Test double of the Generator interface: independent categorical tokens per class, with CFG."""

    token_kind = "discrete"

    @register_config
    def __init__(self, num_classes: int = 10, vocab_size: int = 16, grid: int = 4):
        super().__init__()
        self.num_classes, self.vocab_size, self.grid = num_classes, vocab_size, grid
        self.table = nn.Embedding(num_classes + 1, grid * grid * vocab_size)

    def loss(self, tokens, cond):
        logits = self.table(cond.labels).view(-1, self.vocab_size)
        return nn.functional.cross_entropy(logits, tokens.reshape(-1))

    def sample(self, cond: Condition, generator=None, cfg_scale: float = 1.0, temperature: float = 1.0):
        B = cond.batch_size
        logits = self.table(cond.labels).view(B, -1, self.vocab_size)
        if cfg_scale != 1.0:
            null = self.table(torch.full_like(cond.labels, self.num_classes)).view(B, -1, self.vocab_size)
            logits = null + cfg_scale * (logits - null)
        probs = torch.softmax(logits / temperature, -1).view(-1, self.vocab_size)
        idx = torch.multinomial(probs, 1, generator=generator)
        return idx.view(B, self.grid, self.grid)


def tiny_pipeline(seed: int = 0) -> Pipeline:
    torch.manual_seed(seed)
    tok, gen = TinyTokenizer(), TinyGenerator()
    with torch.no_grad():
        gen.table.weight.mul_(3.0)
    return Pipeline(tok, gen)


def _read_npz(path):
    with np.load(path) as f:
        return f["arr_0"], f["arr_1"]


def test_labels_are_pure_functions_of_the_index():
    bal = sampling.class_labels("balanced", 25, 10)
    assert bal.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert torch.bincount(sampling.class_labels("balanced", 50, 10)).tolist() == [5] * 10
    r1, r2 = sampling.class_labels("random", 40, 7, seed=3), sampling.class_labels("random", 90, 7, seed=3)
    assert torch.equal(r1, r2[:40]) and int(r2.max()) < 7 and len(set(r2.tolist())) == 7
    assert not torch.equal(r1, sampling.class_labels("random", 40, 7, seed=4))
    with pytest.raises(ValueError, match="balanced"):
        sampling.class_labels("uniform", 4, 10)


def test_sample_folder_npz_and_sidecar(tmp_path):
    pipe = tiny_pipeline()
    rec = sampling.sample_to_folder(pipe, tmp_path / "s", 11, "random", seed=5, batch_size=4, progress=False,
                                    cfg_scale=2.0, model_name="tiny")
    assert finished_indices(tmp_path / "s" / "images") == set(range(11))
    arr, lab = _read_npz(tmp_path / "s" / "samples.npz")
    assert arr.shape == (11, 16, 16, 3) and arr.dtype == np.uint8
    assert lab.tolist() == sampling.class_labels("random", 11, 10, seed=5).tolist()
    assert rec.status == "complete" and rec.image_size == [16, 16] and rec.labels == "random"
    assert rec.options == {"cfg_scale": 2.0, "temperature": 1.0}  # generator defaults merged in
    assert rec.model_name == "tiny" and len(rec.weights_state_sha256) == 64 and rec.num_processes == 1
    # batch 1 (indices 4..7) is what generate() gives for that batch's seed
    ref = pipe.generate(sampling.class_labels("random", 11, 10, seed=5)[4:8].tolist(),
                        seed=sampling.chunk_seed(5, 4), cfg_scale=2.0)
    from visar.pipeline import to_uint8

    assert np.array_equal(arr[4:8], to_uint8(ref).numpy())
    # resize (bicubic, before the uint8 cast)
    rec2 = sampling.sample_to_folder(pipe, tmp_path / "r", 3, "balanced", seed=0, batch_size=4, resize=8,
                                     progress=False)
    assert rec2.image_size == [8, 8] and rec2.resize == 8
    # LlamaGen's evaluation: F.interpolate(x, size, mode="bicubic") on [-1, 1], then clamp(127.5 x + 128) -> uint8
    x = pipe.generate(sampling.class_labels("balanced", 3, 10)[:3].tolist(), seed=sampling.chunk_seed(0, 0))
    x = torch.nn.functional.interpolate(x, size=(8, 8), mode="bicubic")
    official = torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    arr8, _ = _read_npz(tmp_path / "r" / "samples.npz")
    assert np.array_equal(arr8, official)


def test_sidecar_round_trip(tmp_path):
    rec = SampleRecord(model_name="m", num=3, labels="balanced", num_classes=10, seed=1, batch_size=2,
                       options={"cfg_scale": 4.0, "top_k": 0, "cfg_schedule": "linear", "scales": [1, 2]},
                       weights_state_sha256="ab" * 32, weights_sha256={"generator.safetensors": "cd" * 32},
                       resize=256, dtype="bfloat16", num_processes=8, departures=["departure: cfg_scale 2.0"],
                       protocol={"cfg_scale": 4.0, "source": "paper"})
    path = save_sidecar(rec, tmp_path)
    assert load_sidecar(path) == rec and load_sidecar(tmp_path) == rec
    assert json.loads(path.read_text())["format"] == "visar-eval-samples"
    with pytest.raises(FileNotFoundError, match="samples.json"):
        load_sidecar(tmp_path / "nothing")


class _Interrupt(Exception):
    pass


class _FailingPipeline:
    """Wraps a pipeline and raises after ``n`` successful batches (an interrupted run)."""

    def __init__(self, pipe, n):
        self.pipe, self.n, self.generator, self.tokenizer = pipe, n, pipe.generator, pipe.tokenizer

    def to(self, *a, **k):
        return self

    def generate(self, *a, **k):
        if self.n == 0:
            raise _Interrupt
        self.n -= 1
        return self.pipe.generate(*a, **k)


def test_resume_without_duplicates_or_gaps(tmp_path):
    pipe = tiny_pipeline()
    full = sampling.sample_to_folder(pipe, tmp_path / "full", 13, "balanced", seed=2, batch_size=3, progress=False)
    with pytest.raises(_Interrupt):
        sampling.sample_to_folder(_FailingPipeline(pipe, 2), tmp_path / "part", 13, "balanced", seed=2,
                                  batch_size=3, progress=False)
    part_dir = tmp_path / "part"
    assert finished_indices(part_dir / "images") == set(range(6))
    assert load_sidecar(part_dir).status == "incomplete"
    (part_dir / "images" / "000004.png").unlink()  # a gap inside a finished batch
    (part_dir / "images" / ".000007.png.x.tmp").write_bytes(b"partial")  # debris of a killed write
    rec = sampling.sample_to_folder(pipe, part_dir, 13, "balanced", seed=2, batch_size=3, progress=False)
    assert sorted(p.name for p in (part_dir / "images").iterdir()) == [f"{i:06d}.png" for i in range(13)]
    a, _ = _read_npz(tmp_path / "full" / "samples.npz")
    b, _ = _read_npz(part_dir / "samples.npz")
    assert np.array_equal(a, b) and rec.status == "complete" and full.weights_state_sha256 == rec.weights_state_sha256
    # other settings in the same folder are refused
    with pytest.raises(ValueError, match="other settings.*seed"):
        sampling.sample_to_folder(pipe, part_dir, 13, "balanced", seed=3, batch_size=3, progress=False)
    with pytest.raises(ValueError, match="other settings.*weights_state_sha256"):
        sampling.sample_to_folder(tiny_pipeline(1), part_dir, 13, "balanced", seed=2, batch_size=3, progress=False)


def test_bad_sampling_inputs(tmp_path):
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="balanced' or 'random'"):
        sampling.sample_to_folder(pipe, tmp_path / "a", 4, None, progress=False)
    with pytest.raises(ValueError, match="num must be a positive int"):
        sampling.sample_to_folder(pipe, tmp_path / "a", 0, "balanced", progress=False)
    with pytest.raises(ValueError, match="exceeds the model's 10 classes"):
        sampling.sample_to_folder(pipe, tmp_path / "a", 4, "balanced", num_classes=1000, progress=False)
    with pytest.raises(ValueError, match="resize"):
        sampling.sample_to_folder(pipe, tmp_path / "a", 4, "balanced", resize=2, progress=False)
    (tmp_path / "b" / "images").mkdir(parents=True)
    (tmp_path / "b" / "images" / "000000.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="no samples.json"):
        sampling.sample_to_folder(pipe, tmp_path / "b", 4, "balanced", progress=False)
    # a bad option value is refused by the sampler's own check, before anything is written
    with pytest.raises(TypeError, match="cfg_scale must be a number"):
        sampling.sample_to_folder(pipe, tmp_path / "c", 4, "balanced", progress=False, cfg_scale=object())
    assert not (tmp_path / "c").exists()
    # an option the sampler accepts but JSON cannot hold cannot be recorded
    with pytest.raises(TypeError, match="JSON"):
        sampling._jsonable_options({"orders": object()})


def llamagen_tiny_pipeline() -> Pipeline:
    """The tiny LlamaGen twins (VQ + cached AR GPT, random weights) when registered, else the test double."""
    from visar import zoo

    try:
        torch.manual_seed(0)
        return Pipeline(zoo.create("llamagen-vq-tiny"), zoo.create("llamagen-gpt-tiny"))
    except KeyError:
        return tiny_pipeline()


def _two_process_worker(out_dir):
    from accelerate import Accelerator

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    sampling.sample_to_folder(llamagen_tiny_pipeline(), out_dir, 10, "random", seed=7, batch_size=3,
                              progress=False, accelerator=acc, cfg_scale=1.5)


def test_two_processes_give_the_same_images_as_one(tmp_path):
    from accelerate import notebook_launcher
    from accelerate.state import AcceleratorState

    # another test of the session may have built an Accelerator; the launcher refuses to start then
    AcceleratorState._reset_state(True)
    one = sampling.sample_to_folder(llamagen_tiny_pipeline(), tmp_path / "one", 10, "random", seed=7,
                                    batch_size=3, progress=False, cfg_scale=1.5)
    notebook_launcher(_two_process_worker, args=(str(tmp_path / "two"),), num_processes=2,
                      use_port="29517")
    two = load_sidecar(tmp_path / "two")
    assert two.num_processes == 2 and one.num_processes == 1 and not one.differences(two)
    a, la = _read_npz(tmp_path / "one" / "samples.npz")
    b, lb = _read_npz(tmp_path / "two" / "samples.npz")
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert len(np.unique(a.reshape(10, -1), axis=0)) == 10  # ten distinct images, not one repeated


def test_sampler_is_recorded_and_reproduces_the_images(tmp_path):
    """``visar eval sample --sampler NAME --option K=V``: samples.json names the sampler and its options, which
    redraw the images; a folder made with another sampler is not extended."""
    from visar.eval import cli
    from visar.eval.io import image_name, read_image
    from visar.utils.images import to_uint8

    pipe = llamagen_tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "jacobi"
    argv = ["sample", str(tmp_path / "pipe"), "--out", str(out), "--num", "3", "--labels", "balanced",
            "--batch-size", "2", "--no-progress"]
    assert cli.main(argv + ["--sampler", "jacobi", "--option", "window=4"]) == 0
    rec = load_sidecar(out)
    assert rec.sampler == "jacobi" and rec.options["window"] == 4
    labels = sampling.labels_range(rec.labels, 2, 4, rec.num_classes, rec.seed).tolist()
    again = pipe.generate(labels, seed=sampling.chunk_seed(rec.seed, 2), sampler=rec.sampler, **rec.options)
    assert np.array_equal(to_uint8(again)[0].numpy(), read_image(out / "images" / image_name(2, rec.index_width)))
    assert cli.main(argv[:5] + ["4"] + argv[6:]) == 2  # the model's own sampler may not extend it
    assert cli.main(argv + ["--sampler", "jacobbi"]) == 2  # unknown name: one error line
    # a record written before samplers were recorded was drawn by the pipeline's own sampler
    old = tmp_path / "old"
    assert cli.main(argv[:3] + [str(old)] + argv[4:]) == 0
    data = json.loads((old / "samples.json").read_text())
    assert data.pop("sampler") == "autoregressive"
    (old / "samples.json").write_text(json.dumps(data))
    assert cli.main(argv[:3] + [str(old), "--num", "4"] + argv[6:]) == 0
    assert cli.main(argv[:3] + [str(old)] + argv[4:] + ["--sampler", "jacobi"]) == 2


def test_generate_balanced_seeds_each_batch_by_its_first_index():
    from types import SimpleNamespace

    from visar.eval.sampling import chunk_seed, generate_balanced

    calls = []

    def generate(labels, seed, **options):
        calls.append((labels.tolist(), seed, options))
        return torch.full((len(labels), 3, 4, 4), seed % 7 / 7.0, dtype=torch.float64)

    pipe = SimpleNamespace(generator=SimpleNamespace(num_classes=3), generate=generate)
    images, labels = generate_balanced(pipe, 7, 3, 5, cfg_scale=2.0)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0] and images.shape == (7, 3, 4, 4)
    assert images.dtype == torch.float32
    assert [c[0] for c in calls] == [[0, 1, 2], [0, 1, 2], [0]]  # the last batch is shorter
    assert [c[1] for c in calls] == [chunk_seed(5, 0), chunk_seed(5, 3), chunk_seed(5, 6)]
    assert all(c[2] == {"cfg_scale": 2.0} for c in calls)
    for bad in ({"num": 0}, {"batch": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            generate_balanced(pipe, **{"num": 7, "batch": 3, "seed": 0, **bad})
