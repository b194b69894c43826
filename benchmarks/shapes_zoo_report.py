"""Compare several shapes pipelines in one run: class fidelity, sampling speed, passes, parameters, grids.

    python benchmarks/shapes_zoo_report.py --out-dir runs/zoo_report \\
        --model llamagen=visar/assets/shapes-llamagen --model var=runs/var_shapes_generator/export \\
        --model ctf=runs/ctf_shapes/export [--samples 500] [--batch 16] [--threads 1] \\
        [--option cfg_scale=2.0] [--option var:top_k=100]

For every ``--model NAME=PATH`` (a pipeline folder or a bundled model name) it reports

* ``class_fidelity``: fraction of ``--samples`` balanced (``label = i % num_classes``), seeded samples that
  the bundled shapes classifier assigns to their class, plus the Fréchet classifier distance against
  ``--num-reference`` held-out shapes (both from :func:`visar.eval.shapes_metrics.shapes_metrics`), and the
  fidelity of each class with the confusion counts (``per_class_fidelity``, ``confusion``);
* ``images_per_s``: sampling throughput on this machine at batch ``--batch`` with ``--threads`` torch
  threads (tokens -> decoded images), after one untimed warm-up batch, over ``--speed-batches`` batches;
* ``network_passes``: calls of the first block of each of the generator's block stacks
  (``nn.ModuleList``) while sampling one batch, i.e. sequential forward passes per image (every pass
  serves the whole batch and, with CFG, its unconditional half), e.g. ``{"trunk.blocks": 64}`` for a
  8x8 next-token model or ``{"coarse.trunk.blocks": 64, "aux.layers": 1}`` for CTF;
* parameter counts of the tokenizer and the generator;
* a PNG grid ``grid_NAME.png`` in ``--out-dir`` (one row per class, ``--grid-per-class`` samples, seed 0).

Pipelines sample with their stored defaults (``pipeline.json``) unless ``--option key=value`` (all models)
or ``--option NAME:key=value`` (one model) overrides them; values are parsed as YAML. The options really
used (generator defaults, then stored defaults, then overrides) are recorded. Writes ``report.md`` and
``report.json`` into ``--out-dir`` and prints the markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from visar.eval.passes import PassCounter  # noqa: E402


def parse_models(specs: Sequence[str]) -> dict[str, str]:
    """``["name=path", ...]`` -> ``{name: path}`` (names unique, made of letters, digits, ``-``, ``_``, ``.``)."""
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--model takes NAME=PATH (a pipeline folder or bundled model name), got {spec!r}")
        if not all(c.isalnum() or c in "-_." for c in name):
            raise ValueError(f"model name {name!r} may only hold letters, digits, '-', '_' and '.' (it names files)")
        if name in models:
            raise ValueError(f"model name {name!r} is given twice; use a distinct NAME for every --model")
        models[name] = path
    if not models:
        raise ValueError("give at least one --model NAME=PATH")
    return models


def parse_options(specs: Sequence[str], names: Sequence[str]) -> tuple[dict, dict[str, dict]]:
    """``["key=value", "NAME:key=value", ...]`` -> (options for all models, {name: options}); YAML values."""
    import yaml

    common: dict[str, Any] = {}
    per_model: dict[str, dict] = {n: {} for n in names}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        if not sep or not key:
            raise ValueError(f"--option takes key=value or NAME:key=value, got {spec!r}")
        target, colon, key = key.rpartition(":")
        value = yaml.safe_load(raw) if raw else None
        if colon:
            if target not in per_model:
                raise ValueError(f"--option {spec!r} names model {target!r}, but the models are {list(names)}")
            per_model[target][key] = value
        else:
            common[key] = value
    return common, per_model


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def measure_speed(pipe, batch: int, batches: int, options: dict) -> dict:
    """Images per second of ``pipe.generate`` at ``batch`` (labels cycling over the classes) after one
    untimed warm-up batch, plus the network passes counted on the warm-up batch."""
    labels = torch.arange(batch) % pipe.generator.num_classes
    with PassCounter(pipe.generator) as counter:
        pipe.generate(labels, seed=0, **options)
    t = time.perf_counter()
    for i in range(batches):
        pipe.generate(labels, seed=1 + i, **options)
    dt = time.perf_counter() - t
    return {"images_per_s": batch * batches / dt, "seconds_per_batch": dt / batches,
            "network_passes": {k: v for k, v in counter.counts.items() if v > 0}}


def report_model(name: str, path: str, options: dict, args: argparse.Namespace, out_dir: Path, clf) -> dict:
    from visar import zoo
    from visar.eval.sampling import effective_options, generate_balanced
    from visar.eval.shapes_metrics import shapes_metrics
    from visar.utils.images import save_grid

    pipe = zoo.load(path, device=args.device)
    gen, tok = pipe.generator, pipe.tokenizer
    k = gen.num_classes
    if args.samples % k:
        raise ValueError(f"--samples {args.samples} is not a multiple of {name}'s {k} classes: the labels would "
                         "not be balanced")
    used = effective_options(pipe, {**pipe.sampling_defaults, **options})
    row: dict[str, Any] = {
        "name": name, "path": str(path), "generator": type(gen).__name__, "tokenizer": type(tok).__name__,
        "generator_params": count_params(gen), "tokenizer_params": count_params(tok),
        "stored_defaults": dict(pipe.sampling_defaults), "overrides": options, "sampling_options": used,
    }
    t = time.perf_counter()
    images, labels = generate_balanced(pipe, args.samples, args.batch, args.seed, **options)
    row["fidelity_sampling_s"] = time.perf_counter() - t
    metrics = shapes_metrics(images, labels, num_reference=args.num_reference, classifier=clf, device=args.device)
    row.update({"class_fidelity": metrics["class_fidelity"], "fcd": metrics["frechet_classifier_distance"],
                "reference_class_fidelity": metrics["reference_class_fidelity"],
                "num_samples": metrics["num_samples"], "image_size": metrics["image_size"],
                "per_class_fidelity": metrics["per_class_fidelity"], "confusion": metrics["confusion"]})
    row.update(measure_speed(pipe, args.batch, args.speed_batches, options))
    grid_labels = torch.arange(k).repeat_interleave(args.grid_per_class)
    grid = pipe.generate(grid_labels, seed=0, **options)
    row["grid"] = str(save_grid(grid.float().cpu(), out_dir / f"grid_{name}.png", nrow=args.grid_per_class))
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    def passes(r: dict) -> str:
        p = r.get("network_passes") or {}
        return " + ".join(str(v) for v in p.values()) if p else "-"

    lines = [f"Shapes models: {meta['samples']} balanced samples per model (seed {meta['seed']}), bundled classifier; "
             f"speed at batch {meta['batch']}, {meta['threads']} thread(s), device {meta['device']} "
             f"({meta['machine']}).", "",
             "| model | generator | gen params (M) | tok params (M) | passes / image | images/s | class fidelity "
             "| FCD | options |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} | | | | | | | |")
            continue
        opts = ", ".join(f"{k}={v}" for k, v in r["sampling_options"].items()
                         if k in r["overrides"] or k in r["stored_defaults"])
        lines.append(f"| {r['name']} | {r['generator']} | {r['generator_params'] / 1e6:.2f} | "
                     f"{r['tokenizer_params'] / 1e6:.2f} | {passes(r)} | {r['images_per_s']:.1f} | "
                     f"{r['class_fidelity']:.3f} | {r['fcd']:.2f} | {opts} |")
    scored = [r for r in rows if "per_class_fidelity" in r]
    if scored:
        names = list(scored[0]["per_class_fidelity"])
        lines += ["", "Class fidelity per class:", "", "| model | " + " | ".join(names) + " |",
                  "| --- |" + " ---: |" * len(names)]
        for r in scored:
            pc = r["per_class_fidelity"]
            lines.append(f"| {r['name']} | " + " | ".join(f"{pc[n]:.2f}" if n in pc else "-" for n in names) + " |")
    ref = [r["reference_class_fidelity"] for r in rows if "reference_class_fidelity" in r]
    if ref:
        lines += ["", f"Classifier accuracy on {meta['num_reference']} held-out real shapes (ceiling of class "
                      f"fidelity): {ref[0]:.3f}. Passes: sequential calls of each block stack per sampled batch "
                      "(e.g. AR steps + auxiliary pass)."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help="repeatable")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--samples", type=int, default=500, help="balanced samples per model for class fidelity")
    p.add_argument("--batch", type=int, default=16, help="sampling batch (fidelity and speed)")
    p.add_argument("--speed-batches", type=int, default=3, help="timed batches after the warm-up batch")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid-per-class", type=int, default=8)
    p.add_argument("--num-reference", type=int, default=2000, help="held-out shapes for the FCD")
    p.add_argument("--device", default="cpu")
    p.add_argument("--option", action="append", default=[], metavar="[NAME:]KEY=VALUE")
    p.add_argument("--keep-going", action="store_true", help="report a failing model as an error row")
    args = p.parse_args(argv)
    for k in ("samples", "batch", "speed_batches", "threads", "grid_per_class"):
        if getattr(args, k) < 1:
            raise SystemExit(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if args.num_reference < 2:
        raise SystemExit(f"--num-reference must be >= 2 (Fréchet distance), got {args.num_reference}")
    try:
        models = parse_models(args.model)
        common, per_model = parse_options(args.option, list(models))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    torch.set_num_threads(args.threads)
    from visar.eval.classifier import load_classifier

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clf = load_classifier(device=args.device)
    rows = []
    for name, path in models.items():
        try:
            row = report_model(name, path, {**common, **per_model[name]}, args, out_dir, clf)
        except Exception as e:  # noqa: BLE001
            if not args.keep_going:
                raise
            row = {"name": name, "path": path, "error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{k}={row[k]:.4g}" for k in ("class_fidelity", "images_per_s") if k in row)
              + (f" {row['error']}" if "error" in row else ""), file=sys.stderr)
    meta = {"samples": args.samples, "seed": args.seed, "batch": args.batch, "threads": args.threads,
            "speed_batches": args.speed_batches, "device": args.device, "num_reference": args.num_reference,
            "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
            "torch": torch.__version__}
    md = markdown(rows, meta)
    (out_dir / "report.md").write_text(md)
    report = {"meta": meta, "models": rows}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    print(md)
    return report


if __name__ == "__main__":
    main()
