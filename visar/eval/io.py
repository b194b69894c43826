"""File handling for evaluation: sample folders, ADM-style ``.npz`` batches, content hashes.

Sample folders hold one PNG per image named by its *global* index (``000123.png``), so shards written
by different processes never collide and a resumed run knows what is done. ``.npz`` files follow the
ADM evaluator (``arr_0``: ``uint8 [N, H, W, 3]``; optional ``arr_1``: labels; reference batches may
carry float64 ``mu`` / ``sigma`` instead of, or besides, images).
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from visar.utils.io import atomic_file

#: image extensions read from folders (lower case)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def index_width(num: int) -> int:
    """Digits of the zero-padded global index: 6 (``{index:06d}``), more above a million images."""
    return max(6, len(str(max(num - 1, 0))))


def image_name(index: int, width: int = 6) -> str:
    """``000123.png`` for global index 123."""
    return f"{index:0{width}d}.png"


_INDEX_RE = re.compile(r"^(\d+)\.png$")


def finished_indices(folder: str | os.PathLike) -> set[int]:
    """Global indices whose PNG exists in ``folder`` (files are written atomically, so they are complete)."""
    folder = Path(folder)
    if not folder.is_dir():
        return set()
    return {int(m.group(1)) for name in os.listdir(folder) if (m := _INDEX_RE.match(name))}


def write_png(path: str | os.PathLike, image_hwc: np.ndarray) -> None:
    """Write ``uint8 [H, W, 3]`` as PNG through a temporary file and ``os.replace`` (atomic on kill).

    No ``fsync``: a killed process leaves either the whole file or none (50k fsyncs would cost minutes).
    """
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_hwc).save(buf, format="PNG")
    with atomic_file(path, fsync=False) as f:
        f.write(buf.getvalue())


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete ``.*.tmp`` files left by a killed run; returns how many were removed."""
    folder = Path(folder)
    n = 0
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            p.unlink(missing_ok=True)
            n += 1
    return n


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files of ``folder`` (not recursive, hidden files skipped), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} not found")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); for a sample folder made by "
                         "`visar eval sample`, pass its images/ subfolder or its samples.npz")
    return files


def read_image(path: str | os.PathLike) -> np.ndarray:
    """``uint8 [H, W, 3]`` (grey / RGBA / palette images converted to RGB). A corrupt file raises ``ValueError``
    naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"corrupt or unreadable image {path}: {e}. Delete or regenerate it "
                         "(a sample folder made by `visar eval sample` regenerates missing files on resume)") from e


def write_npz_streaming(path: str | os.PathLike, images: Iterable[np.ndarray], shape: Sequence[int],
                        labels: np.ndarray | None = None) -> None:
    """Write an ADM-style npz (``arr_0`` ``uint8 [N, H, W, 3]``, optional ``arr_1`` labels) image by image.

    Memory stays at one image: the ``.npy`` member is streamed into the (uncompressed, zip64) archive,
    which ``np.load`` reads like ``np.savez`` output. The file appears atomically (temp file + rename) and
    is byte-reproducible: the same arrays give the same bytes (fixed entry timestamps, :data:`ZIP_DATE_TIME`).

    Args:
        images: iterable of ``uint8 [H, W, 3]`` arrays, exactly ``shape[0]`` of them.
        shape: ``(N, H, W, 3)``.
    """
    shape = tuple(int(s) for s in shape)
    with atomic_file(path) as raw, zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open(_zip_entry("arr_0.npy"), "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            n = 0
            for im in images:
                if im.shape != shape[1:] or im.dtype != np.uint8:
                    raise ValueError(f"image {n} has shape {im.shape} {im.dtype}, expected {shape[1:]} uint8")
                f.write(np.ascontiguousarray(im).tobytes())
                n += 1
            if n != shape[0]:
                raise ValueError(f"got {n} images, expected {shape[0]}")
        if labels is not None:
            buf = io.BytesIO()
            np.save(buf, np.asarray(labels, dtype=np.int64))
            zf.writestr(_zip_entry("arr_1.npy"), buf.getvalue())


#: timestamp of every zip entry visar writes, so the same arrays give the same bytes (visar keys caches on
#: file hashes); 1980-01-01 is the earliest date a zip entry can hold
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


def _zip_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def sha256_files(paths: Iterable[Path], root: Path | None = None) -> str:
    """One hex sha256 over several files: relative name and content of each, in the given order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.relative_to(root) if root else p.name).encode() + b"\0")
        h.update(sha256_file(p).encode())
    return h.hexdigest()
