"""How much class information the discrete tokens carry, for real images and for a generator's samples.

    python benchmarks/token_class_probe.py --cache runs/cache/shapes32_s1_tokens_v2 \
        [--pipeline visar/assets/shapes-llamagen] [--steps 4000] [--samples 1000] [--cfg 2.0,3.0]

A *token probe* (embedding + three 3x3 convolutions over the token grid + linear; a few hundred
thousand parameters) is trained to name the class from token ids alone, on a token cache built by
``visar tokenize`` with the pipeline's tokenizer. It is then applied to

* the tokens of held-out shapes (split "test", 2000 images): how much of the class survives encoding;
* the generator's tokens for balanced labels (seeds 1000, 1100, ... in batches of 100, as the 1000-sample
  fidelity figures in docs/training.md): how close the generator's tokens are to real ones;

next to the pixel classifier's fidelity on the same samples decoded. The gap between the first two says
how far the generator is from its tokenizer; the gap between the probe and the pixel classifier says
how much the decoder loses. Writes JSON to stdout, progress to stderr. Single-grid (next-token) VQ
pipelines only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class TokenProbe(nn.Module):
    """Class logits [B, num_classes] from token ids [B, h, w] in [0, vocab)."""

    def __init__(self, vocab: int, num_classes: int, dim: int = 96, width: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Sequential(
            nn.Conv2d(dim, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(ids).permute(0, 3, 1, 2)).mean((2, 3)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", required=True, help="token cache of the pipeline's tokenizer (visar tokenize)")
    ap.add_argument("--pipeline", default="visar/assets/shapes-llamagen")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--samples", type=int, default=1000, help="generated samples per cfg (multiple of 100)")
    ap.add_argument("--cfg", default="2.0,3.0")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.samples % 100:
        raise SystemExit("--samples must be a multiple of 100 (seeded batches of 100)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import visar
    from visar.data.shapes import ShapesDataset
    from visar.data.token_cache import TokenCacheDataset
    from visar.eval.classifier import class_fidelity
    from visar.generators.base import Condition
    from visar.train.optim import lr_at
    from tqdm import tqdm

    pipe = visar.load(args.pipeline)
    tok, gen = pipe.tokenizer.eval(), pipe.generator.eval()
    if not hasattr(gen, "grid_size"):
        raise SystemExit(f"{type(gen).__name__} has no single token grid: the probe is for next-token VQ pipelines")
    ds = TokenCacheDataset(args.cache)
    ds.check_tokenizer(tok)  # a cache of another tokenizer is refused with the cache's own message
    side = gen.grid_size
    ids = ds.data["tokens"].long().reshape(len(ds), side, side)  # the cache's in-memory tensors, not per item
    labels = ds.data["labels"].long()
    vocab, num_classes = tok.vocab_size, int(labels.max()) + 1

    x, y = ShapesDataset(size=32, length=2000, split="test").render(range(2000))
    with torch.no_grad():
        held_out = tok.encode(x).reshape(-1, side, side)

    probe = TokenProbe(vocab, num_classes)
    opt = torch.optim.AdamW(probe.parameters(), args.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for s in tqdm(range(args.steps), desc="probe", file=sys.stderr):
        for group in opt.param_groups:
            group["lr"] = lr_at(s, args.lr, warmup=0, total=args.steps, min_ratio=0.0)
        i = torch.randint(0, len(ids), (args.batch_size,), generator=g)
        loss = F.cross_entropy(probe(ids[i]), labels[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe.eval()
    with torch.no_grad():
        real_acc = (probe(held_out).argmax(1) == y).float().mean().item()
    report = {"pipeline": args.pipeline, "cache": args.cache, "cache_items": len(ids), "steps": args.steps,
              "train_minutes": round((time.time() - t0) / 60, 1), "final_loss": round(loss.item(), 4),
              "probe_on_held_out_tokens": round(real_acc, 4), "generated": {}}
    want = torch.arange(args.samples) % num_classes
    for cfg in [float(c) for c in args.cfg.split(",")]:
        with torch.no_grad():
            out = torch.cat([gen.sample(Condition(labels=want[i:i + 100]), cfg_scale=cfg,
                                        generator=torch.Generator().manual_seed(1000 + i))
                             for i in range(0, args.samples, 100)])
            probe_acc = (probe(out.reshape(-1, side, side)).argmax(1) == want).float().mean().item()
            pixel_acc = class_fidelity(tok.decode(out).clamp(-1, 1), want)
        report["generated"][str(cfg)] = {"probe_on_generated_tokens": round(probe_acc, 4),
                                         "pixel_classifier_on_decoded": round(float(pixel_acc), 4)}
        print(f"cfg {cfg}: probe {probe_acc:.4f} pixel {pixel_acc:.4f}", file=sys.stderr, flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
