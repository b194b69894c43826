"""Reconstruction figures of one or more tokenizers trained on shapes (any family: VQ, multi-scale VQ, KL).

    python benchmarks/tokenizer_report.py --tokenizer vq=runs/shapes_vq/export --tokenizer kl=runs/kl_shapes/export \
        [--size 32] [--grid-dir docs/images]

For each: parameter count, reconstruction PSNR (dB, images in [0, 1]) on ``--num`` (default 500) held-out
shapes (split "test") and on 32 px crops of scikit-image's photos (the protocol of bundled_shapes_report.py), and the
bundled classifier's accuracy on the held-out reconstructions (the ceiling of class fidelity that a
generator can reach through this tokenizer; on the originals it is ~100%). Optionally a PNG of 16
held-out shapes over their reconstructions per tokenizer. Writes JSON to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bundled_shapes_report import photo_crops, psnr  # noqa: E402


def roundtrip(tok, x: torch.Tensor, batch: int = 100) -> torch.Tensor:
    return torch.cat([tok.decode(tok.encode(x[i:i + batch])) for i in range(0, len(x), batch)]).clamp(-1, 1)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", action="append", required=True, help="NAME=FOLDER (tokenizer.json inside)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid-dir", default=None)
    p.add_argument("--num", type=int, default=500, help="held-out shapes (the first NUM of the test split)")
    args = p.parse_args()
    if args.num < 16:
        p.error(f"--num must be at least 16 (the grid shows 16), got {args.num}")
    torch.set_num_threads(args.threads)
    from visar.data.shapes import ShapesDataset
    from visar.eval.classifier import class_fidelity, load_classifier
    from visar.tokenizers.base import Tokenizer

    clf = load_classifier()
    x, y = ShapesDataset(size=args.size, length=args.num, split="test").render(range(args.num))
    photos = photo_crops(args.size, 32)
    out = {"num_heldout": args.num, "classifier_acc_heldout_real": class_fidelity(x, y, clf)}
    for spec in args.tokenizer:
        if "=" not in spec:
            p.error(f"--tokenizer takes NAME=FOLDER, got {spec!r}")
        name, folder = spec.split("=", 1)
        tok = Tokenizer.from_pretrained(folder, "tokenizer").eval()
        rec = roundtrip(tok, x)
        out[name] = {"folder": folder, "class": type(tok).__name__,
                     "params": sum(q.numel() for q in tok.parameters()),
                     "psnr_heldout_shapes": round(psnr(rec, x), 2),
                     "psnr_skimage_photo_crops": round(psnr(roundtrip(tok, photos, 64), photos), 2),
                     "classifier_acc_reconstructions": class_fidelity(rec, y, clf)}
        if args.grid_dir:
            from visar.utils.images import save_grid

            save_grid(torch.stack([x[:16], rec[:16]], 1).flatten(0, 1),
                      Path(args.grid_dir) / f"recon_{name}.png", nrow=8)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
