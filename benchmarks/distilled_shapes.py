"""Distilled Decoding on shapes: teacher vs two-step vs one-step student (class fidelity, FCD, speed, grids).

    python benchmarks/distilled_shapes.py --teacher shapes-llamagen \\
        --student one=runs/shapes_distill_one/export --student two=runs/shapes_distill_two/export:2 \\
        --samples 5000 --out-dir runs/distill_report [--speed-batches 1 64] [--repeats 5] [--threads 1]

``--teacher`` is a pipeline folder or bundled name (a class-conditional next-token or VAR model); it samples
with its own sampler and stored defaults (e.g. ``cfg_scale`` 2.5), the law its students were distilled from.
Every ``--student NAME=FOLDER[:STEPS]`` (``STEPS`` 1 or 2, default 1) is a student export
(``distill.json`` + ``distill.safetensors``) drawn with :class:`visar.samplers.distilled.DistilledSampler`
through the teacher's tokenizer. For every row it reports

* ``class_fidelity`` and ``fcd``: ``--samples`` balanced (``label = i % num_classes``) seeded samples scored by
  the bundled shapes classifier, FCD against ``--num-reference`` held-out shapes
  (:func:`visar.eval.shapes_metrics.shapes_metrics`, the measure of the bundled model);
* ``seconds_per_image``: for each batch in ``--speed-batches``, wall and process CPU seconds per image of
  ``pipe.generate`` (tokens -> decoded images), median over ``--repeats`` timed batches after one warm-up;
* ``network_passes``: sequential calls of the first block of each block stack per sampled batch
  (:class:`visar.eval.passes.PassCounter`; the teacher's AR steps, 1 or 2 for a student);
* a PNG grid per row (one row per class, ``--grid-per-class`` samples, seed 0) and ``grids.png``, all rows
  side by side under their names.

Writes ``report.json`` and ``report.md`` into ``--out-dir`` and prints the markdown table. Training cost is not
measured here (see docs/distillation.md for the commands and their times).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from visar.eval.passes import PassCounter  # noqa: E402
from visar.utils.images import combine_grids  # noqa: E402


def parse_students(specs: Sequence[str]) -> list[tuple[str, str, int]]:
    """``["name=folder[:steps]", ...]`` -> ``[(name, folder, steps)]`` (names unique, steps 1 or 2)."""
    rows: list[tuple[str, str, int]] = []
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"--student takes NAME=FOLDER[:STEPS], got {spec!r}")
        if not all(c.isalnum() or c in "-_." for c in name) or name == "teacher":
            raise ValueError(f"student name {name!r} may only hold letters, digits, '-', '_' and '.' and may not be "
                             "'teacher' (it names files)")
        folder, steps = rest, 1
        head, colon, tail = rest.rpartition(":")
        if colon and tail.isdigit():
            folder, steps = head, int(tail)
        if steps not in (1, 2):
            raise ValueError(f"--student {spec!r}: STEPS must be 1 or 2, got {steps}")
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--student {spec!r}: no folder {folder!r} (a student export holds "
                                    "distill.json and distill.safetensors)")
        if any(name == r[0] for r in rows):
            raise ValueError(f"student name {name!r} is given twice")
        rows.append((name, folder, steps))
    return rows


def seconds_per_image(generate, num_classes: int, batch: int, repeats: int) -> dict:
    """Median wall and process-CPU seconds per image of ``generate(labels, seed)`` at ``batch``."""
    labels = torch.arange(batch) % num_classes
    generate(labels, 0)
    wall, cpu = [], []
    for i in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        generate(labels, 1 + i)
        wall.append((time.perf_counter() - w) / batch)
        cpu.append((time.process_time() - c) / batch)
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu)}


def report_row(name: str, pipe, options: dict, model: nn.Module, args: argparse.Namespace, out_dir: Path,
               clf) -> dict:
    """One row: ``pipe.generate(..., **options)`` (``options``: ``{}`` for the teacher, ``{"sampler": ...}``
    for a student) scored, timed, pass-counted and drawn; ``model`` is the network whose passes are counted."""
    from visar.eval.sampling import generate_balanced
    from visar.eval.shapes_metrics import shapes_metrics
    from visar.utils.images import save_grid

    def generate(labels: torch.Tensor, seed: int) -> torch.Tensor:
        return pipe.generate(labels, seed=seed, **options)

    k = pipe.generator.num_classes
    t = time.perf_counter()
    images, labels = generate_balanced(pipe, args.samples, args.batch, args.seed, **options)
    row: dict[str, Any] = {"name": name, "fidelity_sampling_s": time.perf_counter() - t}
    m = shapes_metrics(images, labels, num_reference=args.num_reference, classifier=clf)
    row.update({"class_fidelity": m["class_fidelity"], "fcd": m["frechet_classifier_distance"],
                "reference_class_fidelity": m["reference_class_fidelity"], "num_samples": m["num_samples"]})
    with PassCounter(model) as counter:
        generate(torch.arange(2) % k, 0)
    row["network_passes"] = {n: c for n, c in counter.counts.items() if c}
    row["seconds_per_image"] = {str(b): seconds_per_image(generate, k, b, args.repeats) for b in args.speed_batches}
    grid = generate(torch.arange(k).repeat_interleave(args.grid_per_class), 0)
    row["grid"] = str(save_grid(grid.float().cpu(), out_dir / f"grid_{name}.png", nrow=args.grid_per_class))
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    batches = meta["speed_batches"]
    head = " | ".join(f"ms / image at batch {b} (CPU; wall)" for b in batches)
    lines = [f"Distilled Decoding on shapes: teacher `{meta['teacher']}` ({meta['teacher_options']}), "
             f"{meta['samples']} balanced samples per row (seed {meta['seed']}), bundled classifier; speed with "
             f"{meta['threads']} thread(s), median of {meta['repeats']} batches ({meta['machine']}).", "",
             f"| sampler | passes / batch | class fidelity | FCD | {head} | speed-up at batch {batches[0]} (CPU) |",
             "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in batches) + " | ---: |"]
    base = rows[0]["seconds_per_image"][str(batches[0])]["cpu"]
    for r in rows:
        sp = r["seconds_per_image"]
        cells = " | ".join(f"{sp[str(b)]['cpu'] * 1e3:.2f} ms; {sp[str(b)]['wall'] * 1e3:.2f} ms" for b in batches)
        passes = " + ".join(str(v) for v in r["network_passes"].values()) or "-"
        lines.append(f"| {r['name']} | {passes} | {r['class_fidelity']:.3f} | {r['fcd']:.2f} | {cells} | "
                     f"{base / sp[str(batches[0])]['cpu']:.1f}x |")
    lines += ["", f"Classifier accuracy on held-out real shapes (ceiling): {rows[0]['reference_class_fidelity']:.3f}."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="pipeline folder or bundled name of the teacher")
    p.add_argument("--student", action="append", default=[], metavar="NAME=FOLDER[:STEPS]", help="repeatable")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--batch", type=int, default=100, help="sampling batch for the fidelity samples")
    p.add_argument("--speed-batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeats", type=int, default=5, help="timed batches per speed measure (median)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-reference", type=int, default=2000)
    p.add_argument("--grid-per-class", type=int, default=8)
    args = p.parse_args(argv)
    for name in ("samples", "batch", "repeats", "threads", "grid_per_class", "num_reference"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(b < 1 for b in args.speed_batches):
        raise SystemExit(f"--speed-batches must be >= 1, got {args.speed_batches}")
    students = parse_students(args.student)
    torch.set_num_threads(args.threads)

    from visar import zoo
    from visar.eval.sampling import effective_options
    from visar.eval.classifier import load_classifier
    from visar.samplers.distilled import DistilledSampler, load_student

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = zoo.load(args.teacher)
    if args.samples % pipe.generator.num_classes:
        raise SystemExit(f"--samples {args.samples} is not a multiple of the teacher's {pipe.generator.num_classes} "
                         "classes: the labels would not be balanced")
    clf = load_classifier()
    teacher_options = effective_options(pipe, dict(pipe.sampling_defaults))
    rows = [report_row("teacher", pipe, {}, pipe.generator, args, out_dir, clf)]
    print(f"teacher: class fidelity {rows[0]['class_fidelity']:.3f}", flush=True)
    for name, folder, steps in students:
        student = load_student(folder)
        sampler = DistilledSampler(student=student, steps=steps, codebook=pipe.tokenizer)
        rows.append(report_row(name, pipe, {"sampler": sampler}, student, args, out_dir, clf))
        rows[-1].update({"student": folder, "steps": steps})
        print(f"{name}: class fidelity {rows[-1]['class_fidelity']:.3f}", flush=True)

    combine_grids([(r["name"], r["grid"]) for r in rows], out_dir / "grids.png")

    meta = {"teacher": args.teacher, "teacher_options": ", ".join(f"{k}={v}" for k, v in teacher_options.items()
                                                                 if k in pipe.sampling_defaults),
            "samples": args.samples, "seed": args.seed, "threads": args.threads, "repeats": args.repeats,
            "speed_batches": args.speed_batches, "machine": f"{platform.machine()}, torch {torch.__version__}"}
    report = {"meta": meta, "rows": rows}
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    md = markdown(rows, meta)
    (out_dir / "report.md").write_text(md)
    print(md)
    return report


if __name__ == "__main__":
    main()
