"""``visar eval``: sample evaluation sets, compute FID & co., score shapes models.

::

    visar eval sample MODEL --out DIR --num N --labels balanced|random [--protocol PRESET] [--sampler NAME]
                      [--cfg-scale S] [--top-k K] [--top-p P] [--temperature T] [--num-steps N]
                      [--option KEY=VALUE ...]
                      [--resize 256 | --no-resize] [--batch-size B] [--seed S] [--num-processes N] [--threads T]
    visar eval fid SAMPLES --ref REF [--inception-weights PATH] [--no-isc] [--no-kid] [--no-prc]
    visar eval shapes SAMPLES [--labels FILE|IDS] [--num-reference N]
    visar eval protocols [PATTERN]

``MODEL`` is a bundled name (``shapes-llamagen``) or a pipeline folder (``Pipeline.save_pretrained``).
``--num-processes N`` (N > 1) relaunches the command under ``accelerate launch`` (CPU: gloo), as
``visar train`` does; the workers die with the command (killing it leaves no orphan writing into the
folder). A command already started by ``accelerate launch`` / ``torchrun`` shards over its processes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

from visar.utils.cli import (HelpFormatter, Parser, add_quiet_flag, add_threads_flag, non_negative_int,
                             positive_int, run_command, set_threads)

log = logging.getLogger("visar.eval")
_ARGV_ENV = "VISAR_EVAL_ARGV"
#: this process's parent as seen at start-up (a worker ties its life to it)
_PARENT = os.getppid()


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
    p = Parser(prog="visar eval", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sample", help="sample an evaluation set (PNG folder + samples.npz + samples.json)",
                       formatter_class=HelpFormatter)
    s.add_argument("model", help="bundled model name (shapes-llamagen) or pipeline folder")
    s.add_argument("--out", required=True, help="output folder (re-running the same command resumes)")
    s.add_argument("--num", type=positive_int, help="number of images (default: the protocol's, 50000 for ImageNet)")
    s.add_argument("--labels", choices=["balanced", "random"],
                   help="class of each image: balanced (index %% classes) or random; no default: required unless "
                        "--protocol states it")
    s.add_argument("--protocol", metavar="PRESET",
                   help="apply the evaluation protocol of a preset (e.g. llamagen-gpt-xl, var-d16, mar-b); other "
                        "options override it and every departure is logged and recorded (default: none)")
    s.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale, 1 = none (default: the model's)")
    s.add_argument("--temperature", type=float, help="sampling temperature > 0 (default: the sampler's)")
    s.add_argument("--top-k", type=int, help="keep the k most likely tokens, 0 = off (default: the sampler's)")
    s.add_argument("--top-p", type=float, help="nucleus filter in (0, 1], 1 = off (default: the sampler's)")
    s.add_argument("--num-steps", type=int,
                   help="token-head denoising / ODE steps, families with a token head (default: the sampler's)")
    s.add_argument("--sampler", default=None, metavar="NAME",
                   help="sampler, one of `visar models --kind sampler`; recorded in samples.json with its options "
                        "(default: the model's own, which reproduces the official sampling)")
    s.add_argument("--option", type=key_value_option, action="append", default=[], metavar="KEY=VALUE",
                   help="any other sampling option of the sampler; value parsed as JSON, else a string; "
                        "repeatable (default: none)")
    from visar.samplers.options import MEANINGS

    s.add_argument("--compile", action="store_true",
                   help=f"sampler option compile=True: {MEANINGS['compile']}; see docs/compile.md (default: off)")
    s.add_argument("--seed", type=non_negative_int, default=0, help="seed of the set (see the seed rule in samples.json)")
    s.add_argument("--batch-size", type=positive_int, default=32,
                   help="images per generate call; part of the seed rule (keep it to resume or compare sets)")
    s.add_argument("--num-classes", type=positive_int, help="classes to draw from (default: the model's)")
    rs = s.add_mutually_exclusive_group()
    rs.add_argument("--resize", type=int, help="bicubic resize to this side before the uint8 cast, e.g. 256 "
                                               "(default: the protocol's, else none)")
    rs.add_argument("--no-resize", action="store_true", help="keep the generated size even if the protocol resizes")
    s.add_argument("--resize-antialias", action="store_true", help="antialiased bicubic (LlamaGen uses none)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="autocast dtype (float32 on CPU)")
    s.add_argument("--num-processes", type=positive_int, default=1,
                   help="processes to shard over (relaunches with accelerate launch)")
    add_threads_flag(s)
    s.add_argument("--no-npz", action="store_true", help="do not pack samples.npz")
    add_quiet_flag(s)
    s.set_defaults(func=_cmd_sample)

    f = sub.add_parser("fid", help="FID / IS / KID / precision-recall with torch-fidelity (local Inception weights)",
                       formatter_class=HelpFormatter)
    f.add_argument("samples", help="sample folder, images folder or .npz (arr_0)")
    f.add_argument("--ref", help="reference folder, .npz (arr_0) or ADM reference batch (mu/sigma); FID, KID and "
                                 "precision/recall need one (default: none, Inception Score only)")
    f.add_argument("--inception-weights", help="weights-inception-2015-12-05-6726825d.pth "
                                               "(default: $VISAR_INCEPTION_WEIGHTS)")
    for m, what in (("fid", "the Fréchet Inception distance"), ("isc", "the Inception Score"),
                    ("kid", "the kernel Inception distance"), ("prc", "precision / recall")):
        f.add_argument(f"--no-{m}", action="store_true", help=f"skip {what}")
    f.add_argument("--kid-subset-size", type=positive_int, default=None,
                   help="images per KID subset (default: 1000, torch-fidelity's, or the size of the smaller set "
                        "when it has fewer images)")
    f.add_argument("--kid-subsets", type=positive_int, default=100, help="number of KID subsets")
    f.add_argument("--isc-splits", type=positive_int, default=10, help="Inception Score splits")
    f.add_argument("--batch-size", type=positive_int, default=64, help="images per Inception forward pass")
    f.add_argument("--device", help="cpu / cuda (default: cuda when available)")
    f.add_argument("--cache-dir", help="reference statistics cache (default: $VISAR_CACHE_DIR or ~/.cache/visar)")
    f.add_argument("--no-cache", action="store_true", help="neither read nor write the reference cache")
    f.add_argument("--json", help="also write the results to this JSON file (default: stdout only)")
    add_quiet_flag(f)
    f.set_defaults(func=_cmd_fid)

    h = sub.add_parser("shapes", help="class fidelity and Fréchet classifier distance of shapes samples (offline)",
                       formatter_class=HelpFormatter)
    h.add_argument("samples", help="sample folder made by `visar eval sample`, or .npz (arr_0 images; labels from "
                                   "arr_1 or labels, as `visar sample --npz` writes them)")
    h.add_argument("--labels", metavar="FILE|IDS",
                   help="class of each sample when the samples do not carry them: a .npy / .txt / .json file of "
                        "ints or comma-separated ids")
    h.add_argument("--num-reference", type=positive_int, default=2000, help="held-out real shapes to compare with")
    h.add_argument("--classifier", help="classifier folder (default: the bundled one)")
    h.add_argument("--batch-size", type=positive_int, default=256, help="images per classifier pass")
    h.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    h.add_argument("--json", help="also write the results to this JSON file (default: stdout only)")
    h.set_defaults(func=_cmd_shapes)

    r = sub.add_parser("protocols", help="list the evaluation protocols of the presets", formatter_class=HelpFormatter)
    r.add_argument("pattern", nargs="?", default="*", help="a substring (llamagen) or a glob ('var-*') of preset names")
    r.set_defaults(func=_cmd_protocols)
    return p


def _emit(result: dict, path: str | None) -> None:
    text = json.dumps(result, indent=2, sort_keys=True)
    sys.stdout.write(text + "\n")
    if path:
        from visar.utils.io import atomic_write_bytes

        atomic_write_bytes(path, (text + "\n").encode())


def _relaunch(argv: Sequence[str], n: int) -> int:
    """Run this command again in ``n`` processes through ``accelerate launch`` (as ``visar train`` does; gloo
    on CPU). The launcher dies with this process and the workers with the launcher
    (:mod:`visar.utils.lifeline`): killing the command leaves no process writing into the folder."""
    import torch

    from visar.train.launch import launcher_command
    from visar.utils.lifeline import call_tied

    # the arguments travel in the environment: the launcher's own parser would claim abbreviations like --num
    cmd, env = launcher_command(["-m", "visar.eval.cli"], n, cuda=torch.cuda.is_available())
    env[_ARGV_ENV] = json.dumps(list(argv))
    log.info("launching %d processes: %s", n, " ".join(cmd))
    return call_tied(cmd, env)


def _cmd_sample(args, argv: Sequence[str]) -> int:
    from visar.utils.io import check_writable_dir

    check_writable_dir(args.out, "--out")
    if args.num_processes > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _relaunch(argv, args.num_processes)
    set_threads(args.threads)
    from visar.eval.sampling import sample_to_folder

    options = {k: v for k, v in (("cfg_scale", args.cfg_scale), ("temperature", args.temperature),
                                 ("top_k", args.top_k), ("top_p", args.top_p), ("num_steps", args.num_steps))
               if v is not None}
    options.update(dict(args.option))
    if args.compile:
        options["compile"] = True
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
            raise ValueError(f"the protocol of {args.protocol} does not state the label scheme: pass --labels "
                             "balanced or --labels random")
    if labels is None:
        raise ValueError("choose the label scheme explicitly: --labels balanced (equal images per class) or "
                         "--labels random (uniform class ids); or apply a --protocol")
    if num is None:
        raise ValueError("give --num (50000 for the ImageNet FID protocol) or a --protocol")
    from tqdm.contrib.logging import logging_redirect_tqdm

    logging.captureWarnings(True)  # warnings become log lines, and log lines go through the progress bars
    try:
        with logging_redirect_tqdm():
            rec = sample_to_folder(args.model, args.out, num, labels, args.num_classes, seed=args.seed,
                                   batch_size=args.batch_size, resize=resize, resize_antialias=args.resize_antialias,
                                   dtype=args.dtype, progress=not args.quiet, protocol=protocol,
                                   departures=departures, pack_npz=not args.no_npz, sampler=args.sampler, **options)
    finally:
        logging.captureWarnings(False)
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
                             cache_dir=args.cache_dir, use_cache=not args.no_cache, progress=not args.quiet)
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
        return {k: getattr(rec, k) for k in ("model_name", "num", "labels", "seed", "sampler", "options", "resize",
                                             "dtype", "departures", "weights_state_sha256")}
    return None


def _cmd_shapes(args, argv: Sequence[str]) -> int:
    from visar.eval.shapes_metrics import shapes_metrics

    clf = None
    if args.classifier:
        from visar.eval.classifier import load_classifier

        clf = load_classifier(args.classifier)
    labels = read_labels_arg(args.labels) if args.labels is not None else None
    _emit(shapes_metrics(args.samples, labels, num_reference=args.num_reference, classifier=clf,
                         batch_size=args.batch_size, device=args.device), args.json)
    return 0


def read_labels_arg(text: str) -> list[int]:
    """``--labels``: a ``.npy`` / ``.json`` / text file of ints, or comma-separated ids, as a list of ints."""
    from pathlib import Path

    import numpy as np

    p = Path(text)
    if p.is_file():
        try:
            if p.suffix == ".npy":
                values = np.load(p, allow_pickle=False).reshape(-1).tolist()
            elif p.suffix == ".json":
                values = json.loads(p.read_text())
            else:
                values = p.read_text().replace(",", " ").split()
            return [int(v) for v in values]
        except (ValueError, TypeError, OSError) as e:
            raise ValueError(f"--labels {p}: expected class ids (ints) in a .npy, .json or text file: {e}") from e
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--labels {text!r} is neither a file nor comma-separated class ids (e.g. 0,1,2)") from None


def _cmd_protocols(args, argv: Sequence[str]) -> int:
    from visar.eval.protocol import list_protocols

    _emit({name: p.to_dict() for name, p in list_protocols(args.pattern).items()}, None)  # substring or glob
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``visar eval``; ``argv`` excludes ``visar eval`` itself."""
    if argv is None:
        if _ARGV_ENV in os.environ and not sys.argv[1:]:  # a worker started by _relaunch
            from visar.utils.lifeline import die_with_parent

            die_with_parent(parent=_PARENT)  # killed with the launcher: no orphan keeps writing images
            argv = json.loads(os.environ[_ARGV_ENV])
        else:
            argv = sys.argv[1:]
    argv = list(argv)
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_command(args.func, args, argv, logger=log)  # user errors: one ERROR line, exit status 2


if __name__ == "__main__":
    sys.exit(main())
