"""Sharded sampling of an evaluation set to a folder of PNGs, an ADM ``.npz`` and a JSON sidecar.

The protocol, as code (after DiT's ``sample_ddp.py`` and the ADM evaluator):

* **Global indices.** Image ``i`` of ``num`` is ``images/{i:06d}.png`` whatever process made it.
  Batch ``b`` covers indices ``[b * batch_size, (b + 1) * batch_size)`` and goes to process
  ``b % num_processes``. It is sampled with a ``torch.Generator`` seeded from ``(seed, b * batch_size)``
  (see :data:`visar.eval.sidecar.SEED_RULE`), so the image set depends on ``seed`` and ``batch_size``
  but **not on the number of processes**.
* **Labels are chosen explicitly**: ``"balanced"`` gives image ``i`` the class ``i % num_classes``
  (50 per class for 50k ImageNet samples), ``"random"`` draws class ``i`` from a hash of
  ``(seed, i)``. Both are pure functions of the index, so a larger ``num`` extends a set.
* **Resume.** Files are written atomically; a re-run with the same settings skips batches whose
  files all exist and regenerates the rest (same seeds, so no duplicates and no gaps). A folder made
  with other settings is refused.
* **Outputs.** ``images/``, ``samples.npz`` (``arr_0``: ``uint8 [N, H, W, 3]``, ``arr_1``: labels)
  packed on rank 0, and ``samples.json`` (:class:`~visar.eval.sidecar.SampleRecord`).

Runs under Accelerate: one process works as is; ``accelerate launch`` / ``torchrun`` (CPU: gloo) or
``accelerate.notebook_launcher`` shard it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from visar.eval.io import (finished_indices, image_name, index_width, iter_chunks, read_image,
                           remove_stale_temporaries, sha256_file, write_npz_streaming, write_png)
from visar.eval.sidecar import SIDECAR_NAME, SampleRecord, load_sidecar, save_sidecar

log = logging.getLogger("visar.eval")

LABEL_MODES = ("balanced", "random")
NPZ_NAME = "samples.npz"
IMAGES_DIR = "images"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def _hash63(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def chunk_seed(seed: int, start: int) -> int:
    """Seed of the batch whose first global index is ``start`` (63-bit, from sha256)."""
    return _hash63(f"visar-sample:{seed}:{start}")


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
    if mode == "balanced":
        return torch.arange(num, dtype=torch.long) % num_classes
    return torch.tensor([_hash63(f"visar-label:{seed}:{i}") % num_classes for i in range(num)], dtype=torch.long)


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
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())
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


def effective_options(pipeline: Any, options: dict) -> dict:
    """What the sampler will really use: its defaults, then the pipeline's stored ``sampling_defaults``,
    then ``options`` (so a record names, e.g., the cfg a bundled model samples at by default)."""
    from visar.samplers.base import default_sampler

    resolve = getattr(pipeline, "resolve_sampler", None)
    if resolve is not None:
        sampler = resolve(None)
        options = pipeline.options_for(sampler, options)
    elif getattr(pipeline, "generator", None) is not None:  # a pipeline-like wrapper: the generator's own sampler
        sampler = default_sampler(pipeline.generator)
    else:
        return _jsonable_options(dict(options))
    return _jsonable_options({**sampler.defaults, **sampler.options, **options})


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
                     **options: Any) -> SampleRecord:
    """Sample ``num`` class-conditional images into ``out_dir`` (see the module docstring).

    Args:
        pipeline_or_path: a :class:`visar.Pipeline` (or anything whose ``generate(class_ids, seed=, **options)``
            returns ``[B, 3, H, W]`` in ``[-1, 1]``), a bundled model name or a pipeline folder.
        out_dir: folder for ``images/``, ``samples.npz`` and ``samples.json``; re-using it resumes.
        num: number of images.
        labels: ``"balanced"`` or ``"random"`` (required: the official protocols differ).
        num_classes: classes to draw from; defaults to ``pipeline.generator.num_classes``.
        seed: global seed; every batch's seed derives from it and the batch's first global index.
        batch_size: images per ``generate`` call (part of the protocol: it fixes the seeds).
        resize: bicubic resize to ``resize`` x ``resize`` on the ``[-1, 1]`` floats, before the uint8 cast
            (LlamaGen's 384 px models are evaluated at 256). ``resize_antialias`` as in ``F.interpolate``
            (off, as LlamaGen's evaluation).
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``: autocast dtype of sampling.
        model_name, protocol, departures: recorded in the sidecar.
        accelerator: an ``accelerate.Accelerator``; when ``None``, one is created if the process was launched
            distributed (``WORLD_SIZE > 1``), else sampling runs in this process on the pipeline's device.
        pack_npz: write ``samples.npz`` on rank 0 at the end.
        **options: sampling options of the generator (``cfg_scale``, ``temperature``, ``top_k``, ``top_p``,
            ``num_steps``, ...), passed to ``generate`` and recorded.

    Returns:
        The :class:`SampleRecord` written to ``samples.json`` (on every process).
    """
    _validate(num, labels, batch_size, resize, dtype, seed)
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
        batch_size=batch_size, options=effective_options(pipe, options),
        weights_state_sha256=weights_state_sha256(pipe),
        model_path=model_path, weights_sha256=file_hashes, resize=resize, resize_antialias=bool(resize_antialias),
        dtype=dtype, num_processes=world, index_width=index_width(num), protocol=protocol,
        departures=list(departures), visar_version=visar.__version__, torch_version=torch.__version__,
        device=str(acc.device))

    # every process reads the same state before anyone writes, so all agree on errors and on the work
    previous = None
    if (out / SIDECAR_NAME).is_file():
        previous = load_sidecar(out)
        diff = previous.differences(record)
        if diff:
            raise ValueError(f"{out} holds samples made with other settings ({'; '.join(diff)}); "
                             "use a new output folder (or delete this one) instead of mixing sample sets")
    done = finished_indices(img_dir)
    chunks = list(iter_chunks(num, batch_size))
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
    for s, e in mine:
        with amp:
            images = pipe.generate(class_ids[s:e].tolist(), seed=chunk_seed(seed, s), **options)
        if not (isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[0] == e - s
                and images.shape[1] == 3):
            raise ValueError(f"pipeline.generate must return [B, 3, H, W] in [-1, 1] with B={e - s}; got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        from visar.utils.images import to_uint8

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

