"""FID, Inception Score, KID and precision/recall through torch-fidelity, with float64 statistics.

``compute_metrics(samples, ref)`` reads images from a folder, an ADM-style ``.npz`` (``arr_0``) or a
``uint8 [N, H, W, 3]`` array, extracts the FID Inception's features with torch-fidelity's extractor
(local weights only, see :mod:`visar.eval.inception`), and computes:

* FID: float64 ``mu``/``sigma`` and :func:`~visar.eval.frechet.frechet_distance` (torch-fidelity keeps
  float32 statistics); against an ADM reference batch the precomputed float64 ``mu``/``sigma`` are used;
* IS (``isc_features_to_metric``), KID (``kid_features_to_metric`` on float64 features) and
  precision/recall (``prc_features_to_metric``) from torch-fidelity, with its defaults.

Reference features and statistics are cached on disk, keyed by the sha256 of the reference's content
and of the weights file (atomic writes; ``$VISAR_CACHE_DIR`` or ``~/.cache/visar``).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from visar.eval.frechet import frechet_distance_from_features, gaussian_statistics
from visar.eval.inception import WEIGHTS_SHA256_PREFIX, build_extractor, resolve_weights
from visar.eval.io import list_images, read_image, sha256_file, sha256_files
from visar.eval.sidecar import SIDECAR_NAME

log = logging.getLogger("visar.eval")

CACHE_ENV = "VISAR_CACHE_DIR"
#: torch-fidelity's default KID subset size (used when both sets hold at least this many images)
KID_SUBSET_SIZE = 1000
_CACHE_VERSION = 1


@dataclass
class _Input:
    """One side of a comparison: images (lazily read) and/or precomputed FID statistics."""

    name: str
    kind: str  # "folder" | "npz" | "array" | "stats"
    num: int = 0
    size: tuple[int, int] | None = None
    files: list | None = None
    path: Path | None = None
    array: np.ndarray | None = None
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None

    @property
    def has_images(self) -> bool:
        return self.num > 0

    def content_hash(self) -> str:
        if self.kind == "folder":
            return sha256_files(self.files, root=self.files[0].parent)
        if self.kind == "npz":
            return sha256_file(self.path)
        return hashlib.sha256(np.ascontiguousarray(self.array).tobytes()
                              + str(self.array.shape).encode()).hexdigest()

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """``uint8 [B, H, W, 3]`` batches; every image must have this input's size."""
        if self.kind == "array":
            for s in range(0, self.num, batch_size):
                yield self.array[s:s + batch_size]
        elif self.kind == "folder":
            for s in range(0, self.num, batch_size):
                ims = []
                for p in self.files[s:s + batch_size]:
                    im = read_image(p)
                    if im.shape[:2] != self.size:
                        raise ValueError(f"{p} is {im.shape[0]}x{im.shape[1]} but the other images of {self.name} "
                                         f"are {self.size[0]}x{self.size[1]}; all images of one set must share a size")
                    ims.append(im)
                yield np.stack(ims)
        else:
            yield from _npz_member_batches(self.path, "arr_0", batch_size)


def _npz_header(path: Path, member: str) -> tuple[tuple, np.dtype] | None:
    with zipfile.ZipFile(path) as zf:
        if f"{member}.npy" not in zf.namelist():
            return None
        with zf.open(f"{member}.npy") as f:
            shape, _, dtype = _read_npy_header(f)
    return shape, dtype


def _read_npy_header(f) -> tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}; re-save the file with np.savez")


def _npz_member_batches(path: Path, member: str, batch_size: int) -> Iterator[np.ndarray]:
    """Stream ``member`` of an npz in batches along the first axis (memory: one batch)."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{member}.npy") as f:
        shape, fortran, dtype = _read_npy_header(f)
        if fortran:
            raise ValueError(f"{path}:{member} is Fortran-ordered; re-save it with np.savez")
        row = int(np.prod(shape[1:])) * dtype.itemsize
        for s in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - s)
            buf = f.read(n * row)
            if len(buf) != n * row:
                raise ValueError(f"{path} is truncated: {member} ends at image {s + len(buf) // row}")
            yield np.frombuffer(buf, dtype=dtype).reshape((n, *shape[1:]))


def _check_image_array(a: np.ndarray, name: str) -> None:
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"{name}: images must be [N, H, W, 3] (NHWC, RGB), got shape {tuple(a.shape)}")
    if a.dtype != np.uint8:
        raise ValueError(f"{name}: images must be uint8 in [0, 255], got {a.dtype}; from [-1, 1] floats use "
                         "visar.pipeline.to_uint8")


def open_input(x: Any, role: str) -> _Input:
    """Describe ``x`` (folder, ``.npz``, or ``uint8 [N, H, W, 3]`` array) as one side of a comparison.

    ``role`` is ``"samples"`` or ``"reference"``; only a reference may be statistics without images.
    """
    if isinstance(x, torch.Tensor):
        x = x.cpu().numpy()
    if isinstance(x, np.ndarray):
        _check_image_array(x, role)
        return _Input(role, "array", num=len(x), size=tuple(x.shape[1:3]), array=x)
    if not isinstance(x, (str, os.PathLike)):
        raise TypeError(f"{role} must be a folder, an .npz file or a uint8 [N, H, W, 3] array, got {type(x).__name__}")
    path = Path(x)
    if path.is_dir():
        if (path / SIDECAR_NAME).is_file() and (path / "images").is_dir():
            path = path / "images"  # a folder written by `visar eval sample`
        files = list_images(path)
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(files[0]) as im:
                w, h = im.size
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"corrupt or unreadable image {files[0]}: {e}") from e
        return _Input(f"{role} {path}", "folder", num=len(files), size=(h, w), files=files)
    if not path.is_file():
        raise FileNotFoundError(f"{role} {path} not found (expected a folder of images or an .npz)")
    if path.suffix != ".npz":
        raise ValueError(f"{role} {path} is neither a folder nor an .npz file")
    try:
        with zipfile.ZipFile(path) as zf:
            names = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not a readable .npz (truncated or corrupt?): {e}") from e
    inp = _Input(f"{role} {path}", "npz", path=path)
    if "arr_0" in names:
        shape, dtype = _npz_header(path, "arr_0")
        _check_image_array(np.empty((0, *shape[1:]), dtype=dtype), f"{path}:arr_0")
        inp.num, inp.size = shape[0], tuple(shape[1:3])
    if {"mu", "sigma"} <= names:
        if role != "reference":
            raise ValueError(f"{path} holds statistics (mu/sigma); samples must be images (arr_0)")
        with np.load(path) as f:
            inp.mu, inp.sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
        if inp.mu.ndim != 1 or inp.sigma.shape != (inp.mu.shape[0], inp.mu.shape[0]):
            raise ValueError(f"{path}: mu {inp.mu.shape} / sigma {inp.sigma.shape} are not [D] / [D, D]")
        if not inp.has_images:
            inp.kind = "stats"
    if not inp.has_images and inp.mu is None:
        want = "'arr_0' (uint8 [N, H, W, 3] images) or 'mu' and 'sigma' (an ADM reference batch)" \
            if role == "reference" else "'arr_0' (uint8 [N, H, W, 3] images, as written by `visar eval sample`)"
        raise ValueError(f"{path} has neither: it needs {want}; its arrays are {sorted(names)}")
    return inp


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "visar")) / "eval"


def _extract(extractor: torch.nn.Module, inp: _Input, batch_size: int, device: torch.device,
             progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(pool features [N, 2048], unbiased logits [N, 1008])`` as float32 numpy."""
    from tqdm.auto import tqdm

    feats, logits = [], []
    with torch.inference_mode(), tqdm(total=inp.num, disable=not progress, desc=f"Inception: {inp.name}",
                                      unit="img") as bar:
        for b in inp.batches(batch_size):
            b = b if b.flags.writeable and b.flags.c_contiguous else np.array(b)
            x = torch.from_numpy(b).permute(0, 3, 1, 2).to(device)  # [B, 3, H, W] uint8
            f, lg = extractor(x)
            feats.append(f.cpu().numpy())
            logits.append(lg.cpu().numpy())
            bar.update(len(b))
    return np.concatenate(feats), np.concatenate(logits)


def _reference_features(extractor, inp: _Input, weights_hash: str, batch_size: int, device, progress: bool,
                        cache_dir: Path, use_cache: bool) -> np.ndarray:
    """Pool features of the reference images, from the on-disk cache when present."""
    key = hashlib.sha256(json.dumps({"v": _CACHE_VERSION, "content": inp.content_hash(), "weights": weights_hash,
                                     "extractor": "inception-v3-compat/2048"}).encode()).hexdigest()
    path = cache_dir / f"ref-{key[:40]}.npz"
    if use_cache and path.is_file():
        try:
            with np.load(path) as f:
                log.info("reference features from cache %s", path)
                return f["features"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            log.warning("ignoring unreadable cache file %s (%s)", path, e)
    feats, _ = _extract(extractor, inp, batch_size, device, progress)
    if use_cache:
        from visar.utils.io import atomic_write_bytes

        mu, sigma = gaussian_statistics(feats)
        buf = io.BytesIO()
        np.savez(buf, features=feats, mu=mu, sigma=sigma)
        atomic_write_bytes(path, buf.getvalue())
    return feats


def compute_metrics(samples: Any, ref: Any = None, *, inception_weights: str | os.PathLike | None = None,
                    fid: bool = True, isc: bool = True, kid: bool = True, prc: bool = True,
                    batch_size: int = 64, device: str | torch.device | None = None,
                    kid_subset_size: int | None = None, kid_subsets: int = 100, isc_splits: int = 10,
                    prc_neighborhood: int = 3, rng_seed: int = 2020, cache_dir: str | os.PathLike | None = None,
                    use_cache: bool = True, progress: bool = True) -> dict[str, float]:
    """FID / IS / KID / precision-recall of ``samples`` against ``ref``.

    Args:
        samples: folder of images (a ``visar eval sample`` folder is read through its ``images/``), an
            ``.npz`` with ``arr_0`` (``uint8 [N, H, W, 3]``), or such an array.
        ref: the same kinds, or an ADM reference batch ``.npz`` with float64 ``mu``/``sigma`` (FID uses those
            when present; KID and precision/recall need its ``arr_0`` images). Not needed for IS alone.
        inception_weights: local FID Inception weights (else ``$VISAR_INCEPTION_WEIGHTS``).
        fid, isc, kid, prc: which metrics to compute.
        kid_subset_size, kid_subsets, isc_splits, prc_neighborhood, rng_seed: torch-fidelity's settings
            (its defaults). ``kid_subset_size=None`` takes torch-fidelity's 1000, or the image count of the
            smaller set when it holds fewer (logged; KID of sets that small has a large variance).
        cache_dir, use_cache: where reference features are cached (content-hash keys).

    Returns:
        ``{"frechet_inception_distance", "inception_score_mean", "inception_score_std",
        "kernel_inception_distance_mean", "kernel_inception_distance_std", "precision", "recall", "f_score",
        "num_samples", "num_reference"}`` (the requested ones).
    """
    if not (fid or isc or kid or prc):
        raise ValueError("nothing to compute: enable at least one of fid, isc, kid, prc")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    weights = resolve_weights(inception_weights)
    s = open_input(samples, "samples")
    if not s.has_images:
        raise ValueError(f"{s.name} holds no images")
    r = None
    if fid or kid or prc:
        if ref is None:
            raise ValueError("FID, KID and precision/recall need a reference (ref=folder, .npz or ADM batch); "
                             "for the Inception Score alone pass fid=False, kid=False, prc=False")
        r = open_input(ref, "reference")
        if (kid or prc) and not r.has_images:
            raise ValueError(f"{r.name} holds only mu/sigma: KID and precision/recall need reference images "
                             "(arr_0); pass kid=False, prc=False, or a reference with images")
        if r.size is not None and r.size != s.size:
            raise ValueError(f"the samples are {s.size[0]}x{s.size[1]} but the reference is {r.size[0]}x{r.size[1]}: "
                             f"FID is only comparable at equal sizes. Resample with resize={r.size[0]} "
                             f"(`visar eval sample ... --resize {r.size[0]}`), e.g. LlamaGen's 384 px models are "
                             "evaluated at 256")
    if kid_subset_size is None:
        kid_subset_size = KID_SUBSET_SIZE
        if kid and r is not None and r.has_images and min(s.num, r.num) < KID_SUBSET_SIZE:
            kid_subset_size = min(s.num, r.num)
            log.info("KID subsets of %d images (the smaller set's size; torch-fidelity's default is %d)",
                     kid_subset_size, KID_SUBSET_SIZE)
    elif not isinstance(kid_subset_size, int) or kid_subset_size < 1:
        raise ValueError(f"kid_subset_size must be a positive int or None (automatic), got {kid_subset_size!r}")
    _check_counts(s, r, fid, isc, kid, prc, kid_subset_size, isc_splits, prc_neighborhood)

    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                          else "cpu")
    weights_hash = sha256_file(weights)
    if not weights_hash.startswith(WEIGHTS_SHA256_PREFIX):
        log.warning("Inception weights %s are not the official FID weights (sha256 %s..., expected %s...): "
                    "scores are not comparable with published numbers", weights, weights_hash[:8],
                    WEIGHTS_SHA256_PREFIX)
    extractor = build_extractor(weights, device)
    s_feat, s_logits = _extract(extractor, s, batch_size, device, progress)
    r_feat = None
    if r is not None and r.has_images and (kid or prc or (fid and r.mu is None)):
        r_feat = _reference_features(extractor, r, weights_hash, batch_size, device, progress,
                                     _cache_dir(cache_dir), use_cache)
    out: dict[str, float] = {"num_samples": s.num}
    if r is not None:
        out["num_reference"] = r.num
    if fid:
        mu_r, sigma_r = (r.mu, r.sigma) if r.mu is not None else gaussian_statistics(r_feat)
        if mu_r.shape[0] != s_feat.shape[1]:
            raise ValueError(f"reference statistics are {mu_r.shape[0]}-d but Inception pool features are "
                             f"{s_feat.shape[1]}-d; the reference was made with another network")
        out["frechet_inception_distance"] = frechet_distance_from_features(s_feat, mu_r, sigma_r)
    if isc:
        from torch_fidelity.metric_isc import isc_features_to_metric

        out.update(isc_features_to_metric(torch.from_numpy(s_logits), splits=isc_splits, shuffle=True,
                                          rng_seed=rng_seed))
    if kid:
        from torch_fidelity.metric_kid import kid_features_to_metric

        out.update(kid_features_to_metric(torch.from_numpy(s_feat).double(), torch.from_numpy(r_feat).double(),
                                          kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                                          rng_seed=rng_seed, verbose=False))
    if prc:
        from torch_fidelity.metric_prc import prc_features_to_metric

        out.update(prc_features_to_metric(torch.from_numpy(s_feat).double(), torch.from_numpy(r_feat).double(),
                                          prc_neighborhood=prc_neighborhood, verbose=False))
    return out


def _check_counts(s: _Input, r: _Input | None, fid, isc, kid, prc, kid_subset_size, isc_splits,
                  prc_neighborhood) -> None:
    """Fail before the (slow) feature extraction when a metric cannot be computed from this many images."""
    sides = [("samples", s.num)] + ([("reference", r.num)] if r is not None and r.has_images else [])
    if fid:
        for side, n in sides:
            if n < 2:
                raise ValueError(f"FID needs at least 2 images per side (a covariance); the {side} have {n}")
            if n < 2048:
                log.warning("%s: %d images < 2048 feature dimensions: the covariance is rank-deficient and FID is "
                            "biased upwards (the protocol uses 50000 samples)", side, n)
    if isc and s.num < isc_splits:
        raise ValueError(f"the Inception Score splits the samples into isc_splits={isc_splits} parts but there are "
                         f"only {s.num} samples; lower isc_splits or add samples")
    if kid:
        for side, n in sides:
            if n < kid_subset_size:
                raise ValueError(f"KID draws subsets of kid_subset_size={kid_subset_size} images but the {side} have "
                                 f"{n}; pass kid_subset_size <= {min(n for _, n in sides)} (CLI: --kid-subset-size)")
    if prc:
        for side, n in sides:
            if n <= prc_neighborhood:
                raise ValueError(f"precision/recall use the {prc_neighborhood}-th nearest neighbour but the {side} "
                                 f"have only {n} images; lower prc_neighborhood or add images")
