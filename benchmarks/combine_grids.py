"""Put sample grids side by side, each under its name (the figure of docs/training.md's shapes demos).

    python benchmarks/combine_grids.py --out docs/images/shapes_zoo.png \\
        next-token=runs/zoo/grid_next-token.png var=runs/zoo/grid_var.png ...

Each ``NAME=PNG`` is a grid written by ``shapes_zoo_report.py`` (any PNGs work); panels are top-aligned,
separated by ``--gap`` white pixels, with the name in a white band above.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw


def combine_grids(panels: Sequence[tuple[str, str | Path]], out: str | Path, gap: int = 12, band: int = 16) -> Path:
    """Write the panels ``[(name, png_path), ...]`` side by side to ``out``; returns ``out``."""
    if not panels:
        raise ValueError("give at least one NAME=PNG panel")
    images = []
    for name, path in panels:
        if not Path(path).is_file():
            raise FileNotFoundError(f"grid {path} (panel {name!r}) does not exist")
        images.append((name, Image.open(path).convert("RGB")))
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
    args = p.parse_args(argv)
    bad = [s for s in args.panels if "=" not in s]
    if bad:
        p.error(f"panels are NAME=PNG, got {bad}")
    print(combine_grids([tuple(s.split("=", 1)) for s in args.panels], args.out, gap=args.gap))


if __name__ == "__main__":
    main()
