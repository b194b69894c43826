"""The ``visar`` command line: ``visar sample | convert | tokenize | train | eval | models``.

Thin: every sub-command parses arguments and calls library functions. Heavy imports happen inside
the handlers, so ``visar --help`` is fast.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("visar")


def _parse_labels(text: str | None, num_classes: int, num: int) -> list[int]:
    if text is None:
        return [i % num_classes for i in range(num)]
    ids = [int(x) for x in text.split(",") if x.strip()]
    if not ids:
        raise SystemExit("--classes needs comma-separated class ids, e.g. --classes 0,1,2")
    for i in ids:
        if not 0 <= i < num_classes:
            raise ValueError(f"class id {i} is outside [0, {num_classes}) for this model")
    return (ids * ((num + len(ids) - 1) // len(ids)))[:num]


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from visar import zoo
    from visar.utils.images import to_uint8
    from visar.utils.images import save_grid

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = zoo.load(args.model, device=args.device)
    num_classes = pipe.generator.num_classes
    if args.num is None:
        args.num = 2 * num_classes if args.classes is None else len(args.classes.split(","))
    labels = _parse_labels(args.classes, num_classes, args.num)
    options = dict(args.option)
    for name in ("cfg_scale", "temperature", "top_k", "top_p"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    if args.sampler:
        pipe.sampler = pipe.resolve_sampler(args.sampler)
    # check the option names and values before any image is drawn
    pipe.sampler.resolve(pipe.options_for(pipe.sampler, options))
    out = Path(args.out)
    chunks = []
    bar = tqdm(range(0, len(labels), args.batch_size), desc="sampling", unit="batch", disable=args.quiet)
    for i in bar:
        batch = labels[i:i + args.batch_size]
        imgs = pipe.generate(batch, seed=args.seed + i, **options)
        chunks.append(to_uint8(imgs))
    u8 = torch.cat(chunks)  # [N, H, W, 3]
    grid = out if out.suffix.lower() == ".png" else out / "grid.png"
    save_grid(u8, grid, nrow=args.nrow or min(len(labels), max(1, num_classes)))
    log.info("wrote %s (%d images, classes %s)", grid, len(labels), labels[:16])
    if args.individual:
        from PIL import Image

        folder = grid.parent / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for j, a in enumerate(u8):
            Image.fromarray(a.numpy()).save(folder / f"{j:06d}_class{labels[j]}.png")
    if args.npz:
        from visar.utils.io import atomic_write_bytes
        import io

        buf = io.BytesIO()
        np.savez(buf, arr_0=u8.numpy(), labels=np.asarray(labels))
        atomic_write_bytes(grid.parent / "samples.npz", buf.getvalue())
    print(grid)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Official tokenizer + generator files -> a visar pipeline folder (safetensors + JSON)."""
    from visar.pipeline import Pipeline

    from visar.registry import get

    converter = get("converter", args.family)
    tokenizer = converter.load_tokenizer(args.tokenizer, **dict(args.tokenizer_set))
    generator = converter.load_generator(args.generator, **dict(args.set))
    Pipeline(tokenizer, generator).save_pretrained(args.out)
    log.info("wrote %s pipeline to %s (load it with visar.load(%r) or visar sample --model %s)",
             args.family, args.out, str(args.out), args.out)
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    """Pre-tokenize a dataset into a token cache (``data.kind: token_cache`` of a generator config)."""
    import torch

    from visar.data.token_cache import build_token_cache
    from visar.tokenizers.base import Tokenizer
    from visar.train.config import DataConfig
    from visar.train.trainer import build_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data == "folder" and not args.path:
        raise ValueError("--data folder needs --path IMAGE_FOLDER (one sub-folder per class)")
    if args.data == "shapes" and args.path:
        raise ValueError("--path is for --data folder; shapes are rendered (use --cache for a memo file)")
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
            if args.pattern == "*" or args.pattern in name:
                print(name)
        return 0
    for name in zoo.list_models(args.pattern):
        print(name)
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


def build_parser() -> argparse.ArgumentParser:
    from visar.eval.cli import key_value_option  # the one KEY=VALUE (JSON value) parser of every CLI

    p = argparse.ArgumentParser(prog="visar", description="Visual autoregressive image generation")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="generate images with a bundled model or a pipeline folder; writes a PNG grid")
    s.add_argument("--model", default="shapes-llamagen", help="bundled model name or pipeline folder")
    s.add_argument("--classes", default=None, help="comma-separated class ids (default: cycle over all classes)")
    s.add_argument("--num", type=int, default=None, help="number of images (default: one per class, 2 rows)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (model default if unset)")
    s.add_argument("--temperature", type=float, default=None)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--sampler", default=None, choices=registered("sampler"),
                   help="sampler (default: the model's own, which reproduces the official sampling)")
    s.add_argument("--option", type=key_value_option, action="append", default=[], metavar="KEY=VALUE",
                   help="any sampler option, e.g. --option num_steps=50 (JSON values; see docs/architecture.md)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--nrow", type=int, default=None, help="images per grid row")
    s.add_argument("--out", default="samples", help="output folder (grid.png inside) or a .png path")
    s.add_argument("--individual", action="store_true", help="also write every image as its own PNG")
    s.add_argument("--npz", action="store_true", help="also write samples.npz (arr_0: uint8 NHWC, labels)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sample)

    c = sub.add_parser("convert", help="official checkpoints -> a visar pipeline folder")
    c.add_argument("family", choices=registered("converter"))
    c.add_argument("--tokenizer", required=True, help="official tokenizer file (VQ / VQVAE / kl16.ckpt or VAE folder)")
    c.add_argument("--generator", required=True, help="official generator file")
    c.add_argument("--set", type=key_value_option, action="append", default=[], metavar="KEY=VALUE",
                   help="generator loader override, e.g. grid_size=24 or num_heads=2 (JSON values)")
    c.add_argument("--tokenizer-set", type=key_value_option, action="append", default=[],
                   metavar="KEY=VALUE",
                   help="tokenizer loader override (JSON values)")
    c.add_argument("--out", required=True, help="output pipeline folder")
    c.set_defaults(func=cmd_convert)

    t = sub.add_parser("tokenize", help="pre-tokenize a dataset once into a token cache for generator training")
    t.add_argument("--tokenizer", required=True, help="folder holding NAME.json + NAME.safetensors")
    t.add_argument("--name", default="tokenizer", help="file stem of the tokenizer in that folder")
    t.add_argument("--data", choices=["shapes", "folder"], default="folder")
    t.add_argument("--path", default=None, help="--data folder: image folder with one sub-folder per class")
    t.add_argument("--size", type=int, default=256, help="image side (ADM centre crop for folders)")
    t.add_argument("--length", type=int, default=50_000, help="--data shapes: number of items")
    t.add_argument("--split", default="train", help="--data shapes: train | test")
    t.add_argument("--seed", type=int, default=0, help="--data shapes: dataset seed")
    t.add_argument("--cache", default=None, help="--data shapes: .npy memo of the rendered images")
    t.add_argument("--flip", action="store_true", help="also store the tokens of every mirror image")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--out", required=True, help="output folder (shards + index.json; an interrupted build resumes)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_tokenize)

    m = sub.add_parser("models", help="list presets and bundled models")
    m.add_argument("pattern", nargs="?", default="*")
    m.add_argument("--kind", default="model", choices=["model", "family", "tokenizer", "sampler", "task", "converter"],
                   help="what to list: presets and bundled models (default) or registered families, tokenizers, "
                        "samplers, training tasks or checkpoint converters")
    m.set_defaults(func=cmd_models)

    sub.add_parser("train", help="train from a YAML config on Accelerate (visar train CONFIG.yaml --help)", add_help=False)
    sub.add_parser("eval", help="sharded sampling, FID/IS/KID/PR, shapes metrics (visar eval --help)", add_help=False)
    return p


FORWARDED = {"train": "visar.train.launch", "eval": "visar.eval.cli"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if ("-v" in argv or "--verbose" in argv) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in FORWARDED:
        return _forward(FORWARDED[argv[0]], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
