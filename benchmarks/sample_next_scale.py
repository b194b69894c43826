"""VAR sampling speed: visar's cached next-scale sampler vs a naive sampler that re-runs the whole
prefix at every scale (no KV cache), on random-weight models.

Both samplers are run alternately in one process with the same seed; the script checks they draw the
same tokens, then reports images/s (token sampling only: the VQVAE decoder costs the same for both and
is excluded) and the median speed-up over ``--runs`` pairs. ``--compile`` adds a third variant with
``torch.compile`` of the cached per-scale step (one graph per scale; compile time is excluded by a
warm-up run).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/sample_next_scale.py --models tiny d16 --batches 1 16 --runs 5
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from visar.generators.next_scale.var import SCHEDULE_256, NextScaleGenerator  # noqa: E402
from visar.samplers.next_scale import NextScaleSampler  # noqa: E402
from visar.tokenizers.msvq_quantizer import MultiScaleResidualQuantizer  # noqa: E402

MODELS = {
    # 10-scale 256 px schedule for both; tiny = 2 blocks of width 64
    "tiny": dict(num_classes=1000, vocab_size=4096, token_dim=32, depth=2, width=64, num_heads=2),
    "d16": dict(num_classes=1000, vocab_size=4096, token_dim=32, depth=16, width=1024, num_heads=16),
}


def build(name: str, device: str) -> NextScaleGenerator:
    torch.manual_seed(0)
    gen = NextScaleGenerator(scales=list(SCHEDULE_256), **MODELS[name]).to(device).eval()
    q = MultiScaleResidualQuantizer(4096, 32, SCHEDULE_256).to(device)
    gen.bind_tokenizer(q)
    return gen


def timed(fn, device: str) -> tuple[float, list]:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "d16"], choices=sorted(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--runs", type=int, default=5, help="timed pairs per setting (median reported)")
    ap.add_argument("--max-seconds", type=float, default=300.0,
                    help="stop adding runs to a setting once it has used this much time (>= 1 pair always)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of every variant first (0 for big models)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the cached step")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sample = NextScaleSampler()  # sample(gen, labels, generator, **options); sample.stats counts model passes
    opts = dict(cfg_scale=2.5, top_k=900, top_p=0.96)  # VAR's FID setting (official cfg 1.5 = cfg_scale 2.5)
    results = []
    for name in args.models:
        gen = build(name, args.device)
        params = sum(p.numel() for p in gen.parameters())
        for B in args.batches:
            labels = torch.arange(B, device=args.device) % gen.num_classes
            variants = {"cached": dict(use_cache=True), "naive": dict(use_cache=False)}
            if args.compile:
                variants["compiled"] = dict(use_cache=True, compile=True)
            with torch.no_grad():  # warm-up (and compile)
                for _ in range(args.warmup):
                    for kw in variants.values():
                        sample(gen, labels, torch.Generator(args.device).manual_seed(0), **opts, **kw)
            times = {k: [] for k in variants}
            start = time.perf_counter()
            for r in range(args.runs):
                toks = {}
                for k, kw in variants.items():
                    g = torch.Generator(args.device).manual_seed(r)
                    with torch.no_grad():
                        dt, toks[k] = timed(lambda: sample(gen, labels, g, **opts, **kw), args.device)
                    times[k].append(dt)
                same = all(torch.equal(a, b) for a, b in zip(toks["cached"], toks["naive"]))
                if not same:
                    raise SystemExit(f"{name} batch {B}: cached and naive samplers drew different tokens")
                if time.perf_counter() - start > args.max_seconds:
                    break
            row = dict(model=name, params_M=round(params / 1e6, 1), batch=B, runs=len(times["cached"]),
                       tokens_identical=True, model_passes=sample.stats["model_passes"])
            for k, ts in times.items():
                row[f"{k}_img_per_s"] = round(B / statistics.median(ts), 3)
            ratios = [n / c for n, c in zip(times["naive"], times["cached"])]
            row["speedup_cached_vs_naive"] = round(statistics.median(ratios), 2)
            if args.compile:
                row["speedup_compiled_vs_cached"] = round(
                    statistics.median(c / k for c, k in zip(times["cached"], times["compiled"])), 2)
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=args.device, threads=args.threads, torch=torch.__version__, sampling=opts,
                           results=results), f, indent=1)


if __name__ == "__main__":
    main()
