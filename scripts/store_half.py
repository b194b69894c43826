"""Copy a saved model folder with some weight files stored as float16 (how the shipped shapes weights are made).

    python scripts/store_half.py runs/var_cont3/export benchmarks/weights/var_shapes_new
    python scripts/store_half.py SRC DST --file generator/model.safetensors --file tokenizer/model.safetensors

Every file of ``SRC`` (a Pipeline folder, or one component folder) is copied to ``DST``; in the named
``.safetensors`` files (default: ``generator/model.safetensors`` when ``SRC`` is a pipeline folder, else
``model.safetensors``) every float32 tensor is rounded to float16; integer tensors are copied unchanged.
Loading casts the weights back to the model's dtype (float32 unless ``torch_dtype`` says otherwise), so a
copy samples like the original up to the float16 rounding of its weights, at half the size on disk. Check
what the rounding costs with the family's benchmark before shipping (docs/training.md reports it per model).

``DST`` must not exist (nothing is overwritten) and is written whole or not at all.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from visar.utils.io import atomic_dir, load_safetensors, save_safetensors


def default_files(src: Path) -> list[str]:
    """The generator weights of a pipeline folder, else the component's own ``model.safetensors``."""
    return ["generator/model.safetensors"] if (src / "pipeline.json").is_file() else ["model.safetensors"]


def store_half(src: str | Path, dst: str | Path, files: list[str] | None = None) -> dict[str, tuple[int, int]]:
    """Copy folder ``src`` to ``dst`` with the float32 tensors of ``files`` (paths relative to ``src``) stored
    as float16. Returns ``{file: (bytes before, bytes after)}``. Raises ``FileNotFoundError`` for a missing
    ``src`` or file, ``FileExistsError`` when ``dst`` exists, ``ValueError`` for a file that is not
    ``.safetensors`` or lies outside ``src``."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"SRC {src} is not a folder (give a pipeline folder or a component folder)")
    if dst.exists():
        raise FileExistsError(f"DST {dst} exists; give a new folder (nothing is overwritten)")
    files = list(files) if files else default_files(src)
    for f in files:
        p = (src / f).resolve()
        if not p.suffix == ".safetensors":
            raise ValueError(f"--file {f}: only .safetensors weight files can be stored as float16")
        if src.resolve() not in p.parents:
            raise ValueError(f"--file {f} lies outside SRC {src}; give a path relative to SRC")
        if not p.is_file():
            raise FileNotFoundError(f"--file {f}: {p} does not exist")
    sizes = {}
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        for f in files:
            state = load_safetensors(src / f)
            half = {k: v.to(torch.float16) if v.dtype == torch.float32 else v for k, v in state.items()}
            save_safetensors(half, tmp / f)
            sizes[f] = ((src / f).stat().st_size, (tmp / f).stat().st_size)
    return sizes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="a saved Pipeline folder or component folder")
    ap.add_argument("dst", help="the new folder (must not exist)")
    ap.add_argument("--file", action="append", default=[],
                    help="a .safetensors file relative to SRC to store as float16 (repeatable; default: the "
                         "generator's weights)")
    args = ap.parse_args(argv)
    try:
        sizes = store_half(args.src, args.dst, args.file)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for f, (a, b) in sizes.items():
        print(f"{f}: {a / 2**20:.1f} MB -> {b / 2**20:.1f} MB (float16)")
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
