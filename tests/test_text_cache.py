"""Caption features cached with the token cache (each distinct caption encoded once), held-out captions,
and text-to-image training through the trainer: the exported pipeline carries its text encoder."""
from __future__ import annotations

import json

import pytest
import torch

from visar import zoo
from visar.data.shapes import ShapesDataset
from visar.data.token_cache import CaptionSubset, TokenCacheDataset, build_token_cache, dataset_captions
from visar.pipeline import Pipeline
from visar.text.tiny import TinyTextEncoder
from visar.train.tasks import GeneratorTask, batch_condition


class Patchify(torch.nn.Module):
    """A deterministic 16-code 'tokenizer': the mean of each 8x8 patch's red channel."""

    kind = "discrete"
    vocab_size = 16

    def encode(self, x):
        r = torch.nn.functional.avg_pool2d(x[:, :1], 8)[:, 0]
        return ((r + 1) / 2 * 15).round().clamp(0, 15).long()


class Repeated(torch.utils.data.Dataset):
    """Shapes whose items repeat every ``period`` indices (so captions repeat): tests the de-duplication."""

    def __init__(self, n: int, period: int):
        self.ds, self.n, self.period = ShapesDataset(size=16, length=period), n, period

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.ds[i % self.period]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return TinyTextEncoder(dim=8, max_length=96)  # characters: whole shapes captions fit


def test_captions_are_encoded_once_and_served_left_padded(encoder, tmp_path):
    ds = Repeated(20, 7)
    out = build_token_cache(Patchify(), ds, tmp_path / "c", batch_size=8, shard_size=8, flip=False, progress=False,
                            text_encoder=encoder)
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] and index["num_captions"] == 7 and index["text_max_length"] == 96
    assert json.loads((out / "captions.json").read_text())["captions"] == dataset_captions(ds)[:7]
    cache = TokenCacheDataset(out)
    assert cache.text_encoder_path == out / "text_encoder" and len(cache) == 20
    for i in (0, 9, 19):
        item = cache[i]
        want = encoder([ds[i]["caption"]])
        assert item["text"].shape == (96, 8) and torch.equal(item["text_mask"], want.text_mask[0])
        torch.testing.assert_close(item["text"], want.text[0], atol=2e-3, rtol=2e-3)  # stored as float16
        assert cache.caption(i) == ds[i]["caption"] and torch.equal(item["tokens"], Patchify().encode(
            ds[i]["image"][None])[0])
    batch = torch.utils.data.default_collate([cache[0], cache[1]])
    cond = batch_condition(batch)
    assert cond.text.shape == (2, 96, 8) and cond.labels is None


def test_caption_cache_resumes_and_refuses_mixing(encoder, tmp_path):
    ds = ShapesDataset(size=16, length=12)
    out = build_token_cache(Patchify(), ds, tmp_path / "c", batch_size=4, shard_size=4, flip=False, progress=False,
                            text_encoder=encoder)
    full = TokenCacheDataset(out)
    index = json.loads((out / "index.json").read_text())
    index["complete"] = False
    index["text_shards"], index["shards"] = [], index["shards"][:1]  # as if killed after the first token shard
    (out / "index.json").write_text(json.dumps(index))
    (out / "text_00000.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        TokenCacheDataset(out)
    kept = (out / "shard_00000.safetensors").stat().st_mtime_ns
    build_token_cache(Patchify(), ds, out, batch_size=4, shard_size=4, flip=False, progress=False, text_encoder=encoder)
    assert (out / "shard_00000.safetensors").stat().st_mtime_ns == kept
    again = TokenCacheDataset(out)
    assert all(torch.equal(again[i]["text"], full[i]["text"]) for i in range(12))
    torch.manual_seed(3)
    with pytest.raises(ValueError, match="another tokenizer or with other settings .*text encoder"):
        build_token_cache(Patchify(), ds, out, batch_size=4, shard_size=4, flip=False, progress=False,
                          text_encoder=TinyTextEncoder(dim=8, max_length=96))
    with pytest.raises(ValueError, match="another tokenizer or with other settings"):
        build_token_cache(Patchify(), ds, out, batch_size=4, shard_size=4, flip=False, progress=False)
    with pytest.raises(ValueError, match="mirror images"):
        build_token_cache(Patchify(), ds, tmp_path / "f", flip=True, progress=False, text_encoder=encoder)


def test_caption_subset_leaves_out_whole_phrases():
    ds = ShapesDataset(size=16, length=400)
    caps = ds.captions(range(400))
    sub = CaptionSubset(ds, ["red star", "blue ring"])
    kept = sub.captions(range(len(sub)))
    assert not any("red star" in c or "blue ring" in c for c in kept)
    assert sub.num_excluded == sum(("red star" in c or "blue ring" in c) for c in caps) > 0
    assert any("dark red" in c for c in kept)  # a phrase is matched as whole words only
    assert sub[3]["caption"] == kept[3] and [it["caption"] for it in sub.__getitems__([0, 5])] == [kept[0], kept[5]]
    assert len(CaptionSubset(ds, ["red"])) < len(sub)  # "red" also leaves out "dark red" backgrounds
    with pytest.raises(ValueError, match="non-empty phrases"):
        CaptionSubset(ds, [" "])
    with pytest.raises(ValueError, match="items have no 'caption'"):
        dataset_captions([{"image": torch.zeros(3, 8, 8)}])


def test_generator_task_reads_captions_and_refuses_labels_for_text_models():
    torch.manual_seed(0)
    gen = zoo.create("llamagen-gpt-tiny", caption_dim=8, cls_token_num=16)
    task = GeneratorTask(gen, None)
    tokens = torch.randint(0, 256, (2, 4, 4))
    mask = torch.zeros(2, 16)
    mask[:, -5:] = 1
    out = task({"tokens": tokens, "text": torch.randn(2, 16, 8) * mask[..., None], "text_mask": mask,
                "label": torch.tensor([0, 1])})
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="text-conditional but the batches hold no caption features"):
        task({"tokens": tokens, "label": torch.tensor([0, 1])})


@pytest.mark.filterwarnings("ignore:.*truncated")  # a 16-character encoder: shapes captions are cut
def test_text_to_image_training_exports_a_pipeline_with_its_encoder(encoder, tmp_path):
    from visar.train.config import load_config
    from visar.train.trainer import train

    torch.manual_seed(0)
    zoo.create("llamagen-vq-tiny").save_pretrained(tmp_path / "vq", "tokenizer")
    from visar.tokenizers.base import Tokenizer

    vq = Tokenizer.from_pretrained(tmp_path / "vq", "tokenizer")
    small = TinyTextEncoder(dim=8, max_length=16)
    cache = build_token_cache(vq, ShapesDataset(size=32, length=8), tmp_path / "cache", batch_size=8, flip=False,
                              progress=False, text_encoder=small)
    gpt = {"cls": "visar.generators.next_token.llamagen:NextTokenGenerator",
           "kwargs": {"vocab_size": 256, "dim": 32, "depth": 1, "num_heads": 2, "grid_size": 2, "caption_dim": 8,
                      "cls_token_num": 16}}
    cfg = load_config(None, [], data={
        "task": "generator", "model": gpt, "tokenizer": {"path": str(tmp_path / "vq")},
        "data": {"kind": "token_cache", "path": str(cache)}, "sample": {"labels": [0, 1], "per_label": 1},
        "train": {"steps": 2, "batch_size": 4, "log_every": 1, "progress": False, "threads": 1, "sample_every": 2,
                  "output_dir": str(tmp_path / "run")}})
    export = train(cfg)
    assert (tmp_path / "run" / "samples" / "step_00000002.png").is_file()  # grids from the cache's captions
    pipe = Pipeline.from_pretrained(export)
    assert pipe.text_encoder.fingerprint() == small.fingerprint()
    a = pipe.generate(prompts=["a small red star on a black background"], seed=0)
    assert a.shape == (1, 3, 32, 32) and torch.equal(a, pipe.generate(prompts=["a small red star on a black "
                                                                               "background"], seed=0))
    from visar.train.export_checkpoint import export_checkpoint  # `visar export` finds the cache's encoder too

    probe = Pipeline.from_pretrained(export_checkpoint(tmp_path / "run", tmp_path / "probe"))
    assert probe.text_encoder.fingerprint() == small.fingerprint()
    assert torch.equal(a, probe.generate(prompts=["a small red star on a black background"], seed=0))
