"""``visar train CONFIG.yaml [--num-processes N] [--accelerate-config FILE] [key=value ...]``.

A recipe file (a YAML mapping with ``stages``, see :mod:`visar.train.recipe`) given instead of a config runs
its stages in order: ``visar train recipes/NAME.yaml [--out DIR] [--dry-run] [--stages a,b | --from NAME]``.

The config is read and checked here first, before any process starts: its keys, types and paths
(:mod:`visar.train.config`), then the model, the tokenizer, the data's token grid, the batch split,
the resume checkpoint and the output folders (:mod:`visar.train.preflight`, about a second, nothing
allocated). A problem is one ``ERROR`` line and exit status 2. Then:

* one process and no accelerate config: training runs in this process;
* otherwise ``accelerate launch`` starts the workers. On a machine without CUDA it uses the recipe
  that really starts N CPU processes (gloo)::

      ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N --num_machines 1 \\
          --mixed_precision no --dynamo_backend no -m visar.train.launch --worker CONFIG ...

  (``accelerate launch --cpu --num_processes N`` silently runs a single process.)
* ``--accelerate-config FILE`` passes an ``accelerate config`` file through (FSDP, DeepSpeed,
  multi-node); ``--num-processes`` still overrides its process count when given.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

log = logging.getLogger("visar.train")
#: this process's parent as seen at start-up (a worker ties its life to it)
_PARENT = os.getppid()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visar train", description="Train a tokenizer, generator or classifier "
                                "from a YAML config on Accelerate, or run a multi-stage recipe (recipes/).")
    p.add_argument("config", help="YAML config (see configs/) or recipe (a file with `stages`, see recipes/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides with dotted keys, e.g. train.steps=100 "
                   "(a recipe applies them to every training stage)")
    p.add_argument("--num-processes", type=int, default=None, help="processes (default 1; on CPU they use gloo)")
    p.add_argument("--accelerate-config", default=None,
                   help="an `accelerate config` YAML file (FSDP, DeepSpeed, multi-node), passed to accelerate launch")
    p.add_argument("--main-process-port", type=int, default=None, help="rendezvous port (default: a free one)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    r = p.add_argument_group("recipes (a file with stages)")
    r.add_argument("--out", default=None, help="run folder of the recipe (default: runs/<recipe name>)")
    r.add_argument("--dry-run", action="store_true", help="print the stages, their commands and what would be skipped")
    r.add_argument("--stages", default=None, metavar="A,B", help="run only these stages (default: all)")
    r.add_argument("--from", dest="start", default=None, metavar="NAME",
                   help="run the stages from NAME on (default: from the first)")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command(config: str, overrides: list[str], num_processes: int | None,
                       accelerate_config: str | None, port: int | None, cuda: bool) -> tuple[list[str], dict]:
    """The ``accelerate launch`` command line and environment that run the training workers."""
    return launcher_command(["-m", "visar.train.launch", "--worker", config, *overrides], num_processes,
                            accelerate_config, port, cuda)


def launcher_command(target: list[str], num_processes: int | None, accelerate_config: str | None = None,
                     port: int | None = None, cuda: bool = False) -> tuple[list[str], dict]:
    """``accelerate launch [...] TARGET`` (``TARGET``: ``["-m", module, *args]`` or a script and its
    arguments) and its environment: the recipe that really starts ``num_processes`` processes, gloo on a
    machine without CUDA (``visar train`` and ``visar eval sample`` both launch through it)."""
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        cmd += ["--config_file", accelerate_config]
        if num_processes:
            cmd += ["--num_processes", str(num_processes)]
    else:
        n = num_processes or 1
        if not cuda:
            env["ACCELERATE_USE_CPU"] = "1"
        cmd += (["--multi_gpu"] if n > 1 else []) + ["--num_processes", str(n), "--num_machines", "1",
                                                      "--mixed_precision", "no", "--dynamo_backend", "no"]
    if port or not accelerate_config or int(read_accelerate_config(accelerate_config).get("num_machines") or 1) == 1:
        cmd += ["--main_process_port", str(port or _free_port())]
    # several machines: every machine must name the same port, so the config's main_process_port (or
    # accelerate's default) applies unless --main-process-port is given
    return cmd + list(target), env


def read_accelerate_config(path: str | os.PathLike) -> dict:
    """The settings of an ``accelerate config`` file (YAML or JSON); ``{}`` if it cannot be read."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``visar train``: a user error (bad config, a model that does not fit its tokenizer,
    a batch too large for memory) is one ``ERROR`` line and exit status 2."""
    from visar.utils.cli import run_command

    args = build_parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    return run_command(_dispatch, args, logger=log)


def _dispatch(args: argparse.Namespace) -> int:
    from visar.train.recipe import is_recipe

    if not args.worker and is_recipe(args.config):
        from visar.train import recipe

        return recipe.main(args, lambda argv: run_config(build_parser().parse_intermixed_args(argv)))
    given = [f for f, v in (("--out", args.out), ("--dry-run", args.dry_run), ("--stages", args.stages),
                            ("--from", args.start)) if v]
    if given:
        from visar.train.config import ConfigError

        raise ConfigError(f"{given[0]} applies to recipes (a YAML file with stages); {args.config} is a training "
                          "config")
    return run_config(args)


def run_config(args: argparse.Namespace) -> int:
    """Check one training config and train it (in this process, or through ``accelerate launch``)."""
    from visar.train.config import ConfigError, load_config

    if args.num_processes is not None and args.num_processes < 1:
        raise ConfigError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.accelerate_config and not Path(args.accelerate_config).is_file():
        raise ConfigError(f"--accelerate-config {args.accelerate_config} not found (create one with "
                          "`accelerate config`)")
    cfg = load_config(args.config, args.overrides)
    n = args.num_processes or 1
    if args.accelerate_config and not args.worker:
        kind = str(read_accelerate_config(args.accelerate_config).get("distributed_type", "")).upper()
        if kind == "FSDP" or (kind == "DEEPSPEED" and cfg.train.fsdp.enabled):
            raise ConfigError(f"--accelerate-config {args.accelerate_config} sets distributed_type: {kind}; visar "
                              "shards the model itself (its EMA, checkpoints and export need it): use a MULTI_GPU "
                              "accelerate config and train.fsdp.enabled=true")
    if args.worker:  # the launcher checked the config before starting this process
        from visar.utils.lifeline import die_with_parent

        die_with_parent(parent=_PARENT)  # no orphan keeps training when the launcher is killed
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        _train_here(cfg, n)
        return 0
    from visar.train.preflight import preflight

    preflight(cfg, n)
    if n == 1 and not args.accelerate_config:
        log.info("export: %s", _train_here(cfg, n))
        return 0
    import torch

    cmd, env = accelerate_command(args.config, args.overrides, args.num_processes, args.accelerate_config,
                                  args.main_process_port, torch.cuda.is_available())
    log.info("launching: %s%s", "ACCELERATE_USE_CPU=1 " if env.get("ACCELERATE_USE_CPU") else "", " ".join(cmd))
    from visar.utils.lifeline import call_tied

    return call_tied(cmd, env)  # the launcher (and through it the workers) ends if this process is killed


class BatchTooLarge(ValueError):
    """Training ran out of memory: the configured batch does not fit (a user setting, not a bug)."""


def _train_here(cfg, num_processes: int) -> Path:
    """Run this process's part of training; out-of-memory becomes :class:`BatchTooLarge` with the hint."""
    from visar.train.trainer import train

    try:
        return train(cfg)
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        t = cfg.train
        micro = t.batch_size // max(1, num_processes * t.grad_accum)
        raise BatchTooLarge(
            f"out of memory while training ({type(e).__name__}: {str(e).strip()[:160]}): each process computes "
            f"{micro} rows at once (train.batch_size={t.batch_size} / ({num_processes} processes x "
            f"train.grad_accum={t.grad_accum})); lower train.batch_size, or raise train.grad_accum to keep the "
            "global batch with smaller micro-batches (train.mixed_precision=bf16 also helps on GPUs)") from e


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure (torch's ``OutOfMemoryError``, a CPU allocator error, ``MemoryError``)."""
    text = str(e)
    return (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "out of memory" in text
            or "can't allocate memory" in text or "DefaultCPUAllocator" in text)


if __name__ == "__main__":
    sys.exit(main())
