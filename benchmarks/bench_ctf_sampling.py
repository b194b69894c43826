"""Sampling time of CTF vs a plain next-token model of the same AR size (random weights, CPU by default).

CTF's AR stage predicts one of ``num_clusters`` coarse labels instead of one of ``vocab_size``
codewords (a smaller logits head and smaller softmax/top-k per step), then adds one auxiliary pass.
This measures both families' default samplers end to end (``AutoregressiveSampler`` and
``CoarseToFineSampler``), alternating A and B in one process, and reports the median time of each, the
median B/A ratio over ``--runs`` runs and the model passes each sampler counted (``sampler.stats``).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_ctf_sampling.py --dim 256 --depth 4 --aux-depth 4
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from visar.generators.base import Condition  # noqa: E402
from visar.generators.coarse_to_fine.ctf import CoarseToFineGenerator  # noqa: E402
from visar.generators.next_token.llamagen import NextTokenGenerator  # noqa: E402
from visar.samplers.autoregressive import AutoregressiveSampler  # noqa: E402
from visar.samplers.coarse_to_fine import CoarseToFineSampler, sample_fine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=16384)
    ap.add_argument("--num-clusters", type=int, default=512)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--aux-dim", type=int, default=256)
    ap.add_argument("--aux-depth", type=int, default=4)
    ap.add_argument("--grid-size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--cfg-scale", type=float, default=2.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    ar = dict(dim=args.dim, depth=args.depth, num_heads=args.heads)
    base = NextTokenGenerator(vocab_size=args.vocab_size, grid_size=args.grid_size, **ar).to(dev).eval()
    ctf = CoarseToFineGenerator(vocab_size=args.vocab_size, num_clusters=args.num_clusters,
                                grid_size=args.grid_size, coarse=ar,
                                aux=dict(dim=args.aux_dim, depth=args.aux_depth, num_heads=args.heads))
    # a random surjective map stands in for k-means (timing does not depend on which codeword is where)
    cmap = torch.arange(args.vocab_size) % args.num_clusters
    ctf.set_clusters(cmap[torch.randperm(args.vocab_size)], "0" * 64)
    ctf = ctf.to(dev).eval()
    for m in (base, ctf):  # random heads instead of LlamaGen's zero init, so sampling is not uniform
        torch.nn.init.normal_(m.coarse.head.weight if m is ctf else m.head.weight, std=0.02)
    cond = Condition.of(torch.arange(args.batch) % 1000).to(dev)

    def timed(fn) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    sampler_a = AutoregressiveSampler(cfg_scale=args.cfg_scale, top_k=args.top_k)
    sampler_b = CoarseToFineSampler(cfg_scale=args.cfg_scale, top_k=args.top_k)
    run_a = lambda: sampler_a(base, cond, torch.Generator(dev).manual_seed(0))  # noqa: E731
    run_b = lambda: sampler_b(ctf, cond, torch.Generator(dev).manual_seed(0))  # noqa: E731
    run_a(), run_b()  # warm-up
    ta, tb = [], []
    for _ in range(args.runs):
        ta.append(timed(run_a))
        tb.append(timed(run_b))
    fine = [timed(lambda: sample_fine(ctf, torch.zeros(args.batch, args.grid_size ** 2, dtype=torch.long, device=dev),
                                      cond.labels, torch.Generator(dev).manual_seed(0)))
            for _ in range(args.runs)]
    ratio = statistics.median(b / a for a, b in zip(ta, tb))
    n_base = sum(p.numel() for p in base.parameters()) / 1e6
    n_ar = sum(p.numel() for p in ctf.coarse.parameters()) / 1e6
    n_aux = sum(p.numel() for p in ctf.aux.parameters()) / 1e6
    print(f"device {dev}, threads {args.threads}, batch {args.batch}, grid {args.grid_size}, cfg {args.cfg_scale}")
    print(f"next-token  (V={args.vocab_size}, {n_base:.1f}M): median {statistics.median(ta):.3f} s")
    print(f"CTF (M={args.num_clusters}, AR {n_ar:.1f}M + aux {n_aux:.1f}M): median {statistics.median(tb):.3f} s "
          f"(fine stage alone {statistics.median(fine):.3f} s)")
    print(f"median CTF / next-token time ratio over {args.runs} runs: {ratio:.3f}")
    print(f"model passes per run: next-token {sampler_a.stats['model_passes']}, CTF {sampler_b.stats['model_passes']} "
          f"({sampler_b.stats['coarse_passes']} coarse + {sampler_b.stats['fine_passes']} auxiliary)")


if __name__ == "__main__":
    main()
