"""Pre-tokenized datasets (LlamaGen / MAR style): encode once, train the generator on the tokens.

``build_token_cache(tokenizer, dataset, out_dir)`` encodes every image (and, with ``flip=True``, its
mirror image) and writes safetensors shards plus ``index.json``::

    out_dir/index.json               format, tokenizer config + weight hash, items, shards, token shape
    out_dir/shard_00000.safetensors  tokens [n, ...], tokens_flip [n, ...] (if flip), labels [n]

Multi-scale tokens (a list per image) are stored as ``tokens.0``, ``tokens.1``, ...; continuous tokens
as float16. Every shard and the index are written atomically, and the index lists a shard only once
it is on disk, so an interrupted build resumes where it stopped (same tokenizer and settings).

``TokenCacheDataset(out_dir, flip=False)`` serves ``{"tokens", "label"}`` items; with ``flip=True`` it
has ``2 N`` items and item ``i + N`` holds the flipped tokens (a deterministic choice, see
:mod:`visar.data.folder`). It loads all shards into memory (int16 tokens: ImageNet at 256 tokens per
image is ~650 MB).

**Caption features** (text-to-image training): ``build_token_cache(..., text_encoder=encoder)`` also
encodes every item's caption once (the dataset's ``captions(indices)``, else its items' ``"caption"``)::

    out_dir/captions.json              the distinct captions, in first-seen order
    out_dir/text_00000.safetensors     features [sum n_c, D] float16 (caption c's n_c valid token
                                       features, packed), lengths [c] int32
    out_dir/text_encoder/              the encoder (a saved component, as in a pipeline folder)

and each token shard gains ``captions [n]`` (the caption index of each item). A caption shared by many
images is encoded and stored once. Items then also hold ``"text" [T, D]`` (float32, left padded to the
encoder's ``T = max_length``, as the encoder itself returns them) and ``"text_mask" [T]``. Mirror images
are refused with captions (a caption that says "on the left" would describe the mirror image wrongly).
:class:`CaptionSubset` leaves out the items whose caption holds given phrases (held-out attribute
combinations such as ``"red star"``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from visar.data.views import IndexedView
from visar.utils.io import atomic_write_bytes, load_safetensors, save_safetensors

log = logging.getLogger("visar.data")

FORMAT = "visar-token-cache"
#: caption-feature files of a cache built with a text encoder
CAPTIONS_FILE, TEXT_ENCODER_DIR = "captions.json", "text_encoder"
TEXT_SHARD_SIZE = 4096


def dataset_captions(dataset) -> list[str]:
    """Every item's caption: ``dataset.captions(range(len))`` when it has that method, else the items'
    ``"caption"`` (rendering every item once). Raises a ``ValueError`` when the items have none."""
    n = len(dataset)
    fn = getattr(dataset, "captions", None)
    if callable(fn):
        caps = list(fn(range(n)))
    else:
        caps = []
        for i in range(n):
            item = dataset[i]
            if not isinstance(item, dict) or "caption" not in item:
                raise ValueError(f"{type(dataset).__name__} items have no 'caption': caption features need a "
                                 "captioned dataset (e.g. data shapes)")
            caps.append(item["caption"])
    bad = [i for i, c in enumerate(caps) if not isinstance(c, str)]
    if len(caps) != n or bad:
        raise ValueError(f"{type(dataset).__name__} must give one str caption per item (item {bad[:1]} is not)")
    return caps


class CaptionSubset(IndexedView):
    """The items of ``dataset`` whose caption contains none of ``exclude`` (whole words, e.g. ``"red star"``).

    Held-out attribute combinations for text-to-image training: a model trained on the subset never saw
    a red star, so its red stars measure compositional generalisation. ``excluded`` records the phrases,
    ``indices`` the kept source indices (ascending); items keep their order.
    """

    def __init__(self, dataset, exclude: Sequence[str]):
        if isinstance(exclude, str):
            exclude = [exclude]
        phrases = [str(p).strip() for p in exclude]
        if not phrases or any(not p for p in phrases):
            raise ValueError(f"exclude needs non-empty phrases (e.g. 'red star'), got {list(exclude)!r}")
        caps = dataset_captions(dataset)
        pats = [re.compile(r"(?<!\w)" + re.escape(p) + r"(?!\w)") for p in phrases]
        self.indices = [i for i, c in enumerate(caps) if not any(r.search(c) for r in pats)]
        if not self.indices:
            raise ValueError(f"every caption holds one of the excluded phrases {phrases}; nothing is left")
        super().__init__(dataset, self.indices)
        self.excluded = phrases
        self._captions = [caps[i] for i in self.indices]
        self.num_excluded = len(caps) - len(self.indices)

    def captions(self, indices) -> list[str]:
        return [self._captions[i] for i in indices]


def _dedupe(captions: list[str]) -> tuple[list[str], list[int]]:
    """Distinct captions in first-seen order, and each item's index into them."""
    table: dict[str, int] = {}
    ids = [table.setdefault(c, len(table)) for c in captions]
    return list(table), ids


def tokenizer_fingerprint(tokenizer: torch.nn.Module) -> str:
    """sha256 over the tokenizer's state (names, shapes, dtypes, bytes): detects a different tokenizer."""
    h = hashlib.sha256()
    for k, v in sorted(tokenizer.state_dict().items()):
        h.update(k.encode())
        h.update(str((tuple(v.shape), str(v.dtype))).encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def _pack(tokens: Any, vocab: int | None, prefix: str) -> dict[str, torch.Tensor]:
    if isinstance(tokens, (list, tuple)):
        out = {}
        for k, t in enumerate(tokens):
            out.update(_pack(t, vocab, f"{prefix}.{k}"))
        return out
    if tokens.is_floating_point():
        return {prefix: tokens.detach().to(torch.float16).cpu()}
    small = vocab is not None and vocab <= 32767
    return {prefix: tokens.detach().to(torch.int16 if small else torch.int32).cpu()}


def _config_of(tokenizer) -> dict:
    return tokenizer.config_dict() if hasattr(tokenizer, "config_dict") else {"class": type(tokenizer).__name__}


@torch.no_grad()
def build_token_cache(tokenizer, dataset, out_dir: str | os.PathLike, batch_size: int = 64,
                      shard_size: int = 4096, flip: bool = True, device: str | torch.device = "cpu",
                      progress: bool = True, text_encoder: Any = None) -> Path:
    """Encode ``dataset`` (items ``{"image": [3, H, W] in [-1, 1], "label": int}``) into ``out_dir``.

    With ``text_encoder`` (a :class:`visar.text.base.TextEncoder`), every distinct caption is also encoded
    once and stored (see the module docstring); ``flip`` must then be False.

    Resumes an interrupted build of the same tokenizer, encoder and settings; refuses to mix them.
    Returns ``out_dir``.
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be >= 1")
    if text_encoder is not None and flip:
        raise ValueError("mirror images (flip) are refused with caption features: a caption naming a side (\"on the "
                         "left\") would describe the mirror image wrongly; build the cache without flip")
    out = Path(out_dir)
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty")
    fp = tokenizer_fingerprint(tokenizer)
    settings = {"format": FORMAT, "version": 1, "tokenizer": _config_of(tokenizer), "tokenizer_sha256": fp,
                "kind": getattr(tokenizer, "kind", "?"), "num_items": n, "shard_size": shard_size, "flip": bool(flip)}
    if getattr(dataset, "excluded", None):
        settings["excluded_captions"] = list(dataset.excluded)
    captions: list[str] = []
    if text_encoder is not None:
        captions = dataset_captions(dataset)
        unique, caption_ids = _dedupe(captions)
        settings.update({"text_encoder": text_encoder.describe(), "text_encoder_sha256": text_encoder.fingerprint(),
                         "text_max_length": text_encoder.max_length, "text_dim": text_encoder.dim,
                         "num_captions": len(unique), "text_shard_size": TEXT_SHARD_SIZE,
                         "captions_sha256": hashlib.sha256(json.dumps(captions).encode()).hexdigest()})
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "index.json"
    shards: list[dict] = []
    text_shards: list[dict] = []
    token_shape: Any = None
    if index_path.is_file():
        old = json.loads(index_path.read_text())
        same = {k: old.get(k) for k in set(settings) | set(old) if k not in _STATE_KEYS} == settings
        if not same:
            raise ValueError(f"{out} already holds a token cache of another tokenizer or with other settings "
                             "(num_items, shard_size, flip, text encoder, captions, excluded captions); use a new "
                             "folder or delete it")
        shards = [s for s in old["shards"] if (out / s["file"]).is_file()]
        text_shards = [s for s in old.get("text_shards", []) if (out / s["file"]).is_file()]
        token_shape = old.get("token_shape")
        if len(shards) == len(old["shards"]) and len(text_shards) == len(old.get("text_shards", [])) \
                and old.get("complete"):
            log.info("token cache %s is complete (%d items)", out, n)
            return out
    state = {"settings": settings, "shards": shards, "text_shards": text_shards if text_encoder is not None else None,
             "token_shape": token_shape}
    if text_encoder is not None:
        _encode_captions(text_encoder, unique, out, index_path, state, device, progress)
    tokenizer = tokenizer.eval().to(device)
    vocab = getattr(tokenizer, "vocab_size", None)
    num_shards = (n + shard_size - 1) // shard_size
    done = {s["index"] for s in shards}
    bar = tqdm(total=n, initial=sum(s["count"] for s in shards), disable=not progress, desc="tokenize")
    for si in range(num_shards):
        if si in done:
            continue
        lo, hi = si * shard_size, min(n, (si + 1) * shard_size)
        parts: dict[str, list[torch.Tensor]] = {}
        labels: list[int] = []
        for b in range(lo, hi, batch_size):
            idx = list(range(b, min(hi, b + batch_size)))
            items = dataset.__getitems__(idx) if hasattr(dataset, "__getitems__") else [dataset[i] for i in idx]
            x = torch.stack([it["image"] for it in items]).to(device)
            labels += [int(it.get("label", 0)) for it in items]
            packed = _pack(tokenizer.encode(x), vocab, "tokens")
            if flip:
                packed.update(_pack(tokenizer.encode(x.flip(-1)), vocab, "tokens_flip"))
            for k, v in packed.items():
                parts.setdefault(k, []).append(v)
            bar.update(len(idx))
        tensors = {k: torch.cat(v) for k, v in parts.items()}
        tensors["labels"] = torch.tensor(labels, dtype=torch.int64)
        if text_encoder is not None:
            tensors["captions"] = torch.tensor(caption_ids[lo:hi], dtype=torch.int64)
        token_shape = {k: list(v.shape[1:]) for k, v in tensors.items() if k.startswith("tokens") and "flip" not in k}
        name = f"shard_{si:05d}.safetensors"
        save_safetensors(tensors, out / name)
        shards.append({"index": si, "file": name, "start": lo, "count": hi - lo})
        shards.sort(key=lambda s: s["index"])
        state["token_shape"] = token_shape
        _write_index(index_path, state, complete=len(shards) == num_shards)
    bar.close()
    _write_index(index_path, state, complete=True)
    log.info("token cache %s: %d items in %d shards", out, n, num_shards)
    return out


#: index keys that describe progress, not the cache's identity
_STATE_KEYS = ("shards", "text_shards", "token_shape", "complete")


def _write_index(path: Path, state: dict, complete: bool) -> None:
    index = {**state["settings"], "shards": state["shards"], "token_shape": state["token_shape"]}
    if state.get("text_shards") is not None:
        index["text_shards"] = state["text_shards"]
    atomic_write_bytes(path, json.dumps({**index, "complete": complete}, indent=1).encode())


def _encode_captions(text_encoder, unique: list[str], out: Path, index_path: Path, state: dict,
                     device: str | torch.device, progress: bool, batch_size: int = 128) -> None:
    """Phase one of a caption cache: ``captions.json``, the encoder's component folder, then the features of
    the distinct captions in numbered ``text_<shard>.safetensors`` shards (resumable, like the token shards)."""
    from tqdm.auto import tqdm

    if not (out / CAPTIONS_FILE).is_file():
        atomic_write_bytes(out / CAPTIONS_FILE, json.dumps({"captions": unique}).encode())
    # the encoder's description: config.json, or text_encoder.json in caches written before that layout
    if not any((out / TEXT_ENCODER_DIR / name).is_file() for name in ("config.json", "text_encoder.json")):
        text_encoder.save_pretrained(out / TEXT_ENCODER_DIR)
    text_encoder = text_encoder.to(device).eval()
    shards = state["text_shards"]
    done = {s["index"] for s in shards}
    total = (len(unique) + TEXT_SHARD_SIZE - 1) // TEXT_SHARD_SIZE
    bar = tqdm(total=len(unique), initial=sum(s["count"] for s in shards), disable=not progress, desc="captions")
    for si in range(total):
        if si in done:
            continue
        lo, hi = si * TEXT_SHARD_SIZE, min(len(unique), (si + 1) * TEXT_SHARD_SIZE)
        feats, lengths = [], []
        for b in range(lo, hi, batch_size):
            cond = text_encoder(unique[b:min(hi, b + batch_size)])
            valid = cond.text_mask != 0                      # left padded: each row's valid features, in order
            feats.append(cond.text[valid].detach().cpu())   # [sum n, D]
            lengths.append(valid.sum(1).cpu())
            bar.update(valid.shape[0])
        half = torch.cat(feats).to(torch.float16)
        if not bool(torch.isfinite(half).all()):
            raise ValueError("caption features overflow float16 (|x| > 65504); this text encoder's features cannot be "
                             "cached in float16")
        name = f"text_{si:05d}.safetensors"
        save_safetensors({"features": half, "lengths": torch.cat(lengths).to(torch.int32)}, out / name)
        shards.append({"index": si, "file": name, "start": lo, "count": hi - lo})
        shards.sort(key=lambda s: s["index"])
        _write_index(index_path, state, complete=False)
    bar.close()


class TokenCacheDataset(torch.utils.data.Dataset):
    """Items ``{"tokens": LongTensor (or list of them, or float), "label": int}`` of a finished cache (and
    ``"text" [T, D]``, ``"text_mask" [T]`` when it was built with a text encoder)."""

    def __init__(self, path: str | os.PathLike, flip: bool = False):
        self.path = Path(path)
        index_path = self.path / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a token cache (no index.json); build it with "
                                    "visar.data.token_cache.build_token_cache")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{index_path} is not a {FORMAT} index")
        if not self.index.get("complete"):
            got = sum(s["count"] for s in self.index["shards"])
            raise ValueError(f"token cache {self.path} is incomplete ({got} of {self.index['num_items']} items); "
                             "run build_token_cache again with the same arguments to finish it")
        if flip and not self.index["flip"]:
            raise ValueError(f"token cache {self.path} was built without flipped tokens; rebuild with flip=True "
                             "or set data.flip=false")
        self.flip = bool(flip)
        data: dict[str, list[torch.Tensor]] = {}
        for s in self.index["shards"]:
            for k, v in load_safetensors(self.path / s["file"]).items():
                data.setdefault(k, []).append(v)
        self.data = {k: torch.cat(v) for k, v in data.items()}
        self.n = int(self.index["num_items"])
        self.keys = sorted((k for k in self.data if k.startswith("tokens") and not k.startswith("tokens_flip")),
                           key=lambda k: int(k.split(".")[1]) if "." in k else -1)
        self.has_text = "text_encoder" in self.index
        if self.has_text:
            self._load_captions()

    def _load_captions(self) -> None:
        self.caption_table: list[str] = json.loads((self.path / CAPTIONS_FILE).read_text())["captions"]
        feats, lengths = [], []
        for s in sorted(self.index["text_shards"], key=lambda s: s["index"]):
            part = load_safetensors(self.path / s["file"])
            feats.append(part["features"])
            lengths.append(part["lengths"].long())
        self.text_features = torch.cat(feats)  # [sum n, D] float16
        lengths = torch.cat(lengths)
        if len(lengths) != len(self.caption_table) or int(lengths.sum()) != self.text_features.shape[0]:
            raise ValueError(f"token cache {self.path}: the caption features do not match {CAPTIONS_FILE}; rebuild it")
        self.text_offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        self.text_max_length = int(self.index["text_max_length"])

    @property
    def text_encoder_path(self) -> Path | None:
        """Folder of the text encoder whose features the cache holds (``None`` without captions)."""
        return self.path / TEXT_ENCODER_DIR if self.has_text else None

    def caption(self, index: int) -> str:
        """The caption of item ``index``."""
        if not self.has_text:
            raise ValueError(f"token cache {self.path} holds no captions (built without a text encoder)")
        return self.caption_table[int(self.data["captions"][index % self.n])]

    def _text(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ``i``'s caption features ``[T, D]`` float32, left padded, and mask ``[T]``."""
        c = int(self.data["captions"][i])
        lo, hi = int(self.text_offsets[c]), int(self.text_offsets[c + 1])
        T, D = self.text_max_length, self.text_features.shape[1]
        text = torch.zeros(T, D)
        text[T - (hi - lo):] = self.text_features[lo:hi].float()
        mask = torch.zeros(T)
        mask[T - (hi - lo):] = 1.0
        return text, mask

    def check_tokenizer(self, tokenizer) -> None:
        """Raise if ``tokenizer`` is not the one whose tokens this cache holds."""
        if tokenizer_fingerprint(tokenizer) != self.index["tokenizer_sha256"]:
            raise ValueError(f"token cache {self.path} was built with another tokenizer (weights differ from "
                             f"the one given: {self.index['tokenizer'].get('class')}); rebuild the cache")

    def __len__(self) -> int:
        return self.n * (2 if self.flip else 1)

    def item_labels(self) -> torch.Tensor:
        """``LongTensor [len(self)]``: every item's stored label (mirrored items repeat theirs)."""
        labels = self.data["labels"].long()
        return labels.repeat(2) if self.flip else labels

    def _tokens(self, i: int, mirrored: bool):
        keys = [k.replace("tokens", "tokens_flip", 1) for k in self.keys] if mirrored else self.keys
        vals = [self.data[k][i] for k in keys]
        vals = [v.float() if v.is_floating_point() else v.long() for v in vals]
        return vals[0] if keys == ["tokens"] or keys == ["tokens_flip"] else vals

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        i, mirrored = index % self.n, index >= self.n
        item = {"tokens": self._tokens(i, mirrored), "label": int(self.data["labels"][i])}
        if self.has_text:
            item["text"], item["text_mask"] = self._text(i)
        return item
