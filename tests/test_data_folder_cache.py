"""ImageFolder with the ADM centre crop; token caches (build, resume, flip, tokenizer check)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from visar.data.folder import ImageFolderDataset, center_crop_adm
from visar.data.shapes import ShapesDataset
from visar.data.token_cache import TokenCacheDataset, build_token_cache


def _tree(root):
    rng = np.random.default_rng(0)
    for c, n in (("cat", 2), ("dog", 3)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (70 + 10 * i, 50, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_adm_center_crop_matches_the_recipe():
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8))
    out = center_crop_adm(im, 64)
    # by hand: 200x300 -> BOX halve once (100x150, since 100 < 128) -> BICUBIC to 64x96 -> centre rows 16..80
    ref = im.resize((100, 150), Image.BOX).resize((64, 96), Image.BICUBIC).crop((0, 16, 64, 80))
    assert out.size == (64, 64)
    assert np.array_equal(np.asarray(out), np.asarray(ref))


def test_image_folder_labels_flip_and_errors(tmp_path):
    root = _tree(tmp_path / "imgs")
    ds = ImageFolderDataset(root, size=32, flip=True)
    assert ds.classes == ["cat", "dog"] and len(ds) == 10
    a, b = ds[0], ds[5]
    assert a["image"].shape == (3, 32, 32) and -1 <= a["image"].min() and a["image"].max() <= 1
    assert torch.equal(b["image"], a["image"].flip(-1)) and a["label"] == b["label"] == 0
    assert ds[4]["label"] == 1
    assert ds.item_labels().tolist() == [ds[i]["label"] for i in range(len(ds))]
    assert ImageFolderDataset(root, size=32).item_labels().tolist() == ds.labels
    (root / "dog" / "bad.png").write_bytes(b"not a png")
    ds = ImageFolderDataset(root, size=32)
    bad = [i for i, f in enumerate(ds.files) if f.name == "bad.png"][0]
    with pytest.raises(ValueError, match="bad.png"):
        ds[bad]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")


class _Patchify(torch.nn.Module):
    """A stand-in discrete tokenizer: 4x4 patch mean of the red channel quantised to 16 levels."""

    kind, vocab_size, downsample = "discrete", 16, 4

    def __init__(self, offset=0.0):
        super().__init__()
        self.register_buffer("offset", torch.tensor(offset))

    def encode(self, x):
        r = torch.nn.functional.avg_pool2d(x[:, :1], 4)[:, 0] + self.offset
        return ((r + 1) / 2 * 15).round().clamp(0, 15).long()


def test_token_cache_build_resume_flip(tmp_path):
    ds = ShapesDataset(size=16, length=20)
    tok = _Patchify()
    out = build_token_cache(tok, ds, tmp_path / "cache", batch_size=8, shard_size=8, progress=False)
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] and len(index["shards"]) == 3 and index["token_shape"]["tokens"] == [4, 4]
    cache = TokenCacheDataset(out, flip=True)
    assert len(cache) == 40
    x, _ = ds.render([3])
    assert torch.equal(cache[3]["tokens"], tok.encode(x)[0]) and cache[3]["label"] == 3
    assert torch.equal(cache[23]["tokens"], tok.encode(x.flip(-1))[0])
    cache.check_tokenizer(tok)
    with pytest.raises(ValueError, match="another tokenizer"):
        cache.check_tokenizer(_Patchify(0.5))
    with pytest.raises(ValueError, match="another tokenizer or with other settings"):
        build_token_cache(_Patchify(0.5), ds, out, batch_size=8, shard_size=8, progress=False)

    # resume: drop the last shard from disk and from the index, rebuild only that one
    index["shards"] = index["shards"][:2]
    index["complete"] = False
    (out / "index.json").write_text(json.dumps(index))
    (out / "shard_00002.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        TokenCacheDataset(out)
    before = (out / "shard_00000.safetensors").stat().st_mtime_ns
    build_token_cache(tok, ds, out, batch_size=8, shard_size=8, progress=False)
    assert (out / "shard_00000.safetensors").stat().st_mtime_ns == before
    assert torch.equal(TokenCacheDataset(out)[19]["tokens"], cache[19]["tokens"])
