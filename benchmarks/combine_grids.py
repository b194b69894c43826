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
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw


def combine_grids(panels: Sequence[tuple[str, str | Path]], out: str | Path, gap: int = 12, band: int = 16,
                  columns: tuple[int, int] | None = None, height: int | None = None) -> Path:
    """Write the panels ``[(name, png_path), ...]`` side by side to ``out``; returns ``out``.

    ``columns=(k, n)`` crops every panel to its left ``k / n`` (``1 <= k <= n``); ``height`` rescales
    every panel to that many pixels (aspect kept, Lanczos).
    """
    if not panels:
        raise ValueError("give at least one NAME=PNG panel")
    if columns is not None and not (1 <= columns[0] <= columns[1]):
        raise ValueError(f"columns must be K/N with 1 <= K <= N, got {columns}")
    if height is not None and height < 1:
        raise ValueError(f"height must be >= 1, got {height}")
    images = []
    for name, path in panels:
        if not Path(path).is_file():
            raise FileNotFoundError(f"grid {path} (panel {name!r}) does not exist")
        im = Image.open(path).convert("RGB")
        if columns is not None:
            im = im.crop((0, 0, round(im.width * columns[0] / columns[1]), im.height))
        if height is not None:
            im = im.resize((max(1, round(im.width * height / im.height)), height), Image.LANCZOS)
        images.append((name, im))
    width = sum(im.width for _, im in images) + gap * (len(images) - 1)
    height = band + max(im.height for _, im in images)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for name, im in images:
        draw.text((x + 2, 2), name, fill="black")
        canvas.paste(im, (x, band))
        x += im.width + gap
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    canvas.save(tmp)
    tmp.replace(out)
    return out


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
