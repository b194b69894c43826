"""Teacher pairs for Distilled Decoding on disk: the format ``visar distill-data`` writes and ``task: distill`` reads.

A folder holds (see ``docs/distillation.md``)::

    manifest.json                   format "visar-distill-data", version 2; "settings" (teacher weights hash and
                                    configs, teacher kind, teacher-map options, num, shard_size, seed, seed rule,
                                    label rule, L, grid size, scales, V, C, codebook hash); "num_shards",
                                    "complete" (and, for information only, the teacher's path, batch size,
                                    processes, versions)
    codebook.safetensors            codebook [V, C] float32: the vectors the teacher map used
    shard_00000.safetensors         noise [n, L, C] float32, tokens [n, L] int64, labels [n] int64
    shard_00001.safetensors         ... shard k holds pairs k * shard_size .. min(num, (k + 1) * shard_size) - 1

Pair ``i`` is ``(noise_i, tokens_i, label_i)``: the teacher map sends ``noise_i`` to ``tokens_i`` given class
``label_i``; the noise and the label are pure functions of ``(seed, i)`` (the manifest states the rule).
Shards are written atomically, so a shard file on disk is complete.

``settings["kind"]`` is ``"next_token"`` (``L`` tokens in raster order, ``scales`` null) or ``"next_scale"``
(VAR: all scales concatenated, scale 0 first and row-major within a scale, ``L = sum pn^2`` over
``settings["scales"]``; the noise holds one vector per token in the same order). Version 1 folders (next-token
only, written before VAR pairs existed) are read as ``kind: next_token, scales: null``.

:class:`DistillShards` serves ``{"noise": [L, C] float32, "tokens": [L] int64, "label": int}`` items of a
complete folder (all shards in memory: 2.5 KB per pair at L = 64, C = 8; 9.4 KB at L = 130, C = 16).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from visar.utils.io import load_safetensors

FORMAT = "visar-distill-data"
#: the version written; :data:`READ_VERSIONS` are read (version 1: next-token pairs without ``kind`` / ``scales``)
VERSION = 2
READ_VERSIONS = (1, 2)
KINDS = ("next_token", "next_scale")
MANIFEST_NAME = "manifest.json"
CODEBOOK_NAME = "codebook.safetensors"


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``shard_00000.safetensors``."""
    return f"shard_{index:05d}.safetensors"


def num_shards(num: int, shard_size: int) -> int:
    return (num + shard_size - 1) // shard_size


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a distill-data folder (checked: format and version). A version 1 manifest comes back in
    the current form: ``settings`` gains ``kind: "next_token"`` and ``scales: None``, ``version`` is 2."""
    p = Path(path) / MANIFEST_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{Path(path)} is not a distill-data folder (no {MANIFEST_NAME}); make one with "
                                "`visar distill-data --teacher PIPELINE_DIR --num N --out DIR`")
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e}); delete the folder and make the data again") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("settings"), dict):
        raise ValueError(f"{p} is not a {FORMAT} manifest")
    if meta.get("version") not in READ_VERSIONS:
        raise ValueError(f"{p} has version {meta.get('version')!r}; this visar reads versions "
                         f"{', '.join(map(str, READ_VERSIONS))}")
    if meta["version"] == 1:  # next-token pairs in the same layout; the fields added in version 2 had one value
        meta = {**meta, "version": VERSION, "settings": {**meta["settings"], "kind": "next_token", "scales": None}}
    if meta["settings"].get("kind") not in KINDS:
        raise ValueError(f"{p}: settings.kind must be one of {KINDS}, got {meta['settings'].get('kind')!r}")
    return meta


class DistillShards(torch.utils.data.Dataset):
    """Items ``{"noise": FloatTensor [L, C], "tokens": LongTensor [L], "label": int}`` of a complete folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        s = self.manifest["settings"]
        if not self.manifest.get("complete"):
            raise ValueError(f"distill data {self.path} is incomplete; run the same `visar distill-data` command again "
                             "to finish it")
        self.num, L, C = int(s["num"]), int(s["num_tokens"]), int(s["codebook_dim"])
        parts: dict[str, list[torch.Tensor]] = {"noise": [], "tokens": [], "labels": []}
        for k in range(num_shards(self.num, int(s["shard_size"]))):
            f = self.path / shard_name(k)
            t = load_safetensors(f)
            n = min(self.num, (k + 1) * s["shard_size"]) - k * s["shard_size"]
            want = {"noise": ((n, L, C), torch.float32), "tokens": ((n, L), torch.int64), "labels": ((n,), torch.int64)}
            for key, (shape, dtype) in want.items():
                if key not in t or tuple(t[key].shape) != shape or t[key].dtype != dtype:
                    got = (tuple(t[key].shape), t[key].dtype) if key in t else "missing"
                    raise ValueError(f"{f}: {key} must be {dtype} {list(shape)}, got {got}; the folder is damaged, "
                                     "make the data again")
                parts[key].append(t[key])
        self.noise = torch.cat(parts["noise"])
        self.tokens = torch.cat(parts["tokens"])
        self.labels = torch.cat(parts["labels"])
        self.codebook = load_safetensors(self.path / CODEBOOK_NAME)["codebook"]

    def check_student(self, student: Any) -> None:
        """Raise unless ``student`` models these pairs: vocabulary, tokens per image, scales and codebook."""
        s = self.manifest["settings"]
        for what, mine, theirs in (("vocab_size", s["vocab_size"], getattr(student, "vocab_size", None)),
                                   ("num_tokens", s["num_tokens"], getattr(student, "num_tokens", None)),
                                   ("scales", s.get("scales"), getattr(student, "scales", None)),
                                   ("codebook_dim", s["codebook_dim"], getattr(student, "codebook_dim", None))):
            if mine != theirs:
                raise ValueError(f"distill data {self.path} has {what}={mine} but the student has {theirs}: build the "
                                 "student from the teacher that made the data")
        student.check_codebook(self.codebook, f"distill data {self.path}")

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num:
            raise IndexError(f"index {index} out of range for {self.num} pairs")
        return {"noise": self.noise[index], "tokens": self.tokens[index], "label": int(self.labels[index])}


__all__ = ["FORMAT", "VERSION", "READ_VERSIONS", "KINDS", "MANIFEST_NAME", "CODEBOOK_NAME", "shard_name", "num_shards",
           "read_manifest", "DistillShards"]
