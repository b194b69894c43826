"""FlowAR and xAR sampler speed (tiny random models, CPU, float32): KV cache, and xAR's per-entity adaLN.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_flowar_xar_cache.py --runs 5 --batch 4

Two comparisons, each with A and B alternating inside one process; the report is the median time of
each and the median of the per-pair ratios:

* ``cache``: the samplers with ``use_cache=True`` vs ``False`` (same latents; the tests check it);
* ``modulation`` (xAR): the adaLN modulation computed once per entity, then expanded to its tokens
  (today's code) vs expanded to every token first (the code before; forced here by raising
  :data:`visar.nn.adaln_block.MIN_MODULATION_ROWS`). Both give the same latents bit for bit; the model is
  ``xar-tiny`` widened to ``--width`` (768 = xAR-B's width, so each block's modulation linear is
  768 -> 4608 as in xAR-B).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from visar import zoo  # noqa: E402
from visar.nn import adaln_block  # noqa: E402
from visar.samplers.next_scale_flow import NextScaleFlowSampler  # noqa: E402
from visar.samplers.next_x import NextXSampler  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(label: str, run_a, run_b, runs: int, names: tuple[str, str]) -> None:
    """Alternate ``run_a`` / ``run_b`` (after one warm-up each) and print medians and the median ratio b/a."""
    out_a, out_b = run_a(), run_b()
    same = "bit-identical" if torch.equal(out_a, out_b) else f"max diff {(out_a - out_b).abs().max().item():.2e}"
    ta, tb = [], []
    for _ in range(runs):
        ta.append(timed(run_a))
        tb.append(timed(run_b))
    ratio = statistics.median([b / a for a, b in zip(ta, tb)])
    print(f"{label}: {names[0]} {statistics.median(ta):.3f}s, {names[1]} {statistics.median(tb):.3f}s, "
          f"speed-up x{ratio:.2f} (median of {runs} pairs; outputs {same})")


def expanded_modulation(fn):
    """``fn`` with the pre-change modulation: the per-entity condition expanded to every token first."""
    def run():
        old, adaln_block.MIN_MODULATION_ROWS = adaln_block.MIN_MODULATION_ROWS, 1 << 62
        try:
            return fn()
        finally:
            adaln_block.MIN_MODULATION_ROWS = old
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--width", type=int, default=768, help="xAR width of the modulation comparison")
    ap.add_argument("--xar-steps", type=int, default=10, help="num_steps of the modulation comparison")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    labels = list(range(args.batch))
    cases = {
        "flowar-tiny": (NextScaleFlowSampler(), dict(num_steps=25, cfg_scale=4.3, guidance_high=0.9)),
        "xar-tiny": (NextXSampler(), dict(num_steps=40, cfg_scale=2.7)),
    }
    for name, (sampler, opts) in cases.items():
        torch.manual_seed(0)
        model = zoo.create(name).eval()

        def run(uc: bool, model=model, opts=opts, sampler=sampler):
            return sampler(model, labels, torch.Generator().manual_seed(0), use_cache=uc, **opts)

        compare(f"cache {name} batch {args.batch} {opts}", lambda: run(True), lambda: run(False), args.runs,
                ("cached", "uncached"))

    torch.manual_seed(0)
    model = zoo.create("xar-tiny", width=args.width, num_heads=args.width // 64 or 1).eval()
    opts = dict(num_steps=args.xar_steps, cfg_scale=2.7)

    def per_entity():
        return NextXSampler()(model, labels, torch.Generator().manual_seed(0), **opts)

    compare(f"modulation xar-tiny width {args.width} batch {args.batch} {opts}", per_entity,
            expanded_modulation(per_entity), args.runs, ("per-entity", "expanded"))


if __name__ == "__main__":
    main()
