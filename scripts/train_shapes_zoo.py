"""Train several shapes configs side by side on one machine within a wall-clock budget.

    python scripts/train_shapes_zoo.py --budget-s 240 configs/shapes_vq.yaml configs/var_shapes_tokenizer.yaml ...

Used to produce the shapes demo models of every family on one GPU (see docs/training.md). Steps:

1. render the shared shapes data cache once (``data.cache`` of the configs) with a process pool;
2. *probe*: run every config at once for ``--probe-steps`` steps and read each run's seconds per step
   over the second half of the probe (so start-up and warm-up do not count) under the same contention
   as the real runs;
3. *train*: run every config at once with ``train.steps = safety * budget / (s/step)`` (capped by
   ``--max-steps``), a full warmup + cosine schedule over those steps, ``train.max_minutes`` as a
   safety net. The step count used is printed: rerunning one config alone with ``train.steps=N``
   reproduces it bit for bit on the same hardware and software.

``--smoke CONFIG ...`` additionally runs generator configs for a few steps on the probe tokenizers
(their ``tokenizer.path`` ``runs/X/export`` becomes ``runs/probe/X/export``) while the real runs train,
to check a family end to end on this device before spending a real run on it. Logs of every run go to
``--log-dir``; a JSON summary of steps, s/step and exit codes to ``--log-dir/summary_<stage>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

_RATE = re.compile(r"step (\d+)/(\d+) .*\(([0-9.]+) s/step\)")


def name_of(config: str) -> str:
    return Path(config).stem


def launch(config: str, overrides: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "visar.cli", "train", config, *overrides]
    log.parent.mkdir(parents=True, exist_ok=True)
    f = open(log, "w")
    f.write(" ".join(cmd) + "\n")
    f.flush()
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_all(procs: dict[str, subprocess.Popen], deadline: float) -> dict[str, int]:
    codes = {}
    for name, p in procs.items():
        try:
            codes[name] = p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            codes[name] = -9
    return codes


def seconds_per_step(log: Path) -> float | None:
    """Seconds per step between the last two progress lines of a trainer log (their running averages)."""
    rows = [(int(m[1]), float(m[3])) for m in _RATE.finditer(log.read_text())]
    if len(rows) >= 2:
        (s1, a1), (s2, a2) = rows[-2], rows[-1]
        return (a2 * s2 - a1 * s1) / (s2 - s1)
    return rows[-1][1] if rows else None


def render_caches(configs: list[str]) -> None:
    from visar.data.shapes import ShapesDataset

    done = set()
    for c in configs:
        d = yaml.safe_load(open(c)).get("data", {})
        key = (d.get("cache"), d.get("size", 32), d.get("length"), d.get("split", "train"), d.get("seed", 0))
        if d.get("kind", "shapes") == "shapes" and d.get("cache") and key not in done:
            done.add(key)
            t = time.time()
            ShapesDataset(size=key[1], length=key[2], split=key[3], seed=key[4], cache=key[0]).pixels()
            print(f"cache {key[0]} ready in {time.time() - t:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("configs", nargs="+")
    p.add_argument("--budget-s", type=float, required=True, help="training seconds per run (after the probe)")
    p.add_argument("--probe-steps", type=int, default=100)
    p.add_argument("--safety", type=float, default=0.85)
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--smoke", nargs="*", default=[], help="generator configs to run briefly on probe tokenizers")
    p.add_argument("--smoke-steps", type=int, default=20)
    p.add_argument("--stage", default="train")
    p.add_argument("--log-dir", default="runs/logs")
    p.add_argument("--extra", nargs="*", default=[], help="overrides for every run (key=value)")
    args = p.parse_args(argv)
    logs = Path(args.log_dir)
    summary: dict = {"stage": args.stage, "runs": {}}
    t_start = time.time()
    render_caches(args.configs + args.smoke)

    common = ["train.progress=false", "train.save_every=0", *args.extra]
    probes = {}
    half = max(1, args.probe_steps // 2)
    for c in args.configs:
        n = name_of(c)
        probes[n] = launch(c, [*common, f"train.steps={args.probe_steps}", f"train.log_every={half}",
                               "train.sample_every=0", f"train.output_dir=runs/probe/{n}",
                               f"export_dir=runs/probe/{n}/export", "train.resume=never"],
                           logs / f"probe_{n}.log")
    codes = wait_all(probes, time.time() + 600)
    rates = {}
    for c in args.configs:
        n = name_of(c)
        rate = seconds_per_step(logs / f"probe_{n}.log")
        rates[n] = rate
        print(f"probe {n}: exit {codes[n]}, {rate if rate is None else round(rate * 1e3, 2)} ms/step", flush=True)

    runs, smoke = {}, {}
    for c in args.configs:
        n = name_of(c)
        if codes[n] != 0 or not rates[n]:
            summary["runs"][n] = {"probe_exit": codes[n], "skipped": True}
            continue
        steps = int(min(args.max_steps, max(args.probe_steps, args.safety * args.budget_s / rates[n])))
        summary["runs"][n] = {"probe_ms_per_step": rates[n] * 1e3, "steps": steps}
        runs[n] = launch(c, [*common, f"train.steps={steps}", f"train.log_every={max(1, steps // 20)}",
                             f"train.sample_every={steps}", f"train.max_minutes={1.25 * args.budget_s / 60:.3f}",
                             "train.resume=never"], logs / f"train_{n}.log")
        print(f"train {n}: {steps} steps", flush=True)
    for c in args.smoke:
        n = name_of(c)
        tok = yaml.safe_load(open(c)).get("tokenizer", {}).get("path", "")
        tok = re.sub(r"^runs/([^/]+)/export$", r"runs/probe/\1/export", tok)
        smoke[n] = launch(c, [*common, f"tokenizer.path={tok}", f"train.steps={args.smoke_steps}",
                              f"train.log_every={max(1, args.smoke_steps // 2)}", f"train.sample_every={args.smoke_steps}",
                              f"train.output_dir=runs/smoke/{n}", f"export_dir=runs/smoke/{n}/export",
                              "train.resume=never"], logs / f"smoke_{n}.log")
    smoke_codes = wait_all(smoke, time.time() + 1.5 * args.budget_s + 120)
    for n, code in smoke_codes.items():
        summary.setdefault("smoke", {})[n] = {"exit": code, "ms_per_step": (lambda r: r and r * 1e3)(
            seconds_per_step(logs / f"smoke_{n}.log"))}
        print(f"smoke {n}: exit {code}", flush=True)
    codes = wait_all(runs, time.time() + 1.5 * args.budget_s + 180)
    for n, code in codes.items():
        summary["runs"][n]["exit"] = code
        summary["runs"][n]["ms_per_step"] = (lambda r: r and r * 1e3)(seconds_per_step(logs / f"train_{n}.log"))
        print(f"train {n}: exit {code}", flush=True)
    summary["wall_s"] = time.time() - t_start
    (logs / f"summary_{args.stage}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1), flush=True)
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
