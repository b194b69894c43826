"""The JSON sidecar written next to every sample folder: every setting that shaped the images.

``samples.json`` records the model (name, path, sha256 of its weight files and of its loaded
weights), the label mode, seeds and seed rule (:data:`SEED_RULE`), the sampler (its registered name) and the
sampling options it really used (its defaults, the pipeline's stored ``sampling_defaults``, then what was
passed), resize,
dtype, batch size, number of processes, visar/torch versions and the protocol departures. It round-trips: ``load_sidecar(save_sidecar(record))`` equals ``record``.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from visar.utils.io import atomic_write_bytes

SIDECAR_NAME = "samples.json"
FORMAT = "visar-eval-samples"
#: the one seed and label rule of ``visar eval sample`` and ``visar sample`` (``visar.eval.sampling``
#: implements it: ``chunk_seed``, ``labels_range``, ``generate_chunk``); docs/evaluation.md quotes it verbatim.
#: Bump the version if the derivation ever changes (a folder of another version is refused on resume).
SEED_RULE = ("v2: image i is row i - s of the chunk s = (i // batch_size) * batch_size; every chunk is batch_size "
             "images drawn by one Pipeline.generate(class_ids of indices s .. s + batch_size - 1, "
             "seed=int.from_bytes(sha256(f'visar-sample:{seed}:{s}')[:8], 'little') >> 1) call "
             "(a torch.Generator on the sampling device), so images past num are drawn and dropped and image i "
             "depends on neither num nor the number of processes; balanced labels: i % num_classes; "
             "random labels: (int.from_bytes(sha256(f'visar-label:{seed}:{i}')[:8], 'little') >> 1) % num_classes")

#: fields that determine the images; a resumed run must agree on all of them
IDENTITY_FIELDS = ("weights_state_sha256", "labels", "num_classes", "seed", "seed_rule", "batch_size",
                   "sampler", "options", "resize", "resize_antialias", "dtype", "index_width")


@dataclass
class SampleRecord:
    """Settings of one evaluation sample set (see the module docstring)."""

    model_name: str
    num: int
    labels: str
    num_classes: int
    seed: int
    batch_size: int
    options: dict
    weights_state_sha256: str
    #: registered name of the sampler that drew the images (``None`` in records written before visar recorded
    #: it: those were drawn by the pipeline's own sampler)
    sampler: str | None = None
    model_path: str | None = None
    weights_sha256: dict = field(default_factory=dict)
    resize: int | None = None
    resize_antialias: bool = False
    dtype: str = "float32"
    image_size: list | None = None
    num_processes: int = 1
    seed_rule: str = SEED_RULE
    index_width: int = 6
    protocol: dict | None = None
    departures: list = field(default_factory=list)
    status: str = "incomplete"
    npz: str | None = None
    images_dir: str = "images"
    visar_version: str = ""
    torch_version: str = ""
    device: str = ""
    format: str = FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SampleRecord":
        if d.get("format") != FORMAT:
            raise ValueError(f"not a visar sample sidecar (format {d.get('format')!r}, expected {FORMAT!r})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"sidecar has unknown fields {unknown}; it was written by a newer visar")
        return cls(**d)

    def differences(self, other: "SampleRecord") -> list[str]:
        """Identity fields that differ, as ``"name: self_value != other_value"``."""
        out = []
        for name in IDENTITY_FIELDS:
            a, b = getattr(self, name), getattr(other, name)
            if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
                out.append(f"{name}: {a!r} != {b!r}")
        return out


def save_sidecar(record: SampleRecord, path: str | os.PathLike) -> Path:
    """Write ``record`` as indented JSON (atomically). ``path`` is a file or a sample folder."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / SIDECAR_NAME
    atomic_write_bytes(path, (json.dumps(record.to_dict(), indent=2, sort_keys=True) + "\n").encode())
    return path


def load_sidecar(path: str | os.PathLike) -> SampleRecord:
    """Read a sidecar from its file or from the sample folder holding ``samples.json``."""
    path = Path(path)
    if path.is_dir():
        path = path / SIDECAR_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no sample sidecar at {path}; sample folders made by `visar eval sample` "
                                f"hold {SIDECAR_NAME}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it only if you also delete the images") from e
    return SampleRecord.from_dict(d)
