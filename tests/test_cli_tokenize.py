"""`visar tokenize`: pre-tokenize shapes or an image folder into a token cache the trainer reads."""
import numpy as np
import torch
from PIL import Image

from visar.cli import main
from visar.data.shapes import ShapesDataset
from visar.data.token_cache import TokenCacheDataset
from visar.tokenizers.base import Tokenizer
from visar.zoo import ASSETS


def test_tokenize_shapes_matches_the_tokenizer(tmp_path):
    folder = ASSETS / "shapes-llamagen"
    out = tmp_path / "tokens"
    rc = main(["tokenize", "--tokenizer", str(folder), "--data", "shapes", "--size", "32", "--length", "6",
               "--seed", "3", "--flip", "--batch-size", "4", "--out", str(out), "--quiet"])
    assert rc == 0
    cache = TokenCacheDataset(out, flip=True)
    assert len(cache) == 12
    tok = Tokenizer.from_pretrained(folder, "tokenizer").eval()
    cache.check_tokenizer(tok)
    x, labels = ShapesDataset(size=32, length=6, seed=3).render([0, 5])
    with torch.no_grad():
        ref, ref_flip = tok.encode(x), tok.encode(x.flip(-1))
    assert torch.equal(cache[0]["tokens"].long(), ref[0].long()) and cache[0]["label"] == int(labels[0])
    assert torch.equal(cache[11]["tokens"].long(), ref_flip[1].long()) and cache[11]["label"] == int(labels[1])


def test_tokenize_folder_and_bad_arguments(tmp_path, caplog):
    folder = ASSETS / "shapes-llamagen"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / "0.png")
    out = tmp_path / "tokens"
    assert main(["tokenize", "--tokenizer", str(folder), "--path", str(tmp_path / "imgs"), "--size", "32",
                 "--out", str(out), "--quiet"]) == 0
    cache = TokenCacheDataset(out)
    assert len(cache) == 2 and [cache[i]["label"] for i in range(2)] == [0, 1]
    assert cache[0]["tokens"].shape == (8, 8)

    assert main(["tokenize", "--tokenizer", str(folder), "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "--data folder needs --path" in caplog.text
    assert main(["tokenize", "--tokenizer", str(tmp_path / "nope"), "--data", "shapes", "--out",
                 str(tmp_path / "x"), "--quiet"]) == 2
    assert "not found" in caplog.text
