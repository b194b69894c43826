"""Figures of the bundled default model (docs/training.md): tokenizer PSNR and sample class fidelity.

    python benchmarks/bundled_shapes_report.py [--pipeline visar/assets/shapes-llamagen] [--samples 200]
        [--cfg 1.0,1.5,2.0,3.0] [--batch 50] [--seed-offset 0] [--option top_k=20 ...]

* VQ reconstruction PSNR (dB, images in [0, 1]) on held-out 32 px shapes (split "test") and on 32 px
  crops of scikit-image's bundled natural photos (each photo BOX-downscaled by 4, then random crops);
* class fidelity of generated samples (bundled ShapesClassifier) at several CFG scales, balanced labels,
  seeded (batch ``i`` of ``--batch`` images uses seed ``--seed-offset + i * --batch``), overall and per
  class, with extra sampling options (``--option KEY=VALUE``, JSON values) on top of each CFG; also the
  classifier's accuracy on held-out real shapes and on their VQ reconstructions (an upper bound of what
  the generator can reach through this tokenizer).
Writes JSON to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from visar.eval.cli import key_value_option  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "cat")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR in dB of [-1, 1] images measured in [0, 1]."""
    mse = (((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())


def photo_crops(size: int, per_image: int, seed: int = 0) -> torch.Tensor:
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for name in PHOTOS:
        im = Image.fromarray(getattr(skimage.data, name)()[..., :3])
        im = im.resize((im.width // 4, im.height // 4), Image.BOX)
        a = np.asarray(im, dtype=np.float32) / 127.5 - 1
        for _ in range(per_image):
            y, x = rng.integers(0, a.shape[0] - size + 1), rng.integers(0, a.shape[1] - size + 1)
            out.append(torch.from_numpy(a[y:y + size, x:x + size]).permute(2, 0, 1))
    return torch.stack(out)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pipeline", default="visar/assets/shapes-llamagen")
    p.add_argument("--samples", type=int, default=200, help="generated images per CFG scale (balanced labels)")
    p.add_argument("--cfg", default="1.0,1.5,2.0,3.0")
    p.add_argument("--batch", type=int, default=50, help="images per generate() call (each call has its own seed)")
    p.add_argument("--seed-offset", type=int, default=0, help="seed of the first batch (then + batch per batch)")
    p.add_argument("--option", type=key_value_option, action="append", default=[], metavar="KEY=VALUE",
                   help="extra sampling option for every CFG, e.g. top_k=20 (repeatable; JSON values)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--classifier", default=None, help="classifier folder (default: the bundled one)")
    p.add_argument("--grid", default=None, help="also write a PNG: one row per class, 8 samples, first --cfg value")
    p.add_argument("--recon-grid", default=None, help="also write a PNG of held-out shapes and their reconstructions")
    args = p.parse_args()
    if args.batch < 1 or args.samples < 0:
        p.error("--batch must be >= 1 and --samples >= 0")
    options = dict(args.option)
    torch.set_num_threads(args.threads)
    from visar.data.shapes import CLASSES, ShapesDataset
    from visar.eval.classifier import class_fidelity, load_classifier
    from visar.pipeline import Pipeline

    clf = load_classifier(args.classifier)
    pipe = Pipeline.from_pretrained(args.pipeline)
    tok, gen = pipe.tokenizer, pipe.generator
    size = gen.grid_size * tok.downsample
    res: dict = {"pipeline": args.pipeline, "image_size": size,
                 "tokenizer_params": sum(p.numel() for p in tok.parameters()),
                 "generator_params": sum(p.numel() for p in gen.parameters())}
    x, y = ShapesDataset(size=size, length=500, split="test").render(range(500))
    rec = torch.cat([tok.decode(tok.encode(x[i:i + 100])) for i in range(0, 500, 100)])
    res["psnr_heldout_shapes"] = psnr(rec, x)
    res["classifier_acc_vq_reconstructions"] = class_fidelity(rec.clamp(-1, 1), y, clf)  # upper bound of fidelity
    photos = photo_crops(size, 32)
    rec = torch.cat([tok.decode(tok.encode(photos[i:i + 64])) for i in range(0, len(photos), 64)])
    res["psnr_skimage_photo_crops"] = psnr(rec, photos)
    res["num_photo_crops"] = len(photos)
    res["classifier_acc_heldout_real"] = class_fidelity(x, y, clf)
    labels = torch.arange(args.samples) % gen.num_classes
    res["sampling"] = {"samples": args.samples, "batch": args.batch, "seed_offset": args.seed_offset,
                       "options": options}
    b = args.batch
    for cfg in [float(c) for c in args.cfg.split(",")]:
        t = time.perf_counter()
        imgs = torch.cat([pipe.generate(labels[i:i + b], seed=args.seed_offset + i, **{**options, "cfg_scale": cfg})
                          for i in range(0, len(labels), b)])
        res[f"class_fidelity_cfg{cfg:g}"] = class_fidelity(imgs, labels, clf)
        hit = clf.predict(imgs) == labels
        res[f"class_fidelity_per_class_cfg{cfg:g}"] = {
            name: round(float(hit[labels == c].float().mean()), 3) for c, name in enumerate(CLASSES)}
        res[f"sample_seconds_cfg{cfg:g}"] = round(time.perf_counter() - t, 2)
    if args.grid:
        from visar.utils.images import save_grid

        cfg = float(args.cfg.split(",")[0])
        grid_labels = torch.arange(gen.num_classes).repeat_interleave(8)
        save_grid(pipe.generate(grid_labels, seed=0, **{**options, "cfg_scale": cfg}), args.grid, nrow=8)
    if args.recon_grid:
        from visar.utils.images import save_grid

        rec = tok.decode(tok.encode(x[:16])).clamp(-1, 1)
        save_grid(torch.stack([x[:16], rec], 1).flatten(0, 1), args.recon_grid, nrow=8)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
