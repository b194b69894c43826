"""``visar eval``: sample evaluation sets, compute FID & co., score shapes models.

::

    visar eval sample MODEL --out DIR --num N --labels balanced|random [--protocol PRESET] [--cfg-scale S]
                      [--top-k K] [--top-p P] [--temperature T] [--num-steps N] [--option KEY=VALUE ...]
                      [--resize 256 | --no-resize] [--batch-size B] [--seed S] [--num-processes N]
    visar eval fid SAMPLES --ref REF [--inception-weights PATH] [--no-isc] [--no-kid] [--no-prc]
    visar eval shapes SAMPLES [--num-reference N]
    visar eval protocols [PATTERN]

``MODEL`` is a bundled name (``shapes-llamagen``) or a pipeline folder (``Pipeline.save_pretrained``).
``--num-processes N`` (N > 1) relaunches the command under ``torchrun`` (CPU: gloo); a command
already started by ``accelerate launch`` / ``torchrun`` shards over its processes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from typing import Sequence

log = logging.getLogger("visar.eval")
_ARGV_ENV = "VISAR_EVAL_ARGV"


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def key_value_option(text: str) -> tuple[str, object]:
    """argparse ``type`` for ``KEY=VALUE`` flags (``--option``, ``visar convert --set``): ``(key, value)``
    with ``-`` in the key read as ``_`` and the value parsed as JSON when it is JSON (``20`` -> int,
    ``true`` -> bool), else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. top_k=20), got {text!r}")
    return key.strip().replace("-", "_"), _parse_value(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visar eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="sample an evaluation set (PNG folder + samples.npz + samples.json)")
    s.add_argument("model", help="bundled model name (shapes-llamagen) or pipeline folder")
    s.add_argument("--out", required=True, help="output folder (re-running the same command resumes)")
    s.add_argument("--num", type=int, help="number of images (default: the protocol's, 50000 for ImageNet)")
    s.add_argument("--labels", choices=["balanced", "random"],
                   help="class of each image: balanced (index %% classes) or random; required unless --protocol "
                        "states it")
    s.add_argument("--protocol", metavar="PRESET",
                   help="apply the evaluation protocol of a preset (e.g. llamagen-gpt-xl, var-d16, mar-b); other "
                        "options override it and every departure is logged and recorded")
    s.add_argument("--cfg-scale", type=float)
    s.add_argument("--temperature", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--num-steps", type=int)
    s.add_argument("--option", type=key_value_option, action="append", default=[], metavar="KEY=VALUE",
                   help="any other sampling option of the generator (value parsed as JSON, else a string)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=32, help="images per generate call (fixes the seeds)")
    s.add_argument("--num-classes", type=int, help="classes to draw from (default: the model's)")
    rs = s.add_mutually_exclusive_group()
    rs.add_argument("--resize", type=int, help="bicubic resize to this side before the uint8 cast (e.g. 256)")
    rs.add_argument("--no-resize", action="store_true", help="keep the generated size even if the protocol resizes")
    s.add_argument("--resize-antialias", action="store_true", help="antialiased bicubic (LlamaGen uses none)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype (float32 on CPU)")
    s.add_argument("--num-processes", type=int, default=1, help="processes to shard over (relaunches with torchrun)")
    s.add_argument("--no-npz", action="store_true", help="do not pack samples.npz")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_cmd_sample)

    f = sub.add_parser("fid", help="FID / IS / KID / precision-recall with torch-fidelity (local Inception weights)")
    f.add_argument("samples", help="sample folder, images folder or .npz (arr_0)")
    f.add_argument("--ref", help="reference folder, .npz (arr_0) or ADM reference batch (mu/sigma)")
    f.add_argument("--inception-weights", help="weights-inception-2015-12-05-6726825d.pth "
                                               "(default: $VISAR_INCEPTION_WEIGHTS)")
    for m in ("fid", "isc", "kid", "prc"):
        f.add_argument(f"--no-{m}", action="store_true")
    f.add_argument("--kid-subset-size", type=int, default=1000)
    f.add_argument("--kid-subsets", type=int, default=100)
    f.add_argument("--isc-splits", type=int, default=10)
    f.add_argument("--batch-size", type=int, default=64)
    f.add_argument("--device", help="cpu / cuda (default: cuda when available)")
    f.add_argument("--cache-dir", help="reference statistics cache (default: $VISAR_CACHE_DIR or ~/.cache/visar)")
    f.add_argument("--no-cache", action="store_true")
    f.add_argument("--json", help="also write the results to this JSON file")
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(func=_cmd_fid)

    h = sub.add_parser("shapes", help="class fidelity and Fréchet classifier distance of shapes samples (offline)")
    h.add_argument("samples", help="sample folder made by `visar eval sample` or .npz with arr_1 labels")
    h.add_argument("--num-reference", type=int, default=2000, help="held-out real shapes to compare with")
    h.add_argument("--classifier", help="classifier folder (default: the bundled one)")
    h.add_argument("--batch-size", type=int, default=256)
    h.add_argument("--device", default="cpu")
    h.add_argument("--json", help="also write the results to this JSON file")
    h.set_defaults(func=_cmd_shapes)

    r = sub.add_parser("protocols", help="list the evaluation protocols of the presets")
    r.add_argument("pattern", nargs="?", default="*")
    r.set_defaults(func=_cmd_protocols)
    return p


def _emit(result: dict, path: str | None) -> None:
    text = json.dumps(result, indent=2, sort_keys=True)
    sys.stdout.write(text + "\n")
    if path:
        from visar.utils.io import atomic_write_bytes

        atomic_write_bytes(path, (text + "\n").encode())


def _relaunch(argv: Sequence[str], n: int) -> int:
    """Run this command again under torchrun with ``n`` processes (gloo on CPU)."""
    import torch

    # the arguments travel in the environment: torchrun's own parser would claim abbreviations like --num
    env = dict(os.environ, **{_ARGV_ENV: json.dumps(list(argv))})
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "visar.eval.cli"]
    log.info("launching %d processes: %s", n, " ".join(cmd))
    return subprocess.call(cmd, env=env)


def _cmd_sample(args, argv: Sequence[str]) -> int:
    if args.num_processes < 1:
        raise SystemExit("--num-processes must be >= 1")
    if args.num_processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _relaunch(argv, args.num_processes)
    from visar.eval.sampling import sample_to_folder

    options = {k: v for k, v in (("cfg_scale", args.cfg_scale), ("temperature", args.temperature),
                                 ("top_k", args.top_k), ("top_p", args.top_p), ("num_steps", args.num_steps))
               if v is not None}
    options.update(dict(args.option))
    resize = None if args.no_resize else args.resize
    labels, num, protocol, departures = args.labels, args.num, None, []
    if args.protocol:
        from visar.eval.protocol import resolve_protocol

        proto = resolve_protocol(args.protocol, options, labels=args.labels, num_samples=args.num,
                                 resize=None if args.no_resize else (args.resize if args.resize else "protocol"))
        options, labels, num, resize = proto.options, proto.labels, proto.num_samples, proto.resize
        departures = proto.departures
        protocol = {k: v for k, v in proto.to_dict().items() if k != "departures"}
        if labels is None:
            raise SystemExit(f"the protocol of {args.protocol} does not state the label scheme: pass --labels "
                             "balanced or --labels random")
    if labels is None:
        raise SystemExit("choose the label scheme explicitly: --labels balanced (equal images per class) or "
                         "--labels random (uniform class ids); or apply a --protocol")
    if num is None:
        raise SystemExit("give --num (50000 for the ImageNet FID protocol) or a --protocol")
    rec = sample_to_folder(args.model, args.out, num, labels, args.num_classes, seed=args.seed,
                           batch_size=args.batch_size, resize=resize, resize_antialias=args.resize_antialias,
                           dtype=args.dtype, progress=not args.no_progress, protocol=protocol,
                           departures=departures, **options)
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("wrote %d images of %s to %s (%s)", rec.num, rec.model_name, args.out,
                 "npz packed" if rec.npz else "no npz")
    return 0


def _cmd_fid(args, argv: Sequence[str]) -> int:
    from visar.eval.metrics import compute_metrics

    result = compute_metrics(args.samples, args.ref, inception_weights=args.inception_weights, fid=not args.no_fid,
                             isc=not args.no_isc, kid=not args.no_kid, prc=not args.no_prc,
                             kid_subset_size=args.kid_subset_size, kid_subsets=args.kid_subsets,
                             isc_splits=args.isc_splits, batch_size=args.batch_size, device=args.device,
                             cache_dir=args.cache_dir, use_cache=not args.no_cache, progress=not args.no_progress)
    settings = _sidecar_of(args.samples)
    if settings is not None:
        result["samples_settings"] = settings
    _emit(result, args.json)
    return 0


def _sidecar_of(path: str) -> dict | None:
    from pathlib import Path

    from visar.eval.sidecar import SIDECAR_NAME, load_sidecar

    p = Path(path)
    folder = p.parent if p.suffix == ".npz" else p
    if (folder / SIDECAR_NAME).is_file():
        rec = load_sidecar(folder)
        return {k: getattr(rec, k) for k in ("model_name", "num", "labels", "seed", "options", "resize", "dtype",
                                             "departures", "weights_state_sha256")}
    return None


def _cmd_shapes(args, argv: Sequence[str]) -> int:
    from visar.eval.shapes_metrics import shapes_metrics

    clf = None
    if args.classifier:
        from visar.eval.classifier import load_classifier

        clf = load_classifier(args.classifier)
    _emit(shapes_metrics(args.samples, num_reference=args.num_reference, classifier=clf,
                         batch_size=args.batch_size, device=args.device), args.json)
    return 0


def _cmd_protocols(args, argv: Sequence[str]) -> int:
    from visar.eval.protocol import list_protocols

    _emit({name: p.to_dict() for name, p in list_protocols(args.pattern).items()}, None)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``visar eval``; ``argv`` excludes ``visar eval`` itself."""
    if argv is None:
        argv = json.loads(os.environ[_ARGV_ENV]) if _ARGV_ENV in os.environ and not sys.argv[1:] else sys.argv[1:]
    argv = list(argv)
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args, argv)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as e:  # user errors: the message says what to do
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
