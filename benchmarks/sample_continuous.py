"""MAR sampling speed: visar (diffusion head batched over every token of a step) vs a naive path
(the head run token by token, as a per-token loop would), at the official settings scaled down.

The naive path is :class:`PerTokenHeadSampler`, the ``"masked"`` sampler with its ``head_tokens`` run
token by token.

Both paths run the same model and the same MAR schedule (random order, linear CFG, temperature 1);
only the head calls differ. A and B alternate in one process; the figure is the median ratio of
``--runs`` pairs. Random weights (the speed does not depend on them).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/sample_continuous.py --runs 5

One invocation times every model of ``--models`` (default: ``tiny`` and the MAR-B-sized ``mar-b``) and
ends with one summary table of images/s, visar vs naive.

``--models ar-tiny`` times the causal continuous AR with its static KV cache against recomputing the
whole prefix for every token. Writes a JSON summary with ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from visar import zoo  # noqa: E402
from visar.conditions import Condition  # noqa: E402
from visar.samplers.heads import sample_head  # noqa: E402
from visar.samplers.masked import MaskedSampler  # noqa: E402

# name -> (preset, overrides, batch, num_iter, diffusion steps); official: num_iter 256, 100 steps
SETTINGS = {
    "tiny": ("mar-tiny", {}, 4, 16, 100),
    "mar-b": ("mar-b", {}, 1, 4, 5),
}


class PerTokenHeadSampler(MaskedSampler):
    """MAR's sampler with the head run once per token (a cond/uncond pair under guidance): the naive path."""

    def head_tokens(self, head, z, *, guided, **head_options):
        n = z.shape[0] // 2 if guided else z.shape[0]
        out = []
        for i in range(n):
            zi = torch.stack([z[i], z[n + i]]) if guided else z[i:i + 1]
            out.append(sample_head(head, zi, guided=guided, **head_options))
        return torch.cat(out)


def run(model, sampler, batch: int, num_iter: int, steps: int, seed: int) -> float:
    cond = Condition.of(torch.arange(batch) * 7 % model.num_classes)
    t0 = time.perf_counter()
    sampler(model, cond, torch.Generator().manual_seed(seed), num_iter=num_iter, cfg_scale=2.9,
            cfg_schedule="linear", temperature=1.0, num_steps=steps)
    return time.perf_counter() - t0


def bench(name: str, runs: int) -> dict:
    preset, overrides, batch, num_iter, steps = SETTINGS[name]
    torch.manual_seed(0)
    model = zoo.create(preset, **overrides).eval()
    params = sum(p.numel() for p in model.parameters())
    visar, naive = MaskedSampler(), PerTokenHeadSampler()
    t = run(model, visar, batch, num_iter, steps, 0)  # warm-up
    print(f"  {name}: {params / 1e6:.1f}M params, warm-up run {t:.2f}s", flush=True)
    fast, slow = [], []
    for r in range(runs):
        fast.append(run(model, visar, batch, num_iter, steps, r))
        slow.append(run(model, naive, batch, num_iter, steps, r))
        print(f"  {name} pair {r}: visar {fast[-1]:.2f}s naive {slow[-1]:.2f}s", flush=True)
    ratios = [s / f for s, f in zip(slow, fast)]
    return {"model": name, "preset": preset, "params": params, "tokens": model.seq_len, "batch": batch,
            "num_iter": num_iter, "diffusion_steps": steps, "cfg": "linear 2.9", "runs": runs,
            "visar_s": statistics.median(fast), "naive_s": statistics.median(slow),
            "visar_images_per_s": batch / statistics.median(fast), "naive_images_per_s": batch / statistics.median(slow),
            "median_speedup": statistics.median(ratios), "ratios": ratios}


def bench_ar(runs: int) -> dict:
    """Causal continuous AR (``mar-ar-tiny``, 64 tokens): static KV cache vs recomputing the prefix."""
    torch.manual_seed(0)
    model = zoo.create("mar-ar-tiny").eval()
    cond = Condition.of([1, 2, 3, 4])

    def one(use_cache: bool, seed: int) -> float:
        t0 = time.perf_counter()
        model.sample(cond, generator=torch.Generator().manual_seed(seed), cfg_scale=2.0, num_steps=20,
                     use_cache=use_cache)
        return time.perf_counter() - t0

    one(True, 0)
    fast, slow = [], []
    for r in range(runs):
        fast.append(one(True, r))
        slow.append(one(False, r))
        print(f"  ar-tiny pair {r}: cached {fast[-1]:.2f}s uncached {slow[-1]:.2f}s", flush=True)
    ratios = [s / f for s, f in zip(slow, fast)]
    return {"model": "ar-tiny", "preset": "mar-ar-tiny", "params": sum(p.numel() for p in model.parameters()),
            "tokens": model.num_tokens, "batch": 4, "num_iter": model.num_tokens, "diffusion_steps": 20,
            "cfg": "constant 2.0", "runs": runs, "visar_s": statistics.median(fast), "naive_s": statistics.median(slow),
            "visar_images_per_s": 4 / statistics.median(fast), "naive_images_per_s": 4 / statistics.median(slow),
            "median_speedup": statistics.median(ratios), "ratios": ratios,
            "naive": "no KV cache (full prefix recomputed every token)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "mar-b"], choices=sorted(SETTINGS) + ["ar-tiny"],
                    help="ar-tiny: the causal continuous AR, KV cache vs no cache")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models:
        res = bench_ar(args.runs) if name == "ar-tiny" else bench(name, args.runs)
        results.append(res)
        print(f"{name:6s} {res['params'] / 1e6:7.1f}M  L={res['tokens']} B={res['batch']} num_iter={res['num_iter']} "
              f"steps={res['diffusion_steps']}: visar {res['visar_images_per_s']:.3f} img/s, naive "
              f"{res['naive_images_per_s']:.3f} img/s, median speed-up {res['median_speedup']:.2f}x "
              f"(ratios {', '.join(f'{r:.2f}' for r in res['ratios'])})", flush=True)
    print("\nsummary (images/s, median of the runs; speed-up = median of per-pair ratios)")
    print(f"{'model':8s} {'params':>8s} {'tokens':>6s} {'batch':>5s} {'iters':>5s} {'steps':>5s} "
          f"{'visar':>9s} {'naive':>9s} {'speed-up':>8s}")
    for res in results:
        print(f"{res['model']:8s} {res['params'] / 1e6:7.1f}M {res['tokens']:6d} {res['batch']:5d} "
              f"{res['num_iter']:5d} {res['diffusion_steps']:5d} {res['visar_images_per_s']:9.3f} "
              f"{res['naive_images_per_s']:9.3f} {res['median_speedup']:7.2f}x", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "threads": args.threads, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
