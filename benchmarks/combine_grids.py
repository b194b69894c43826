"""Put sample grids side by side, each under its name (the figure of docs/training.md's shapes demos).

    python benchmarks/combine_grids.py --out docs/images/shapes_zoo.png \\
        next-token=runs/zoo/grid_next-token.png var=runs/zoo/grid_var.png ...

Each ``NAME=PNG`` is a grid written by ``shapes_zoo_report.py`` (any PNGs work); panels are top-aligned,
separated by ``--gap`` white pixels, with the name in a white band above. ``--columns K/N`` keeps the left
``K`` of ``N`` equal-width columns of every panel (e.g. ``4/8``: 4 samples per class of an 8-per-class
grid); ``--height H`` scales the panels to that height first.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from visar.utils.images import combine_grids  # noqa: F401  (the function lives in the package)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("panels", nargs="+", metavar="NAME=PNG")
    p.add_argument("--out", required=True)
    p.add_argument("--gap", type=int, default=12)
    p.add_argument("--columns", metavar="K/N", help="keep the left K of N columns of every panel")
    p.add_argument("--height", type=int, help="scale every panel to this height (pixels)")
    args = p.parse_args(argv)
    bad = [s for s in args.panels if "=" not in s]
    if bad:
        p.error(f"panels are NAME=PNG, got {bad}")
    columns = None
    if args.columns:
        try:
            k, n = (int(v) for v in args.columns.split("/"))
        except ValueError:
            p.error(f"--columns takes K/N (e.g. 4/8), got {args.columns!r}")
        columns = (k, n)
    print(combine_grids([tuple(s.split("=", 1)) for s in args.panels], args.out, gap=args.gap, columns=columns,
                        height=args.height))


if __name__ == "__main__":
    main()
