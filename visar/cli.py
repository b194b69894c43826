"""The ``visar`` command line: ``visar sample | convert | tokenize | train | eval | models``.

Thin: every sub-command parses arguments and calls library functions. Heavy imports happen inside
the handlers, so ``visar --help`` is fast. Errors in what the user gave (a bad flag value, a missing or
corrupt file, an option the sampler does not take) print one ``ERROR`` line and exit with status 2;
``-v`` adds the traceback.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from visar.utils.cli import (DEFAULT_THREADS, HelpFormatter, Parser, add_quiet_flag, add_threads_flag,  # noqa: F401
                             error_message, one_line, positive_int, run_command, set_threads)

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


def cmd_tokenize(args: argparse.Namespace) -> int:
    """Pre-tokenize a dataset into a token cache (``data.kind: token_cache`` of a generator config)."""
    from visar.utils.io import check_writable_dir
    from visar.utils.validation import check_device

    if args.data == "folder" and not args.path:
        raise ValueError("--data folder needs --path IMAGE_FOLDER (one sub-folder per class)")
    if args.data == "shapes" and args.path:
        raise ValueError("--path is for --data folder; shapes are rendered (use --cache for a memo file)")
    check_device(args.device, "--device")
    out = check_writable_dir(args.out, "--out")
    existed = out.exists()
    set_threads(args.threads)
    try:
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
    # the trainer's own builder; mirror images are added by build_token_cache (flip), not by the dataset
    dataset = build_dataset(DataConfig(kind=args.data, size=args.size, length=args.length, split=args.split,
                                       seed=args.seed, path=args.path, flip=False, cache=args.cache or ""))
    out = build_token_cache(tokenizer, dataset, args.out, batch_size=args.batch_size, flip=args.flip,
                            device=args.device, progress=not args.quiet)
    print(f"token cache of {len(dataset)} images{' (+ mirror images)' if args.flip else ''}: {out}")
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
                   help="speculative samplers: folder of the draft generator (generator.json + .safetensors, e.g. a "
                        "pipeline folder); default: none")
    s.add_argument("--k", type=int, default=None, metavar="N",
                   help="speculative samplers: draft tokens per target pass (default: the sampler's, 4)")
    s.add_argument("--option", type=key_value_option, action="append", default=[], metavar="KEY=VALUE",
                   help="any sampler option, e.g. --option num_steps=50; JSON values, repeatable, see "
                        "docs/architecture.md (default: none)")
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
    t.add_argument("--tokenizer", required=True, help="folder holding NAME.json + NAME.safetensors")
    t.add_argument("--name", default="tokenizer", help="file stem of the tokenizer in that folder")
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
    t.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    add_threads_flag(t)
    add_quiet_flag(t)
    t.set_defaults(func=cmd_tokenize)

    m = sub.add_parser("models", help="list bundled models (trained weights) and presets (random weights)",
                       formatter_class=HelpFormatter)
    m.add_argument("pattern", nargs="?", default="*",
                   help="a substring (llamagen) or a glob ('var-*') of the names to list")
    m.add_argument("--kind", default="model", choices=["model", "family", "tokenizer", "sampler", "task", "converter"],
                   help="what to list: presets and bundled models, or registered families, tokenizers, "
                        "samplers, training tasks or checkpoint converters")
    m.add_argument("--names", action="store_true", help="names only, one per line (no table)")
    m.set_defaults(func=cmd_models)

    sub.add_parser("train", help="train from a YAML config on Accelerate (visar train CONFIG.yaml --help)", add_help=False)
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
