"""The ``visar`` command line: ``visar sample | t2i | convert | tokenize | distill-data | train | eval | models``.

Thin: every sub-command parses arguments and calls library functions. Heavy imports happen inside
the handlers, so ``visar --help`` is fast. Errors in what the user gave (a bad flag value, a missing or
corrupt file, an option the sampler does not take) print one ``ERROR`` line and exit with status 2;
``-v`` adds the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
from pathlib import Path

from visar.utils.cli import (DEFAULT_THREADS, HelpFormatter, Parser, add_quiet_flag, add_threads_flag,  # noqa: F401
                             error_message, non_negative_int, one_line, positive_int, run_command, set_threads)

log = logging.getLogger("visar")

def parse_class_ids(text: str | None, num_classes: int, flag: str = "--classes") -> list[int] | None:
    """``"0,3,7"`` -> ``[0, 3, 7]``, each in ``[0, num_classes)``; ``None`` stays ``None``."""
    if text is None:
        return None
    ids = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            ids.append(int(part))
        except ValueError:
            raise ValueError(f"{flag}: {part!r} is not a class id; give comma-separated integers, e.g. "
                             f"{flag} 0,1,2") from None
    if not ids:
        raise ValueError(f"{flag} needs comma-separated class ids, e.g. {flag} 0,1,2 (give at least one class id)")
    for i in ids:
        if not 0 <= i < num_classes:
            raise ValueError(f"{flag}: class id {i} is outside [0, {num_classes}) for this model")
    return ids


def sampler_model_options(pipe, args: argparse.Namespace) -> dict:
    """Options that name models: ``--draft PATH`` (speculative samplers' draft generator), ``--k N``, and the
    pipeline's tokenizer as the codebook of the flow-map samplers."""
    out = {}
    if args.draft is not None:
        if "draft" not in pipe.sampler.defaults:
            raise ValueError(f"--draft is for the speculative samplers (speculative, cspd); the {pipe.sampler.name!r} "
                             "sampler takes no draft: add --sampler speculative")
        from visar.generators.base import Generator

        out["draft"] = Generator.from_pretrained(args.draft, "generator", map_location=pipe.device).eval()
    if args.k is not None:
        out["k"] = args.k
    if args.student is not None:
        if "student" not in pipe.sampler.defaults:
            raise ValueError(f"--student is for the distilled sampler; the {pipe.sampler.name!r} sampler takes no "
                             "student: add --sampler distilled")
        out["student"] = args.student
    if "codebook" in pipe.sampler.defaults and "codebook" not in pipe.sampler.options:
        out["codebook"] = pipe.tokenizer
    return out


def cmd_sample(args: argparse.Namespace) -> int:
    """Sample a grid (and optionally PNGs / an npz) under the seed rule of ``visar eval sample``
    (:data:`visar.eval.sidecar.SEED_RULE`): the same seed and settings give the same images."""
    from visar.utils.io import check_writable_dir
    from visar.utils.validation import check_device

    check_device(args.device, "--device")
    out = Path(args.out)
    grid = out if out.suffix.lower() == ".png" else out / "grid.png"
    check_writable_dir(grid.parent, "--out")  # before any image is drawn
    set_threads(args.threads)

    import torch
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from visar import zoo
    from visar.eval.sampling import chunk_starts, generate_chunk
    from visar.utils.images import save_grid, to_uint8

    pipe = zoo.load(args.model, device=args.device)
    if pipe.text_conditional:
        raise ValueError(f"{args.model} is a text-to-image model: draw from it with "
                         f"visar t2i \"PROMPT\" --model {args.model}")
    num_classes = pipe.generator.num_classes
    ids = parse_class_ids(args.classes, num_classes)
    if args.num is None:
        args.num = 2 * num_classes if ids is None else len(ids)
    cycle = list(range(num_classes)) if ids is None else ids  # image i has class cycle[i % len(cycle)]

    def labels_of(a: int, b: int) -> list[int]:
        return [cycle[i % len(cycle)] for i in range(a, b)]

    labels = labels_of(0, args.num)
    options = dict(args.option)
    for name in ("cfg_scale", "temperature", "top_k", "top_p"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    if args.compile:
        options["compile"] = True
    if args.sampler:
        pipe.sampler = pipe.resolve_sampler(args.sampler)
    options.update(sampler_model_options(pipe, args))
    # check the option names and values before any image is drawn
    pipe.sampler.resolve(pipe.options_for(pipe.sampler, options))
    chunks = []
    with logging_redirect_tqdm(), tqdm(total=args.num, desc="sampling", unit="img", disable=args.quiet) as bar:
        for s in chunk_starts(range(args.num), args.batch_size):
            n = min(args.batch_size, args.num - s)
            imgs = generate_chunk(pipe, labels_of, s, seed=args.seed, chunk_size=args.batch_size,
                                  progress=not args.quiet, **options)[:n]
            chunks.append(to_uint8(imgs))
            bar.update(n)
    u8 = torch.cat(chunks)  # [N, H, W, 3]
    save_grid(u8, grid, nrow=args.nrow or min(len(labels), max(1, num_classes)))
    log.info("wrote %s (%d images, classes %s)", grid, len(labels), labels[:16])
    if args.individual:
        from visar.eval.io import write_png

        folder = grid.parent / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for j, a in enumerate(u8):
            write_png(folder / f"{j:06d}_class{labels[j]}.png", a.numpy())
    if args.npz:
        import numpy as np

        from visar.eval.io import write_npz_streaming

        write_npz_streaming(grid.parent / "samples.npz", (a.numpy() for a in u8), tuple(u8.shape),
                            labels=np.asarray(labels))
    print(grid)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Official tokenizer + generator files -> a visar pipeline folder (safetensors + JSON)."""
    from visar.pipeline import Pipeline

    from visar.registry import get

    converter = get("converter", args.family)
    try:
        tokenizer = converter.load_tokenizer(args.tokenizer, **dict(args.tokenizer_set))
        generator = converter.load_generator(args.generator, **dict(args.set))
    except (ValueError, TypeError) as e:
        message = one_line(error_message(e))
        if re.search(r"\bpass \w+=|\w+=\.\.\.|overrides", message):  # the loaders speak of Python arguments
            message += (" (on the command line: --set KEY=VALUE for the generator's loader, --tokenizer-set "
                        "KEY=VALUE for the tokenizer's)")
        raise (TypeError if isinstance(e, TypeError) else ValueError)(message) from e
    Pipeline(tokenizer, generator).save_pretrained(args.out)
    log.info("wrote %s pipeline to %s (load it with visar.load(%r) or visar sample --model %s)",
             args.family, args.out, str(args.out), args.out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A training checkpoint -> the run's export (a Pipeline folder for generators)."""
    from visar.train.export_checkpoint import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, weights=args.weights)
    log.info("wrote %s (load it with visar.load(%r) for a generator)", out, str(out))
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    """Pre-tokenize a dataset into a token cache (``data.kind: token_cache`` of a generator config)."""
    from visar.utils.io import check_writable_dir
    from visar.utils.validation import check_device

    if args.data == "folder" and not args.path:
        raise ValueError("--data folder needs --path IMAGE_FOLDER (one sub-folder per class)")
    if args.data == "shapes" and args.path:
        raise ValueError("--path is for --data folder; shapes are rendered (use --cache for a memo file)")
    if args.text_encoder and args.flip:
        raise ValueError("--flip cannot be combined with --text-encoder: a caption naming a side would describe the "
                         "mirror image wrongly")
    if args.text_max_length is not None and not args.text_encoder:
        raise ValueError("--text-max-length goes with --text-encoder")
    check_device(args.device, "--device")
    out = check_writable_dir(args.out, "--out")
    existed = out.exists()
    set_threads(args.threads)
    try:
        with warnings_as_log():  # e.g. captions truncated by the text encoder
            return _tokenize(args)
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an early error leaves no empty output folder behind
        raise


def _tokenize(args: argparse.Namespace) -> int:
    from visar.data.token_cache import build_token_cache
    from visar.tokenizers.base import Tokenizer
    from visar.train.config import DataConfig
    from visar.train.trainer import build_dataset

    tokenizer = Tokenizer.from_pretrained(args.tokenizer, args.name).to(args.device).eval()
    text_encoder = None
    if args.text_encoder:  # before the images: a missing extra or T5 folder fails at once
        from visar.text import text_encoder as make_text_encoder

        kwargs = {} if args.text_max_length is None else {"max_length": args.text_max_length}
        text_encoder = make_text_encoder(args.text_encoder, **kwargs)
    # the trainer's own builder; mirror images are added by build_token_cache (flip), not by the dataset
    dataset = build_dataset(DataConfig(kind=args.data, size=args.size, length=args.length, split=args.split,
                                       seed=args.seed, path=args.path, flip=False, cache=args.cache or ""))
    if args.exclude_caption:
        from visar.data.token_cache import CaptionSubset

        dataset = CaptionSubset(dataset, args.exclude_caption)
        log.info("left out %d items whose caption names %s", dataset.num_excluded, args.exclude_caption)
    out = build_token_cache(tokenizer, dataset, args.out, batch_size=args.batch_size, flip=args.flip,
                            device=args.device, progress=not args.quiet, text_encoder=text_encoder)
    what = f" and the features of their captions ({text_encoder.kind})" if text_encoder is not None else ""
    print(f"token cache of {len(dataset)} images{' (+ mirror images)' if args.flip else ''}{what}: {out}")
    return 0


def cmd_distill_data(args: argparse.Namespace) -> int:
    """(noise, teacher tokens) pairs for Distilled Decoding (``task: distill``), made with the teacher flow map."""
    from visar.utils.io import check_writable_dir

    check_writable_dir(args.out, "--out")
    from visar.train.distill_data import launch

    options = dict(args.option)
    for name in ("cfg_scale", "temperature", "top_k", "top_p", "num_flow_steps"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    if args.num_processes > 1:  # the workers would each fail with a traceback (one process checks before writing)
        _check_distill_teacher(args.teacher, options)
    manifest = launch(num_processes=args.num_processes, threads=args.threads, teacher=args.teacher,
                      out_dir=args.out, num=args.num, seed=args.seed, shard_size=args.shard_size,
                      batch_size=args.batch_size, labels=args.labels, progress=not args.quiet, **options)
    print(f"{manifest['settings']['num']} teacher pairs in {manifest['num_shards']} shards: {args.out}")
    return 0


def _check_distill_teacher(teacher: str, options: dict) -> None:
    """What ``make_distill_data`` checks before it writes (the teacher, its kind and the teacher-map options), on
    the CPU in this process, so a refused ``--num-processes N`` command is one error and starts no process."""
    from visar import zoo
    from visar.samplers.flow_map import codebook_of
    from visar.train.distill_data import teacher_options, teacher_sampler

    pipe = zoo.load(teacher, device="cpu")
    sampler = teacher_sampler(pipe.generator)
    if getattr(pipe.generator, "text_conditional", False) or not getattr(pipe.generator, "num_classes", 0):
        raise ValueError(f"distill-data needs a class-conditional teacher; {teacher} is not")
    teacher_options(pipe, sampler, codebook_of(pipe.tokenizer).float(), options)


#: the bundled text-to-image model (``visar/assets/<name>``), used when ``visar t2i`` gets no ``--model``
T2I_MODEL = "shapes-llamagen-t2i"
T2I_SEED_RULE = ("t2i v1: the image of prompt line i (0-based) is row i - s of the chunk s = (i // batch_size) * "
                 "batch_size, drawn by one Pipeline.generate(prompts of lines s .. s + batch_size - 1, blank or "
                 "missing lines as \"\", seed=int.from_bytes(sha256(f'visar-sample:{seed}:{s}')[:8], 'little') >> 1) "
                 "call; with batch_size 1, image_seed alone reproduces the image")
#: record fields that do not decide the image (a resume ignores them; the weights' hashes identify the model)
_T2I_NOT_IDENTITY = ("visar", "model")


@contextlib.contextmanager
def warnings_as_log():
    """Inside: Python warnings (e.g. a text encoder truncating a prompt) are ``WARNING`` log lines."""
    import warnings

    old = warnings.showwarning
    warnings.showwarning = lambda message, *args, **kwargs: log.warning("%s", message)
    try:
        yield
    finally:
        warnings.showwarning = old


def load_t2i_pipeline(model: str | None, device: str):
    """The text-to-image pipeline ``--model`` names (default: the bundled one, when visar ships it)."""
    from visar import zoo

    name = model or T2I_MODEL
    if name not in zoo.BUNDLED and name == T2I_MODEL:
        folder = zoo.ASSETS / T2I_MODEL
        if not (folder / "pipeline.json").is_file():
            raise FileNotFoundError(f"no text-to-image model is bundled with this visar yet ({T2I_MODEL}): give "
                                    "--model PIPELINE_DIR, a text-to-image pipeline folder such as the export of "
                                    "`visar train configs/shapes_t2i.yaml` (docs/text_to_image.md)")
        name = str(folder)
    pipe = zoo.load(name, device=device)
    if not pipe.text_conditional:
        raise ValueError(f"{model} is a class-conditional model ({pipe.generator.num_classes} classes); visar t2i "
                         "needs a text-to-image pipeline (use `visar sample --classes ...` for this one)")
    if pipe.text_encoder is None:
        raise ValueError(f"{model} has a text-conditional generator but no text encoder saved with it; save the "
                         "pipeline with Pipeline(tokenizer, generator, text_encoder=...)")
    return pipe


def read_prompt_lines(path: str) -> list[tuple[int, str]]:
    """``(line index from 0, prompt)`` of every non-blank line of a UTF-8 file (surrounding spaces stripped)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--prompts {p} not found: give a text file with one prompt per line")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts {p} is not UTF-8 text ({e}); save it as UTF-8") from e
    entries = [(i, line.strip()) for i, line in enumerate(lines) if line.strip()]
    if not entries:
        raise ValueError(f"--prompts {p} holds no prompt (one per line; blank lines are skipped)")
    return entries


def cmd_t2i(args: argparse.Namespace) -> int:
    """Images from prompts: one PNG and one JSON record (prompt, seeds, options) per prompt; resumable."""
    import json

    from visar.utils.io import atomic_write_bytes, check_writable_dir
    from visar.utils.validation import check_device

    if (args.prompt is None) == (args.prompts is None):
        raise ValueError("give one prompt (visar t2i \"a red circle\") or --prompts FILE (one prompt per line), not "
                         "both")
    out = Path(args.out or ("t2i.png" if args.prompts is None else "t2i"))
    single = args.prompts is None and out.suffix.lower() == ".png"
    if args.prompts is not None and out.suffix.lower() == ".png":
        raise ValueError("--out is a folder with --prompts (one PNG per line is written into it)")
    entries = [(0, args.prompt)] if args.prompts is None else read_prompt_lines(args.prompts)
    check_device(args.device, "--device")
    check_writable_dir(out.parent if single else out, "--out")
    set_threads(args.threads)

    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from visar import __version__
    from visar.eval.io import write_png
    from visar.eval.sampling import chunk_seed, chunk_starts, effective_options, weights_state_sha256
    from visar.utils.images import to_uint8

    pipe = load_t2i_pipeline(args.model, args.device)
    options = dict(args.option)
    for name in ("cfg_scale", "temperature", "top_k", "top_p"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.compile:
        options["compile"] = True
    used = effective_options(pipe, options)  # validated before anything is drawn or written
    width = max(5, len(str(entries[-1][0] + 1)))

    def paths(line: int) -> tuple[Path, Path]:
        png = out if single else out / f"{line + 1:0{width}d}.png"
        return png, png.with_suffix(".json")

    B = args.batch_size
    common = {"format": "visar-t2i", "version": 1, "seed": args.seed, "batch_size": B, "seed_rule": T2I_SEED_RULE,
              "options": used, "sampler": pipe.sampler.name, "model": args.model or T2I_MODEL,
              "weights_sha256": weights_state_sha256(pipe), "text_encoder": pipe.text_encoder.describe(),
              "text_encoder_sha256": pipe.text_encoder.fingerprint(), "visar": __version__}

    def record(line: int, prompt: str) -> dict:
        s = (line // B) * B
        return {**common, "prompt": prompt, "line": line + 1, "row": line - s, "image_seed": chunk_seed(args.seed, s)}

    def identity(r: dict) -> dict:
        return {k: v for k, v in r.items() if k not in _T2I_NOT_IDENTITY}

    pending = []
    for line, prompt in entries:
        png, rec = paths(line)
        if rec.is_file():
            try:
                old = json.loads(rec.read_text(encoding="utf-8"))
            except ValueError:
                old = None
            if not isinstance(old, dict) or identity(old) != identity(record(line, prompt)):
                raise ValueError(f"{rec} records an image made with other settings (prompt, seed, options, batch size "
                                 "or model); use another --out or delete the old images")
            if png.is_file():
                continue
        pending.append(line)
    prompts, todo = dict(entries), set(pending)
    if not single:
        out.mkdir(parents=True, exist_ok=True)
    # a truncated prompt or an unknown character: one WARNING line each
    with warnings_as_log(), logging_redirect_tqdm(), tqdm(total=len(entries), initial=len(entries) - len(pending),
                                                          desc="t2i", unit="img", disable=args.quiet) as bar:
        for s in chunk_starts(pending, B):
            rows = [prompts.get(j, "") for j in range(s, s + B)]
            images = to_uint8(pipe.generate(prompts=rows, seed=chunk_seed(args.seed, s), **options))
            for j in range(s, s + B):
                if j in todo:
                    png, rec = paths(j)
                    write_png(png, images[j - s].numpy())
                    atomic_write_bytes(rec, json.dumps(record(j, prompts[j]), indent=1, ensure_ascii=False).encode())
                    bar.update(1)
    log.info("%d image(s) written, %d already there", len(pending), len(entries) - len(pending))
    print(out)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from visar import zoo

    if args.kind != "model":
        from visar.registry import names

        for name in names(args.kind):
            if zoo.matches(name, args.pattern):
                print(name)
        return 0
    found = zoo.list_models(args.pattern)
    if args.names:
        for name in found:
            print(name)
        return 0
    if not found:
        log.error("no model matches %r (a substring such as llamagen, or a glob such as 'var-*'); "
                  "`visar models` lists all", args.pattern)
        return 2
    rows = [zoo.describe(n) for n in found]
    print(f"{'NAME':22} {'WEIGHTS':8} {'KIND':10} {'FAMILY':18} PARAMS")
    for r in rows:
        print(f"{r['name']:22} {r['weights']:8} {r['kind']:10} {r['family']:18} {zoo.format_params(r['params'])}")
    if any(r["weights"] == "random" for r in rows):
        print("(trained: weights shipped with visar, `visar sample --model NAME`; random: a preset configuration, "
              "visar.zoo.create(NAME) builds it with random weights; official weights: `visar convert`)")
    return 0


def _forward(module: str, argv: list[str]) -> int:
    import importlib

    return int(importlib.import_module(module).main(argv) or 0)


class registered:
    """argparse ``choices`` read from the registry when first needed (so ``visar --help`` imports no torch):
    the CLI's choices come from where things are defined, never from a second list."""

    def __init__(self, kind: str):
        self.kind = kind

    def _names(self) -> list[str]:
        from visar.registry import names

        return names(self.kind)

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import visar

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"visar {visar.__version__} (torch {torch_version}, python {sys.version.split()[0]})"


def compile_help() -> str:
    """Help text of ``--compile`` (the sampler option's meaning, :data:`visar.samplers.options.MEANINGS`)."""
    from visar.samplers.options import MEANINGS

    return f"sampler option compile=True: {MEANINGS['compile']}; see docs/compile.md (default: off)"


def build_parser() -> argparse.ArgumentParser:
    from visar.eval.cli import key_value_option  # the one KEY=VALUE (JSON value) parser of every CLI

    p = Parser(prog="visar", description="Visual autoregressive image generation")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (and tracebacks of errors)")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="generate images with a bundled model or a pipeline folder; writes a PNG grid",
                       formatter_class=HelpFormatter)
    s.add_argument("--model", default="shapes-llamagen", help="bundled model name or pipeline folder")
    s.add_argument("--classes", default=None,
                   help="comma-separated class ids, repeated to --num images (default: cycle over all classes)")
    s.add_argument("--num", type=positive_int, default=None,
                   help="number of images (default: two per class, or one per --classes entry)")
    s.add_argument("--seed", type=int, default=0,
                   help="seed of the run; image i's noise follows the seed rule of `visar eval sample` "
                        "(docs/evaluation.md), so the same seed gives the same images in both commands")
    s.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance scale, 1 = none (default: the model's stored default)")
    s.add_argument("--temperature", type=float, default=None, help="sampling temperature > 0 (default: the sampler's)")
    s.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens, 0 = off (default: the sampler's)")
    s.add_argument("--top-p", type=float, default=None, help="nucleus filter in (0, 1], 1 = off (default: the sampler's)")
    s.add_argument("--sampler", default=None, choices=registered("sampler"), metavar="NAME",
                   help="sampler, one of `visar models --kind sampler` (default: the model's own, which reproduces "
                        "the official sampling)")
    s.add_argument("--draft", default=None, metavar="PATH",
                   help="speculative samplers: the draft generator: a pipeline folder (its generator/ component "
                        "folder, or the flat generator.json + generator.safetensors of older folders) or a "
                        "generator's own component folder (config.json + model.safetensors); default: none")
    s.add_argument("--student", default=None, metavar="PATH",
                   help="distilled sampler: the distilled student: the export folder of a task: distill run "
                        "(distill.json + distill.safetensors), a pipeline folder whose generator is the student, or "
                        "the student's component folder (config.json + model.safetensors); default: none")
    s.add_argument("--k", type=int, default=None, metavar="N",
                   help="speculative samplers: draft tokens per target pass (default: the sampler's, 4)")
    s.add_argument("--option", type=key_value_option, action="append", default=[], metavar="KEY=VALUE",
                   help="any sampler option, e.g. --option num_steps=50; JSON values, repeatable, see "
                        "docs/architecture.md (default: none)")
    s.add_argument("--compile", action="store_true", help=compile_help())
    s.add_argument("--batch-size", type=positive_int, default=32,
                   help="images per generate call; part of the seed rule (the same images need the same value)")
    s.add_argument("--nrow", type=positive_int, default=None, help="images per grid row (default: one per class)")
    s.add_argument("--out", default="samples", help="output folder (grid.png inside) or a .png path")
    s.add_argument("--individual", action="store_true", help="also write every image as its own PNG")
    s.add_argument("--npz", action="store_true",
                   help="also write samples.npz (arr_0: uint8 [N, H, W, 3] images, arr_1: class ids), "
                        "which `visar eval shapes` and `visar eval fid` read")
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    add_threads_flag(s)
    add_quiet_flag(s)
    s.set_defaults(func=cmd_sample)

    c = sub.add_parser("convert", help="official checkpoints -> a visar pipeline folder", formatter_class=HelpFormatter)
    c.add_argument("family", choices=registered("converter"), metavar="FAMILY",
                   help="checkpoint family, one of `visar models --kind converter`")
    c.add_argument("--tokenizer", required=True, help="official tokenizer file (VQ / VQVAE / kl16.ckpt or VAE folder)")
    c.add_argument("--generator", required=True, help="official generator file")
    c.add_argument("--set", type=key_value_option, action="append", default=[], metavar="KEY=VALUE",
                   help="generator loader override, e.g. grid_size=24 or num_heads=2 (JSON values)")
    c.add_argument("--tokenizer-set", type=key_value_option, action="append", default=[],
                   metavar="KEY=VALUE",
                   help="tokenizer loader override (JSON values)")
    c.add_argument("--out", required=True, help="output pipeline folder")
    c.set_defaults(func=cmd_convert)

    t = sub.add_parser("tokenize", help="pre-tokenize a dataset once into a token cache for generator training",
                       formatter_class=HelpFormatter)
    t.add_argument("--tokenizer", required=True,
                   help="the tokenizer: a tokenizer export (flat NAME.json + NAME.safetensors), a pipeline folder "
                        "(its NAME/ component folder: config.json + weights) or a tokenizer's component folder "
                        "itself")
    t.add_argument("--name", default="tokenizer",
                   help="the tokenizer in that folder: the file stem of the flat files or the component folder's "
                        "name")
    t.add_argument("--data", choices=["shapes", "folder"], default="folder", help="what to tokenize")
    t.add_argument("--path", default=None,
                   help="--data folder: image folder with one sub-folder per class (no default: required there)")
    t.add_argument("--size", type=positive_int, default=256, help="image side (ADM centre crop for folders)")
    t.add_argument("--length", type=positive_int, default=50_000, help="--data shapes: number of items")
    t.add_argument("--split", default="train", help="--data shapes: train | test")
    t.add_argument("--seed", type=int, default=0, help="--data shapes: dataset seed")
    t.add_argument("--cache", default=None,
                   help="--data shapes: .npy memo of the rendered images (default: none, render each time)")
    t.add_argument("--flip", action="store_true", help="also store the tokens of every mirror image")
    t.add_argument("--batch-size", type=positive_int, default=64, help="images per encode call")
    t.add_argument("--out", required=True, help="output folder (shards + index.json; an interrupted build resumes)")
    t.add_argument("--text-encoder", default=None, metavar="SPEC",
                   help="also store caption features for text-to-image training: minilm, t5:PATH (a local T5 "
                        "folder) or a saved text encoder folder; needs a captioned dataset (--data shapes) and "
                        "pip install \"visar[t2i]\" for minilm/t5 (default: none, class labels only)")
    t.add_argument("--text-max-length", type=positive_int, default=None,
                   help="tokens per caption, special tokens included (default: the encoder's, minilm 32, t5 120)")
    t.add_argument("--exclude-caption", action="append", default=[], metavar="PHRASE",
                   help="leave out the items whose caption holds PHRASE as whole words, e.g. 'red star' "
                        "(held-out attribute combinations); repeatable (default: none)")
    t.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    add_threads_flag(t)
    add_quiet_flag(t)
    t.set_defaults(func=cmd_tokenize)

    d = sub.add_parser("distill-data", help="(noise, teacher tokens) pairs for Distilled Decoding students "
                       "(task: distill), made with the teacher flow map", formatter_class=HelpFormatter)
    d.add_argument("--teacher", required=True,
                   help="class-conditional next-token (LlamaGen) or next-scale (VAR) pipeline: bundled name or "
                        "pipeline folder")
    d.add_argument("--num", type=positive_int, required=True, help="number of pairs")
    d.add_argument("--out", required=True,
                   help="output folder (manifest.json + shards; re-running the same command resumes)")
    d.add_argument("--cfg-scale", type=float, default=None,
                   help="teacher guidance scale, 1 = none (default: the pipeline's stored default)")
    d.add_argument("--temperature", type=float, default=None,
                   help="teacher temperature > 0, next-token teachers only (default: 1)")
    d.add_argument("--top-k", type=int, default=None, help="teacher top-k, 0 = off (default: 0)")
    d.add_argument("--top-p", type=float, default=None, help="teacher top-p in (0, 1], 1 = off (default: 1)")
    d.add_argument("--num-flow-steps", type=positive_int, default=None,
                   help="Heun steps of the teacher map (default: 16, part of the teacher's definition)")
    d.add_argument("--option", type=key_value_option, action="append", default=[], metavar="KEY=VALUE",
                   help="another teacher-map option (solver; next-token: cfg_interval); JSON values, repeatable "
                        "(default: none)")
    d.add_argument("--labels", choices=["balanced", "random"], default="balanced",
                   help="class of pair i: i %% num_classes (balanced) or a hash of (seed, i) (random)")
    d.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the set: pair i's noise and label depend on (seed, i) only")
    d.add_argument("--shard-size", type=positive_int, default=1024, help="pairs per shard file")
    d.add_argument("--batch-size", type=positive_int, default=64, help="pairs per teacher call (speed only)")
    d.add_argument("--num-processes", type=positive_int, default=1,
                   help="processes to shard over (Accelerate; on CPU they use gloo)")
    add_threads_flag(d)
    add_quiet_flag(d)
    d.set_defaults(func=cmd_distill_data)

    g = sub.add_parser("t2i", help="text-to-image: PNGs from prompts with a text-to-image pipeline (one JSON record "
                       "per image, resumable)", formatter_class=HelpFormatter)
    g.add_argument("prompt", nargs="?", default=None, help="one prompt, e.g. \"a large red circle on a dark blue "
                   "background\" (or give --prompts)")
    g.add_argument("--prompts", default=None, metavar="FILE",
                   help="UTF-8 text file, one prompt per line (blank lines skipped); image N.png is line N "
                        "(default: none)")
    g.add_argument("--model", default=None,
                   help=f"text-to-image pipeline folder or bundled name (default: {T2I_MODEL}, once visar ships it)")
    g.add_argument("--out", default=None,
                   help="one prompt: a .png path (its record beside it as .json) or a folder; --prompts: a folder "
                        "(default: t2i.png / t2i)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the run; the image of line i depends on the seed, i, its prompt and --batch-size")
    g.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance scale, 1 = none (default: the model's stored default)")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature > 0 (default: the sampler's)")
    g.add_argument("--top-k", type=int, default=None,
                   help="keep the k most likely tokens, 0 = off (default: the sampler's)")
    g.add_argument("--top-p", type=float, default=None,
                   help="nucleus filter in (0, 1], 1 = off (default: the sampler's)")
    g.add_argument("--option", type=key_value_option, action="append", default=[], metavar="KEY=VALUE",
                   help="any sampler option; JSON values, repeatable (default: none)")
    g.add_argument("--compile", action="store_true", help=compile_help())
    g.add_argument("--batch-size", type=positive_int, default=1,
                   help="prompts per generate call (speed); part of the seed rule, so a resumed run must keep it")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    add_threads_flag(g)
    add_quiet_flag(g)
    g.set_defaults(func=cmd_t2i)

    e = sub.add_parser("export", help="a training checkpoint (a run in progress or a kept step) -> the run's export: "
                       "a pipeline folder for a generator", formatter_class=HelpFormatter)
    e.add_argument("checkpoint", help="a run's train.output_dir (its newest complete checkpoint) or one of its "
                   "checkpoints/step_* folders")
    e.add_argument("--out", required=True, help="folder to write (not inside the checkpoint)")
    e.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="EMA weights (what the run exports) or the raw trained weights (default: ema)")
    e.set_defaults(func=cmd_export)

    m = sub.add_parser("models", help="list bundled models (trained weights) and presets (random weights)",
                       formatter_class=HelpFormatter)
    m.add_argument("pattern", nargs="?", default="*",
                   help="a substring (llamagen) or a glob ('var-*') of the names to list")
    m.add_argument("--kind", default="model",
                   choices=["model", "family", "tokenizer", "sampler", "task", "converter", "text_encoder"],
                   help="what to list: presets and bundled models, or registered families, tokenizers, "
                        "samplers, training tasks, checkpoint converters or text encoders")
    m.add_argument("--names", action="store_true", help="names only, one per line (no table)")
    m.set_defaults(func=cmd_models)

    sub.add_parser("train", help="train from a YAML config on Accelerate, or run a multi-stage recipe (recipes/*.yaml) "
                   "(visar train CONFIG.yaml --help)", add_help=False)
    sub.add_parser("eval", help="sharded sampling, FID/IS/KID/PR, shapes metrics (visar eval --help)", add_help=False)
    return p


FORWARDED = {"train": "visar.train.launch", "eval": "visar.eval.cli"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in FORWARDED:
        return _forward(FORWARDED[argv[0]], argv[1:])
    args = build_parser().parse_args(argv)
    return run_command(args.func, args, verbose=verbose)


if __name__ == "__main__":
    sys.exit(main())
