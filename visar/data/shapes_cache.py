"""An on-disk memo of rendered :class:`~visar.data.shapes.ShapesDataset` images (speed only).

Rendering costs about 1 ms per 32 px image on one core: fine for a CPU run, far too slow to feed a
GPU that takes a step of 256 images in a few milliseconds. The cache is one ``.npy`` file of
``uint8 [length, size, size, 3]`` RGB (what any PNG dataset holds: images differ from the float
renders by at most half an 8-bit step) plus a ``.json`` sidecar naming the dataset it holds
(size, length, split, seed, gradient_prob). It is rendered once by a pool of processes, written
atomically, and memory-mapped by every later run and every process of a distributed run.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

CACHE_VERSION = 1
_CHUNK = 4096


def cache_identity(dataset: Any) -> dict:
    """What a cache file must hold to serve ``dataset`` (stored in the ``.json`` sidecar)."""
    return {"version": CACHE_VERSION, "size": dataset.size, "length": dataset.length, "split": dataset.split,
            "seed": dataset.seed, "gradient_prob": dataset.gradient_prob}


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[N, 3, S, S]`` in ``[-1, 1]`` -> ``uint8 [N, S, S, 3]`` (round to nearest)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def from_uint8(pixels: np.ndarray) -> torch.Tensor:
    """``uint8 [N, S, S, 3]`` -> float ``[N, 3, S, S]`` in ``[-1, 1]``."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def _render_chunk(args: tuple) -> tuple[int, np.ndarray]:
    cls, kwargs, lo, hi = args  # the dataset class travels with the job: this module never imports it
    torch.set_num_threads(1)
    ds = cls(**kwargs)
    return lo, to_uint8(ds.render(range(lo, hi))[0])


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def load_or_render(dataset: Any, path: str | os.PathLike, workers: int | None = None,
                   progress: bool = True) -> np.ndarray:
    """The cached pixels of ``dataset`` as a read-only ``uint8 [length, size, size, 3]`` memory map.

    Renders and writes the file (atomically: a temporary file renamed into place) when it is missing.
    A file made for another dataset (size, length, split, seed, ...) raises ``ValueError`` naming the
    difference: delete it or give another path.
    """
    path = Path(path)
    want = cache_identity(dataset)
    meta = _sidecar(path)
    if path.is_file() and meta.is_file():
        have = json.loads(meta.read_text())
        if have != want:
            diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
            raise ValueError(f"shapes cache {path} was rendered for another dataset ({diff}, as (file, wanted)); "
                             "delete it or set another data.cache path")
        arr = np.load(path, mmap_mode="r")
        if arr.shape != (dataset.length, dataset.size, dataset.size, 3) or arr.dtype != np.uint8:
            raise ValueError(f"shapes cache {path} holds {arr.dtype} {arr.shape}, expected uint8 "
                             f"{(dataset.length, dataset.size, dataset.size, 3)}; delete it to re-render")
        return arr
    from tqdm.auto import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    kwargs = {"size": dataset.size, "length": dataset.length, "split": dataset.split, "seed": dataset.seed,
              "gradient_prob": dataset.gradient_prob}
    jobs = [(type(dataset), kwargs, lo, min(lo + _CHUNK, dataset.length)) for lo in range(0, dataset.length, _CHUNK)]
    workers = workers or max(1, min(len(os.sched_getaffinity(0)), 16))
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                        shape=(dataset.length, dataset.size, dataset.size, 3))
        bar = tqdm(total=dataset.length, desc=f"render shapes cache {path.name}", disable=not progress)
        if workers == 1:
            results = map(_render_chunk, jobs)
            for lo, px in results:
                out[lo:lo + len(px)] = px
                bar.update(len(px))
        else:
            with ProcessPoolExecutor(workers) as pool:
                for lo, px in pool.map(_render_chunk, jobs):
                    out[lo:lo + len(px)] = px
                    bar.update(len(px))
        bar.close()
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    tmp_meta = meta.with_name(f".{meta.name}.{os.getpid()}.tmp")
    tmp_meta.write_text(json.dumps(want))
    os.replace(tmp_meta, meta)
    return np.load(path, mmap_mode="r")
