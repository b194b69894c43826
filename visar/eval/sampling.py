"""Sharded sampling of an evaluation set to a folder of PNGs, an ADM ``.npz`` and a JSON sidecar.

The protocol, as code (after DiT's ``sample_ddp.py`` and the ADM evaluator):

* **One seed rule per image index** (:data:`visar.eval.sidecar.SEED_RULE`, shared with ``visar sample``):
  image ``i`` is row ``i - s`` of the *chunk* starting at ``s = (i // batch_size) * batch_size``. A chunk
  is always ``batch_size`` images, drawn by one ``generate`` call with a ``torch.Generator`` seeded from
  ``(seed, s)`` (:func:`chunk_seed`); images past ``num`` in the last chunk are drawn and dropped. So
  image ``i`` depends on ``seed``, ``batch_size`` (recorded) and its index, **not on ``num`` nor on the
  number of processes**: a set of 20 extended to 28 keeps its 20 images. Chunk ``c`` goes to process
  ``c % num_processes``.
* **Labels are chosen explicitly**: ``"balanced"`` gives image ``i`` the class ``i % num_classes``
  (50 per class for 50k ImageNet samples), ``"random"`` draws class ``i`` from a hash of
  ``(seed, i)``. Both are pure functions of the index, so a larger ``num`` extends a set.
* **Resume.** Files are written atomically; a re-run with the same settings skips chunks whose
  files all exist and regenerates the rest (same seeds, so no duplicates and no gaps). A folder made
  with other settings is refused, unless its run failed before writing any image (its record is then
  replaced: a corrected command can reuse the folder).
* **Outputs.** ``images/``, ``samples.npz`` (``arr_0``: ``uint8 [N, H, W, 3]``, ``arr_1``: labels;
  byte-reproducible) packed on rank 0, and ``samples.json`` (:class:`~visar.eval.sidecar.SampleRecord`).

Runs under Accelerate: one process works as is; ``accelerate launch`` / ``torchrun`` (CPU: gloo) or
``accelerate.notebook_launcher`` shard it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from visar.eval.io import (finished_indices, image_name, index_width, read_image,
                           remove_stale_temporaries, sha256_file, write_npz_streaming, write_png)
from visar.eval.sidecar import SIDECAR_NAME, SampleRecord, load_sidecar, save_sidecar

log = logging.getLogger("visar.eval")

LABEL_MODES = ("balanced", "random")
NPZ_NAME = "samples.npz"
IMAGES_DIR = "images"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def _hash63(text: str) -> int:
    """``int.from_bytes(sha256(text)[:8], "little") >> 1``: a 63-bit integer (the form :data:`SEED_RULE` states)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def chunk_seed(seed: int, start: int) -> int:
    """Seed of the chunk whose first global index is ``start`` (63-bit, from sha256; see :data:`SEED_RULE`)."""
    return _hash63(f"visar-sample:{seed}:{start}")


def chunk_starts(indices: Sequence[int] | range, chunk_size: int) -> list[int]:
    """First global index of every chunk that holds one of ``indices`` (sorted, each once)."""
    return sorted({(i // chunk_size) * chunk_size for i in indices})


def generate_balanced(pipe: Any, num: int, batch: int, seed: int, **options: Any) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
    """``num`` seeded images with balanced labels, the sample set of the shapes benchmarks.

    Labels are ``class_labels("balanced", num, K)`` (``i % K``); the batch whose first index is ``s`` is
    ``pipe.generate(labels[s:s + batch], seed=chunk_seed(seed, s), **options)`` (the last batch may be
    shorter), so the same ``num``, ``batch``, ``seed`` and options give the same images.

    Returns:
        float32 CPU images ``[num, 3, H, W]`` in ``[-1, 1]`` and their labels ``LongTensor [num]``.
    """
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    labels = class_labels("balanced", num, pipe.generator.num_classes)
    out = [pipe.generate(labels[s:s + batch], seed=chunk_seed(seed, s), **options).float().cpu()
           for s in range(0, num, batch)]
    return torch.cat(out), labels


def generate_chunk(pipe: Any, labels_of: Callable[[int, int], Sequence[int]], start: int, *, seed: int,
                   chunk_size: int, progress: bool = False, sampler: Any = None, **options: Any) -> torch.Tensor:
    """The images of global indices ``[start, start + chunk_size)`` under :data:`SEED_RULE`.

    Args:
        pipe: a :class:`visar.Pipeline` (or anything with ``generate(class_ids, seed=, **options)``
            returning ``[B, 3, H, W]`` in ``[-1, 1]``).
        labels_of: ``labels_of(a, b)`` -> the class ids of global indices ``a .. b-1`` (a pure function of
            the index, also past the last image wanted: the chunk is always full).
        start: a multiple of ``chunk_size``.
        seed: the run's seed; the chunk's generator is seeded with ``chunk_seed(seed, start)``.
        progress: show the sampler's own progress bar (by step) when it has one.
        sampler: the sampler (object or registered name) passed to ``generate``; ``None``: the pipeline's.
        **options: sampling options, passed to ``generate``.

    Returns:
        ``[chunk_size, 3, H, W]`` in ``[-1, 1]``; the caller drops the rows past its last index.
    """
    if start % chunk_size:
        raise ValueError(f"chunk start {start} is not a multiple of the chunk size {chunk_size}")
    ids = [int(c) for c in labels_of(start, start + chunk_size)]
    used = sampler if sampler is not None else getattr(pipe, "sampler", None)
    if isinstance(used, str):
        from visar.registry import get

        used = get("sampler", used)
    if progress and used is not None and "progress" in getattr(used, "defaults", {}) and "progress" not in options:
        options = {**options, "progress": True}
    if sampler is not None:
        options = {**options, "sampler": sampler}
    images = pipe.generate(ids, seed=chunk_seed(seed, start), **options)
    if not (isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[0] == chunk_size
            and images.shape[1] == 3):
        raise ValueError(f"pipeline.generate must return [B, 3, H, W] in [-1, 1] with B={chunk_size}; got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    return images


def class_labels(mode: str, num: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Class of every global index: ``LongTensor [num]`` in ``[0, num_classes)``.

    ``"balanced"``: ``i % num_classes`` (equal counts when ``num`` is a multiple of ``num_classes``);
    ``"random"``: uniform, from a hash of ``(seed, i)`` (independent of ``num`` and of the processes).
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES} (chosen explicitly: the official protocols differ; "
                         f"MAR/VAR use balanced, LlamaGen random), got {mode!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return labels_range(mode, 0, num, num_classes, seed)


def labels_range(mode: str, start: int, stop: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """Classes of the global indices ``start .. stop-1``: ``class_labels(mode, stop, ...)[start:]`` without
    computing the indices before ``start``."""
    if mode == "balanced":
        return torch.arange(start, stop, dtype=torch.long) % num_classes
    return torch.tensor([_hash63(f"visar-label:{seed}:{i}") % num_classes for i in range(start, stop)],
                        dtype=torch.long)


def weights_state_sha256(pipeline: Any) -> str:
    """sha256 over the tokenizer and generator weights (name, dtype, shape, bytes; sorted by name)."""
    h = hashlib.sha256()
    for part in ("tokenizer", "generator"):
        module = getattr(pipeline, part, None)
        if module is None:
            continue
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().contiguous().reshape(-1)
            h.update(f"{part}.{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
            h.update(t.view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def _weight_files(folder: Path) -> dict[str, str]:
    """``{path relative to folder: sha256}`` of the weight files of a pipeline folder: the top-level ones (flat
    folders of format versions 1 and 2) and those of the component folders ``pipeline.json`` names (version 3,
    e.g. ``generator/model.safetensors``)."""
    dirs = [folder]
    index = folder / "pipeline.json"
    if index.is_file():
        try:
            comps = json.loads(index.read_text()).get("components") or {}
        except (ValueError, AttributeError):
            comps = {}
        dirs += [folder / name for name in sorted(comps) if isinstance(name, str) and (folder / name).is_dir()]
    return {p.relative_to(folder).as_posix(): sha256_file(p) for d in dirs for p in sorted(d.iterdir())
            if p.is_file() and p.suffix in _WEIGHT_SUFFIXES}


def _resolve_pipeline(pipeline_or_path: Any, device: torch.device) -> tuple[Any, str, str | None, dict]:
    """(pipeline on ``device``, model name, folder path or None, {weight file: sha256})."""
    if hasattr(pipeline_or_path, "generate"):
        pipe = pipeline_or_path
        if hasattr(pipe, "to"):
            pipe.to(device)
        gen = getattr(pipe, "generator", None)
        name = type(gen).__name__ if gen is not None else type(pipe).__name__
        return pipe, name, None, {}
    if not isinstance(pipeline_or_path, (str, os.PathLike)):
        raise TypeError("pipeline_or_path must be a visar Pipeline (anything with .generate), a bundled model "
                        f"name or a pipeline folder; got {type(pipeline_or_path).__name__}")
    from visar import zoo

    name = str(pipeline_or_path)
    folder = zoo.ASSETS / zoo.BUNDLED[name] if name in zoo.BUNDLED else Path(name)
    pipe = zoo.load(name, device="cpu" if device.type == "cpu" else str(device))  # safetensors rejects "cpu:0"
    return pipe, name, str(folder.resolve()), _weight_files(folder) if folder.is_dir() else {}


def _jsonable_options(options: dict) -> dict:
    out = {}
    for k, v in options.items():
        if isinstance(v, tuple):
            v = list(v)
        try:
            json.dumps(v)
        except TypeError as e:
            raise TypeError(f"sampling option {k}={v!r} is not JSON-serialisable, so it cannot be recorded in the "
                            "sidecar; pass plain numbers, strings, lists or dicts") from e
        out[k] = v
    return out


#: sampler options that do not shape the images (not recorded, so they never block a resume)
NOT_RECORDED = ("progress",)


def sampler_name(pipeline: Any, sampler: Any = None) -> str | None:
    """Registered name of the sampler a run uses: ``sampler`` (object or name) or the pipeline's own
    (``None`` for a pipeline-like object without one). An unknown name raises a ``KeyError``."""
    resolve = getattr(pipeline, "resolve_sampler", None)
    if resolve is not None:
        return resolve(sampler).name
    if sampler is not None:
        raise TypeError(f"sampler={sampler!r} needs a visar Pipeline (one with resolve_sampler); "
                        f"got a {type(pipeline).__name__}")
    return getattr(getattr(pipeline, "sampler", None), "name", None)


def effective_options(pipeline: Any, options: dict, sampler: Any = None) -> dict:
    """What the sampler will really use, validated: its defaults, then the pipeline's stored
    ``sampling_defaults``, then ``options`` (so a record names, e.g., the cfg a bundled model samples at
    by default). ``sampler`` (object or registered name) replaces the pipeline's. Unknown option names and bad
    values raise here, before anything is written. Aliases are recorded under their option's name
    (``guidance_scale`` as ``cfg_scale``)."""
    from visar.samplers.base import default_sampler
    from visar.samplers.options import apply_aliases

    resolve = getattr(pipeline, "resolve_sampler", None)
    if resolve is not None:
        sampler = resolve(sampler)
        options = pipeline.options_for(sampler, apply_aliases(options, type(sampler).__name__, sampler.defaults))
    elif getattr(pipeline, "generator", None) is not None:  # a pipeline-like wrapper: the generator's own sampler
        sampler = default_sampler(pipeline.generator)
    else:
        return _jsonable_options({k: v for k, v in options.items() if k not in NOT_RECORDED})
    resolved = sampler.resolve(options)
    return _jsonable_options({k: v for k, v in resolved.items() if k not in NOT_RECORDED})


def _resize(images: torch.Tensor, resize: int | None, antialias: bool) -> torch.Tensor:
    """Bicubic resize of ``[B, 3, H, W]`` in ``[-1, 1]`` to ``resize`` x ``resize`` (before the uint8 cast)."""
    if resize is None or tuple(images.shape[-2:]) == (resize, resize):
        return images
    import torch.nn.functional as F

    return F.interpolate(images.float(), size=(resize, resize), mode="bicubic", align_corners=False,
                         antialias=antialias)


def _validate(num: int, labels: Any, batch_size: int, resize: int | None, dtype: str, seed: int) -> None:
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int (50000 for the ImageNet FID protocol), got {num!r}")
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be 'balanced' or 'random' (no default: state the protocol you follow), "
                         f"got {labels!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if resize is not None and (not isinstance(resize, int) or resize < 8):
        raise ValueError(f"resize must be None or an image side in pixels >= 8 (e.g. 256), got {resize!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


class _SingleProcess:
    """The part of ``accelerate.Accelerator`` used here, for a run that was not launched distributed
    (creating an Accelerator would leave global state behind that blocks a later ``notebook_launcher``)."""

    process_index, num_processes = 0, 1
    is_main_process = is_local_main_process = True

    def __init__(self, device: torch.device):
        self.device = device

    def wait_for_everyone(self) -> None:
        pass


def _make_accelerator(pipeline_or_path: Any):
    """An ``Accelerator`` (CPU with gloo when no CUDA) when launched distributed, else a single process on
    the given pipeline's device (CUDA when available for a model loaded from a name or folder)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        return Accelerator(cpu=not torch.cuda.is_available())
    device = getattr(pipeline_or_path, "device", None)
    if not isinstance(device, torch.device):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return _SingleProcess(device)


def sample_to_folder(pipeline_or_path: Any, out_dir: str | os.PathLike, num: int, labels: str,
                     num_classes: int | None = None, *, seed: int = 0, batch_size: int = 32,
                     resize: int | None = None, resize_antialias: bool = False, dtype: str = "float32",
                     progress: bool = True, model_name: str | None = None, protocol: dict | None = None,
                     departures: Sequence[str] = (), accelerator: Any = None, pack_npz: bool = True,
                     sampler: Any = None, **options: Any) -> SampleRecord:
    """Sample ``num`` class-conditional images into ``out_dir`` (see the module docstring).

    Args:
        pipeline_or_path: a :class:`visar.Pipeline` (or anything whose ``generate(class_ids, seed=, **options)``
            returns ``[B, 3, H, W]`` in ``[-1, 1]``), a bundled model name or a pipeline folder.
        out_dir: folder for ``images/``, ``samples.npz`` and ``samples.json``; re-using it resumes.
        num: number of images.
        labels: ``"balanced"`` or ``"random"`` (required: the official protocols differ).
        num_classes: classes to draw from; defaults to ``pipeline.generator.num_classes``.
        seed: global seed; every chunk's seed derives from it and the chunk's first global index.
        batch_size: the chunk size: images per ``generate`` call (part of the seed rule, recorded; the last
            chunk is drawn whole, so image ``i`` does not depend on ``num``).
        resize: bicubic resize to ``resize`` x ``resize`` on the ``[-1, 1]`` floats, before the uint8 cast
            (LlamaGen's 384 px models are evaluated at 256). ``resize_antialias`` as in ``F.interpolate``
            (off, as LlamaGen's evaluation).
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``: autocast dtype of sampling.
        model_name, protocol, departures: recorded in the sidecar.
        accelerator: an ``accelerate.Accelerator``; when ``None``, one is created if the process was launched
            distributed (``WORLD_SIZE > 1``), else sampling runs in this process on the pipeline's device.
        pack_npz: write ``samples.npz`` on rank 0 at the end.
        sampler: a registered sampler name (or a sampler object) replacing the pipeline's own; recorded by name
            with its effective options, so the record reproduces the images (a folder made with another
            sampler is refused, as for any other setting).
        **options: sampling options of the generator (``cfg_scale``, ``temperature``, ``top_k``, ``top_p``,
            ``num_steps``, ...), passed to ``generate``; validated and recorded (with the defaults the
            sampler and the pipeline add) before anything is written.

    Returns:
        The :class:`SampleRecord` written to ``samples.json`` (on every process).
    """
    _validate(num, labels, batch_size, resize, dtype, seed)
    from visar.utils.io import check_writable_dir

    check_writable_dir(out_dir, "output folder")
    acc = accelerator if accelerator is not None else _make_accelerator(pipeline_or_path)
    rank, world = acc.process_index, acc.num_processes
    out = Path(out_dir)
    img_dir = out / IMAGES_DIR

    pipe, default_name, model_path, file_hashes = _resolve_pipeline(pipeline_or_path, acc.device)
    gen_classes = getattr(getattr(pipe, "generator", None), "num_classes", None)
    if num_classes is None:
        if not gen_classes:
            raise ValueError("num_classes is needed: the pipeline's generator does not say how many classes it has")
        num_classes = int(gen_classes)
    if gen_classes and num_classes > gen_classes:
        raise ValueError(f"num_classes={num_classes} exceeds the model's {gen_classes} classes")
    class_ids = class_labels(labels, num, num_classes, seed)
    if labels == "balanced" and num % num_classes:
        log.warning("num=%d is not a multiple of num_classes=%d: class counts differ by one", num, num_classes)

    import visar

    record = SampleRecord(
        model_name=model_name or default_name, num=num, labels=labels, num_classes=num_classes, seed=seed,
        batch_size=batch_size, sampler=sampler_name(pipe, sampler), options=effective_options(pipe, options, sampler),
        weights_state_sha256=weights_state_sha256(pipe),
        model_path=model_path, weights_sha256=file_hashes, resize=resize, resize_antialias=bool(resize_antialias),
        dtype=dtype, num_processes=world, index_width=index_width(num), protocol=protocol,
        departures=list(departures), visar_version=visar.__version__, torch_version=torch.__version__,
        device=str(acc.device))

    # every process reads the same state before anyone writes, so all agree on errors and on the work
    previous = None
    done = finished_indices(img_dir)
    if (out / SIDECAR_NAME).is_file():
        previous = load_sidecar(out)
        if previous.sampler is None:  # recorded before samplers were: drawn by the pipeline's own sampler
            previous.sampler = sampler_name(pipe)
        diff = previous.differences(record)
        if diff and (done or previous.status == "complete"):
            raise ValueError(f"{out} holds samples made with other settings ({'; '.join(diff)}); "
                             "use a new output folder (or delete this one) instead of mixing sample sets")
        if diff:  # a run that failed before its first image: nothing to mix, its record is replaced
            log.info("%s holds no image of its earlier run (%s): starting over with these settings",
                     out, "; ".join(diff))
            previous = None
    chunks = [(c, min(c + batch_size, num)) for c in chunk_starts(range(num), batch_size)]
    todo_any = any(i not in done for i in range(num))
    if done and previous is None:
        raise ValueError(f"{img_dir} holds images but no {SIDECAR_NAME}: refusing to mix them with new samples; "
                         "use an empty output folder")
    acc.wait_for_everyone()
    if acc.is_main_process:
        img_dir.mkdir(parents=True, exist_ok=True)
        if removed := remove_stale_temporaries(img_dir):
            log.info("removed %d partial files left by an interrupted run", removed)
        if previous is not None and previous.status == "complete" and previous.num == num and not todo_any:
            record.status, record.npz, record.image_size = "complete", previous.npz, previous.image_size
        save_sidecar(record, out)
    acc.wait_for_everyone()

    mine = [(s, e) for j, (s, e) in enumerate(chunks) if j % world == rank and not all(i in done for i in range(s, e))]
    if acc.is_main_process:
        log.info("sampling %d images (%d to do) with %d process(es) into %s",
                 num, num - sum(1 for i in range(num) if i in done), world, img_dir)
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(e - s for s, e in mine), disable=not (progress and acc.is_local_main_process),
               desc=f"sampling (rank {rank})", unit="img")
    amp = torch.autocast(acc.device.type, dtype=_DTYPES[dtype], enabled=dtype != "float32")
    from visar.utils.images import to_uint8

    def labels_of(a: int, b: int) -> list[int]:  # the label rule also past num: the last chunk is full
        return labels_range(labels, a, b, num_classes, seed).tolist()

    for s, e in mine:
        with amp:
            images = generate_chunk(pipe, labels_of, s, seed=seed, chunk_size=batch_size,
                                    progress=progress and acc.is_local_main_process, sampler=sampler,
                                    **options)[:e - s]
        u8 = to_uint8(_resize(images, resize, resize_antialias)).numpy()  # [B, H, W, 3]
        for k, i in enumerate(range(s, e)):
            if i not in done:
                write_png(img_dir / image_name(i, record.index_width), u8[k])
        bar.update(e - s)
    bar.close()
    acc.wait_for_everyone()

    if acc.is_main_process:
        have = finished_indices(img_dir)
        missing = [i for i in range(num) if i not in have]
        if missing:
            raise RuntimeError(f"{len(missing)} images missing after sampling (first: {missing[:5]}); re-run the "
                               "same command to resume")
        if pack_npz and (todo_any or record.status != "complete" or not (out / NPZ_NAME).is_file()):
            first = read_image(img_dir / image_name(0, record.index_width))
            log.info("packing %d images into %s", num, out / NPZ_NAME)
            write_npz_streaming(out / NPZ_NAME,
                                (read_image(img_dir / image_name(i, record.index_width)) for i in range(num)),
                                (num, *first.shape), labels=class_ids.numpy())
            record.image_size = [int(first.shape[0]), int(first.shape[1])]
        elif record.image_size is None:
            first = read_image(img_dir / image_name(0, record.index_width))
            record.image_size = [int(first.shape[0]), int(first.shape[1])]
        record.status, record.npz = "complete", NPZ_NAME if pack_npz else record.npz
        save_sidecar(record, out)
    acc.wait_for_everyone()
    return load_sidecar(out)

