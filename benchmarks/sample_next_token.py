"""Speed of LlamaGen-style sampling: the static-KV-cache AR loop (``AutoregressiveSampler``) vs the
naive uncached reference loop (``sample_autoregressive_naive``).

For each model (a tiny one and a GPT-B-sized one, random weights) and batch size (1, 8) the two
samplers run alternately in one process with the same seed; the script prints the median wall time
of ``--runs`` runs, images/s, ms per generated token position (one decode step for the whole batch)
and the median ratio naive / cached. Both samplers draw identical tokens (checked on the first run).

CPU defaults keep the run within a few minutes: GPT-B images have ``--gpt-b-grid``^2 = 36 tokens
(a real 256 px LlamaGen image has 256) and no guidance (``--cfg 1``; guidance doubles the rows).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/sample_next_token.py
    python benchmarks/sample_next_token.py --device cuda --gpt-b-grid 16 --cfg 2.0 --compile
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from visar.generators.base import Condition  # noqa: E402
from visar.generators.next_token.llamagen import NextTokenGenerator  # noqa: E402
from visar.samplers.autoregressive import AutoregressiveSampler, sample_autoregressive_naive  # noqa: E402


def build(kind: str, grid: int, device: str) -> NextTokenGenerator:
    torch.manual_seed(0)
    if kind == "tiny":
        cfg = dict(vocab_size=256, dim=128, depth=2, num_heads=2, num_classes=10)
    else:  # GPT-B: 111M parameters, vocabulary 16384
        cfg = dict(vocab_size=16384, dim=768, depth=12, num_heads=12, num_classes=1000)
    model = NextTokenGenerator(grid_size=grid, **cfg).eval().to(device)
    with torch.no_grad():  # the official init zeroes the head: give it weights so sampling is not uniform
        torch.nn.init.normal_(model.head.weight, std=0.02)
    return model


def timed(fn, device: str) -> tuple[float, torch.Tensor]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tiny-grid", type=int, default=8, help="tiny model: tokens per side")
    p.add_argument("--gpt-b-grid", type=int, default=6, help="GPT-B: tokens per side (16 = 256 px)")
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale (> 1 doubles the rows)")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd cached step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"cfg {args.cfg}, runs {args.runs} (median, samplers alternated)")
    header = f"{'model':8} {'B':>2} {'L':>4} {'sampler':14} {'s/run':>8} {'img/s':>8} {'ms/token':>9} {'x naive':>8}"
    print(header)
    print("-" * len(header))
    for kind, grid in (("tiny", args.tiny_grid), ("gpt-b", args.gpt_b_grid)):
        model = build(kind, grid, args.device)
        L = grid * grid
        for B in args.batches:
            cond = Condition.of(list(range(B))).to(args.device)

            def run(name):
                g = torch.Generator(args.device).manual_seed(0)
                if name == "naive":
                    return sample_autoregressive_naive(model, cond, generator=g, cfg_scale=args.cfg)
                sampler = AutoregressiveSampler(cfg_scale=args.cfg, compile=name == "cached+compile")
                return sampler(model, cond, g).flatten(1)

            names = ["naive", "cached"] + (["cached+compile"] if args.compile else [])
            times: dict[str, list[float]] = {n: [] for n in names}
            with torch.inference_mode():
                if args.compile:
                    run("cached+compile")  # warm-up: compile outside the timed runs
                outs = {}
                for r in range(args.runs):
                    for n in names:
                        dt, out = timed(lambda: run(n), args.device)
                        times[n].append(dt)
                        outs.setdefault(n, out)
                same = all(torch.equal(outs["naive"], outs[n]) for n in names)
            med = {n: statistics.median(v) for n, v in times.items()}
            for n in names:
                ratios = [a / b for a, b in zip(times["naive"], times[n])]
                print(f"{kind:8} {B:>2} {L:>4} {n:14} {med[n]:8.3f} {B / med[n]:8.2f} {1000 * med[n] / L:9.2f} "
                      f"{statistics.median(ratios):8.2f}")
            print(f"{'':8} tokens identical across samplers: {same}")


if __name__ == "__main__":
    main()
