"""Text-to-image pipelines: ``pipe(prompts=[...])``, the text encoder saved and loaded as a component, clear
errors for class ids to a text model and prompts to a class model, and an official LlamaGen t2i fixture model
run end to end through the Pipeline from prompts."""
from __future__ import annotations

import json

import pytest
import torch

from visar import zoo
from visar.conditions import Condition
from visar.pipeline import Pipeline
from visar.text.base import TextEncoder, TokenizedPrompts
from visar.text.tiny import TinyTextEncoder


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    enc = TinyTextEncoder(dim=16, max_length=12)
    gen = zoo.create("llamagen-gpt-tiny", caption_dim=16, cls_token_num=12)
    torch.nn.init.normal_(gen.head.weight, std=0.5)  # LlamaGen starts its logits head at zero: make prompts matter
    return Pipeline(zoo.create("llamagen-vq-tiny"), gen, text_encoder=enc, sampling_defaults={"cfg_scale": 3.0})


def test_prompts_condition_the_generator(pipe):
    prompts = ["red star", "blue ring"]
    images = pipe.generate(prompts=prompts, seed=0, top_k=1)
    cond = pipe.text_encoder(prompts)
    tokens = pipe.generator.sample(cond, generator=torch.Generator().manual_seed(0), cfg_scale=3.0, top_k=1)
    assert images.shape == (2, 3, 64, 64) and torch.equal(images, pipe.tokenizer.decode(tokens).clamp(-1, 1))
    assert not torch.equal(images[0], images[1])  # different prompts, different (greedy) images
    assert torch.equal(pipe.generate(prompts=prompts, seed=5), pipe.generate(prompts=prompts, seed=5))
    pil = pipe(prompts=["red star"], seed=0, cfg_scale=1.0)
    assert len(pil) == 1 and pil[0].size == (64, 64)
    # a ready Condition passes through as class_ids (caption features computed elsewhere)
    assert torch.equal(pipe.generate(cond, seed=0, top_k=1), images)


def test_empty_prompt_is_the_encoders_null(pipe):
    a = pipe.generate(prompts=[""], seed=1, top_k=1)
    b = pipe.generate(pipe.text_encoder.null, seed=1, top_k=1)
    assert torch.equal(a, b)


def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "pipeline.json").read_text())
    assert meta["text_encoder"] == {"component": "text_encoder", "kind": "tiny"}
    assert (tmp_path / "p" / "text_encoder" / "model.safetensors").is_file()  # visar owns tiny weights
    back = Pipeline.from_pretrained(tmp_path / "p")
    assert isinstance(back.text_encoder, TinyTextEncoder) and back.sampling_defaults == {"cfg_scale": 3.0}
    assert torch.equal(back.generate(prompts=["red star"], seed=2), pipe.generate(prompts=["red star"], seed=2))
    torch.manual_seed(7)  # a replacement encoder given at load time wins
    other = TinyTextEncoder(dim=16, max_length=12)
    assert Pipeline.from_pretrained(tmp_path / "p", text_encoder=other).text_encoder is other


def test_class_ids_to_a_text_model_and_prompts_to_a_class_model(pipe):
    with pytest.raises(ValueError, match=r"text-conditional: give prompts=\[\.\.\.\] instead of class ids"):
        pipe([1, 2])
    with pytest.raises(ValueError, match=r"give prompts=\[\.\.\.\]"):
        pipe()
    with pytest.raises(ValueError, match="not both"):
        pipe([1], prompts=["red"])
    with pytest.raises(TypeError, match=r"prompts\[0\] must be a str"):
        pipe(prompts=[3])
    torch.manual_seed(0)
    c2i = Pipeline(zoo.create("llamagen-vq-tiny"), zoo.create("llamagen-gpt-tiny"))
    with pytest.raises(ValueError, match=r"class-conditional \(10 classes\): give class ids"):
        c2i(prompts=["a red circle"])
    no_encoder = Pipeline(pipe.tokenizer, pipe.generator)
    with pytest.raises(ValueError, match="has no text encoder"):
        no_encoder(prompts=["red"])


def test_encoder_must_fit_the_generator(pipe):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"gives 8-d features but the generator reads 16-d"):
        Pipeline(pipe.tokenizer, pipe.generator, text_encoder=TinyTextEncoder(dim=8, max_length=12))
    with pytest.raises(ValueError, match=r"max_length=20 exceeds the generator's 12 caption tokens"):
        Pipeline(pipe.tokenizer, pipe.generator, text_encoder=TinyTextEncoder(dim=16, max_length=20))
    with pytest.raises(ValueError, match="is class-conditional"):
        Pipeline(pipe.tokenizer, zoo.create("llamagen-gpt-tiny"), text_encoder=pipe.text_encoder)
    with pytest.raises(TypeError, match="must be a visar TextEncoder"):
        Pipeline(pipe.tokenizer, pipe.generator, text_encoder=lambda prompts: None)
    short = TinyTextEncoder(dim=16, max_length=6)  # fewer tokens than the model takes: left padded further
    Pipeline(pipe.tokenizer, pipe.generator, text_encoder=short).generate(prompts=["red"], seed=0)


class FixtureEncoder(TextEncoder):
    """Returns the official fixture's caption features for prompts "0" and "1" (as an encoder would: right padded)."""

    kind = "fixture"

    def __init__(self, caption: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.dim, self.max_length = caption.shape[-1], caption.shape[1]
        n = mask.sum(1).long()
        self.right = torch.zeros_like(caption)
        for b in range(len(n)):
            self.right[b, :n[b]] = caption[b, -n[b]:]
        self.n = n

    def tokenize(self, prompts):
        rows = [int(p) for p in prompts]
        ids = torch.tensor(rows)[:, None].expand(-1, self.max_length)
        mask = (torch.arange(self.max_length)[None] < self.n[rows][:, None]).long()
        return TokenizedPrompts(ids=ids, mask=mask, full_lengths=self.n[rows].tolist(), unknown=[[] for _ in rows])

    def encode_ids(self, ids, mask):
        return self.right[ids[:, 0]]

    def config(self):
        return {}


def test_official_t2i_checkpoint_runs_from_prompts(fixtures):
    """The converted official tiny t2i GPT plus an encoder giving the fixture's features: the Pipeline's condition
    is the fixture's left-padded caption and mask, and its samples are the official generate() tokens."""
    from safetensors.torch import load_file

    from visar.convert.llamagen import load_generator

    d = fixtures("llamagen")
    ref = load_file(str(d / "gpt_tiny_t2i_outputs.safetensors"))
    meta = json.loads((d / "outputs_meta.json").read_text())["gpt_tiny_t2i"]
    gen = load_generator(d / "gpt_tiny_t2i.pt", grid_size=4, num_heads=2)
    torch.manual_seed(0)
    p = Pipeline(zoo.create("llamagen-vq-tiny"), gen, text_encoder=FixtureEncoder(ref["caption"], ref["emb_mask"]))
    cond = p.condition(prompts=["0", "1"])
    assert torch.equal(cond.text, ref["caption"]) and torch.equal(cond.text_mask, ref["emb_mask"])
    for run in meta["samples"]:
        images = p.generate(prompts=["0", "1"], seed=run["seed"], cfg_scale=run["cfg_scale"], top_k=run["top_k"],
                            temperature=run["temperature"], top_p=run["top_p"], cfg_interval=run["cfg_interval"])
        expected = p.tokenizer.decode(ref[f"sample.{run['name']}.tokens"].long().reshape(2, 4, 4)).clamp(-1, 1)
        assert torch.equal(images, expected), run["name"]


def test_t5_reference_with_a_missing_folder_says_what_to_download(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    folder = tmp_path / "p" / "text_encoder"
    (folder / "model.safetensors").unlink()
    (folder / "config.json").write_text(json.dumps({
        "format": "visar-text-encoder", "kind": "t5",
        "config": {"path": str(tmp_path / "t5-ckpt" / "flan-t5-xl"), "max_length": 12, "dtype": "bfloat16"},
        "reference": {}}))
    with pytest.raises(FileNotFoundError, match=r"flan-t5-xl does not exist\. Download google/flan-t5-xl .*"
                                                r"huggingface-cli download"):
        Pipeline.from_pretrained(tmp_path / "p")


def test_condition_api_is_unchanged_for_class_models():
    torch.manual_seed(0)
    c2i = Pipeline(zoo.create("llamagen-vq-tiny"), zoo.create("llamagen-gpt-tiny"))
    assert torch.equal(c2i.condition([1, 2]).labels, torch.tensor([1, 2]))
    assert c2i.condition(Condition.of([3])).labels.tolist() == [3]
    assert not c2i.text_conditional and c2i.text_encoder is None
