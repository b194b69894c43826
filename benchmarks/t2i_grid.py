"""A PNG grid of text-to-image samples: one row per prompt (the prompt written on the left), one column per seed.

    python benchmarks/t2i_grid.py --model shapes-llamagen-t2i --out docs/images/t2i_grid.png \
        [--prompt "a large red circle on a dark blue background, at the top left" ...] [--seeds 4] [--scale 3]

Without ``--prompt`` it uses :data:`PROMPTS` (four of them hold a (colour, shape) pair left out of training by
``configs/shapes_t2i.yaml``: red star, blue hexagon, purple heart, brown set of stripes). Each row is one ``pipe(prompts=[p] * seeds, seed=row)``
call, so the grid is reproducible from the command.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

PROMPTS = (
    "a large red circle on a dark blue background, at the top left",
    "a small yellow square on a grey background",
    "a medium green triangle on a black gradient background, at the bottom right",
    "a large white star on a dark red background, at the top",
    "a medium red star on a light grey background",
    "a large blue hexagon on a beige gradient background, on the left",
    "a small purple heart on a dark green background, on the right, rotated",
    "a large brown set of stripes on a light blue background",
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="shapes-llamagen-t2i", help="bundled name or text-to-image pipeline folder")
    ap.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable; default: PROMPTS)")
    ap.add_argument("--seeds", type=int, default=4, help="images per prompt (default: 4)")
    ap.add_argument("--scale", type=int, default=3, help="pixel upscaling of each image (default: 3)")
    ap.add_argument("--cfg-scale", type=float, default=None, help="guidance (default: the model's stored one)")
    ap.add_argument("--out", required=True, help="PNG path")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.scale < 1:
        ap.error("--seeds and --scale must be >= 1")
    torch.set_num_threads(args.threads)
    import visar

    pipe = visar.load(args.model)
    prompts = args.prompt or list(PROMPTS)
    options = {} if args.cfg_scale is None else {"cfg_scale": args.cfg_scale}
    rows = []
    for i, p in enumerate(prompts):
        rows.append(pipe(prompts=[p] * args.seeds, seed=i, **options).images)
    size = rows[0][0].size[0] * args.scale
    text_w, pad = 430, 4
    grid = Image.new("RGB", (text_w + args.seeds * (size + pad), len(prompts) * (size + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (p, images) in enumerate(zip(prompts, rows)):
        y = r * (size + pad)
        words, lines = p.split(), [""]
        for w in words:  # wrap the prompt to the text column
            if len(lines[-1]) + len(w) + 1 > 60:
                lines.append("")
            lines[-1] = (lines[-1] + " " + w).strip()
        draw.multiline_text((6, y + size // 2 - 7 * len(lines)), "\n".join(lines), fill="black")
        for c, im in enumerate(images):
            grid.paste(im.resize((size, size), Image.NEAREST), (text_w + c * (size + pad), y))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    print(out)


if __name__ == "__main__":
    main()
