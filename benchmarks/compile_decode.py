"""Eager vs ``compile=True`` sampling of a zoo preset (random weights): compile time, then alternating pairs.

The model is a ``visar.zoo`` preset with seeded random weights; every all-zero parameter (LlamaGen's
zero-initialised output layer, VAR's zeroed gates and biases) is refilled from ``N(0, 0.02)`` so no output
is trivially constant (the rule of ``docs/performance.md``). One compiled call first (its wall time,
process CPU time and the CPU time of inductor's compiler child processes are the compile cost, reported
apart from the steady state), then ``--pairs`` eager/compiled pairs in alternating order with the same
seed; the script prints per-pair process-CPU and wall times, the median eager/compiled ratio with min/max,
and whether the tokens were identical in every pair.

    OMP_NUM_THREADS=1 python benchmarks/compile_decode.py --model llamagen-gpt-b --num-tokens 64 --pairs 5
    OMP_NUM_THREADS=1 python benchmarks/compile_decode.py --model var-d16 --pairs 5 --cold
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time


def build(name: str, seed: int):
    import torch

    from visar import zoo

    torch.manual_seed(seed)
    model = zoo.create(name).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                torch.nn.init.normal_(p, std=0.02)
    if name.startswith("var-"):  # VAR samples through its tokenizer's quantizer (a random one here)
        from visar.tokenizers.msvq_quantizer import MultiScaleResidualQuantizer

        q = MultiScaleResidualQuantizer(model.vocab_size, model.token_dim, model.scales)
        with torch.no_grad():
            torch.nn.init.normal_(q.embedding.weight, std=1.0)
        model.bind_tokenizer(q)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llamagen-gpt-b",
                   help="zoo preset: a LlamaGen GPT or a VAR (default: %(default)s)")
    p.add_argument("--num-tokens", type=int, default=64, help="LlamaGen: tokens drawn per image (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="images per call (default: %(default)s)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale, 1 = none (default: %(default)s)")
    p.add_argument("--pairs", type=int, default=5, help="alternating eager/compiled pairs (default: %(default)s)")
    p.add_argument("--cold", action="store_true",
                   help="compile into a fresh inductor cache folder (a cold compile; default: the user's cache)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = p.parse_args()
    if args.cold:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="visar-inductor-")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import torch

    from visar.conditions import Condition
    from visar.samplers.autoregressive import AutoregressiveSampler
    from visar.samplers.next_scale import NextScaleSampler

    torch.set_num_threads(args.threads)
    model = build(args.model, 0)
    var = args.model.startswith("var-")
    cond = Condition.of(list(range(args.batch)))
    if var:
        sampler = NextScaleSampler(cfg_scale=args.cfg_scale, top_k=900, top_p=0.96)
    else:
        sampler = AutoregressiveSampler(cfg_scale=args.cfg_scale, num_tokens=args.num_tokens)

    def run(compile: bool):
        t, c = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            out = sampler(model, cond, torch.Generator().manual_seed(0), compile=compile)
        cpu, wall = time.process_time() - c, time.perf_counter() - t
        if compile and sampler.stats["compiled_graphs"] and calls:
            raise RuntimeError("a compiled call after the first compiled again (the cache missed)")
        calls.append(compile)
        out = torch.cat([x.flatten(1) for x in out], 1) if isinstance(out, list) else out
        return out, cpu, wall

    calls: list[bool] = []

    n_params = sum(q.numel() for q in model.parameters())
    print(f"{args.model} ({n_params / 1e6:.0f}M parameters), batch {args.batch}, cfg {args.cfg_scale}, "
          f"{'all scales' if var else f'{args.num_tokens} tokens'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), inductor cache {'fresh' if args.cold else 'as found'}")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    out_c, cpu, wall = run(True)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    kid_cpu = (kids.ru_utime + kids.ru_stime) - (children.ru_utime + children.ru_stime)
    print(f"first compiled call: wall {wall:.1f} s, process CPU {cpu:.1f} s, compiler child processes CPU "
          f"{kid_cpu:.1f} s; stats compile_s {sampler.stats['compile_s']:.1f} s, "
          f"{sampler.stats['compiled_graphs']} graph(s)")
    ratios, walls, same = [], [], True
    for i in range(args.pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        res = {flag: run(flag) for flag in order}
        (e_out, e_cpu, e_wall), (c_out, c_cpu, c_wall) = res[False], res[True]
        same &= bool(torch.equal(e_out, c_out)) and bool(torch.equal(c_out, out_c))
        ratios.append(e_cpu / c_cpu)
        walls.append(e_wall / c_wall)
        print(f"pair {i} ({'eager first' if i % 2 == 0 else 'compiled first'}): eager CPU {e_cpu:.2f} s "
              f"(wall {e_wall:.2f}), compiled CPU {c_cpu:.2f} s (wall {c_wall:.2f}), ratio {ratios[-1]:.3f}")
    print(f"eager / compiled process CPU: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, "
          f"max {max(ratios):.3f}); wall median {statistics.median(walls):.3f}; tokens identical in every pair: "
          f"{same}")


if __name__ == "__main__":
    main()
