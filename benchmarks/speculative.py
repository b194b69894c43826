"""Speed of lossless speculative / Jacobi decoding against the plain sampler (one thread, CPU by default).

For each batch size, ``--pairs`` A/B pairs run alternately in one process: A is ``"autoregressive"``,
B the speculative sampler (``--draft`` / ``--draft-preset``) or ``"jacobi"`` (``--sampler jacobi``), both
with the same options and seed. Reported per batch: median wall-clock and process CPU seconds of each,
the median of the per-pair A/B ratios (the speed-up), and B's statistics (acceptance, tokens per target
pass, target and draft passes). ``--pass-costs`` adds the cost of one model pass: a target step over 1
token (the plain sampler's pass) and over ``k + 1`` or ``window + 1`` tokens (a verify pass), and a draft
step, each the median of 20 calls at the middle of the image. With random weights the acceptance means
nothing (look at the pass costs); with trained models it is what the speed-up depends on.

    OMP_NUM_THREADS=1 python benchmarks/speculative.py --target shapes-llamagen --sampler jacobi --window 16
    OMP_NUM_THREADS=1 python benchmarks/speculative.py --target shapes-llamagen --draft runs/shapes_draft/final
    OMP_NUM_THREADS=1 python benchmarks/speculative.py --target-preset llamagen-gpt-b \\
        --draft-preset llamagen-gpt-tiny --draft-overrides dim=256,depth=4,num_heads=4 --num-tokens 32 --pass-costs
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from visar.conditions import Condition  # noqa: E402
from visar.nn.guidance import is_guided  # noqa: E402
from visar.samplers.autoregressive import AutoregressiveSampler  # noqa: E402
from visar.samplers.jacobi import JacobiSampler  # noqa: E402
from visar.samplers.speculative import SpeculativeSampler  # noqa: E402


def load_generator(path: str | None, preset: str | None, like=None, overrides: dict | None = None):
    """A generator from a bundled name / pipeline folder / generator folder, or a preset with random
    weights (a random head instead of LlamaGen's zero init; vocabulary, grid and classes of ``like``)."""
    from visar import zoo
    from visar.generators.base import Generator

    if path is not None:
        if path in zoo.BUNDLED:
            return zoo.load(path).generator
        return Generator.from_pretrained(path, "generator").eval()
    kw = dict(overrides or {})
    if like is not None:
        kw = dict(vocab_size=like.vocab_size, grid_size=like.grid_size, num_classes=like.num_classes, **kw)
    torch.manual_seed(0)
    model = zoo.create(preset, **kw).eval()
    if hasattr(model, "head"):
        torch.nn.init.normal_(model.head.weight, std=0.02)
    return model


def pipeline_cfg(target: str | None) -> float | None:
    """The ``cfg_scale`` a pipeline folder (or bundled name) stores in its sampling defaults, if any."""
    from visar import zoo

    if target is None:
        return None
    meta = (zoo.ASSETS / zoo.BUNDLED[target] if target in zoo.BUNDLED else Path(target)) / "pipeline.json"
    if not meta.is_file():
        return None
    return json.loads(meta.read_text()).get("sampling_defaults", {}).get("cfg_scale")


def parse_overrides(text: str | None) -> dict:
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        out[key] = json.loads(value)
    return out


def timed(fn, device: torch.device) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of ``fn()``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    w, c = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - w, time.process_time() - c


@torch.no_grad()
def pass_cost(model, batch: int, guided: bool, n: int, device: torch.device, repeats: int = 20) -> float:
    """Median seconds of one ``step`` feeding ``n`` tokens per row at the middle of the image."""
    cond = Condition.of(torch.arange(batch) % max(getattr(model, "num_classes", 1), 1)).to(device)
    state, first = model.start(cond, guided)
    R, L = first.shape[0], model.num_tokens
    pos0 = max(0, min(L // 2, L - n))
    model.step(state, torch.zeros(R, pos0 + n, dtype=torch.long, device=device), 0)  # fill the prefix
    inputs = torch.zeros(R, n, dtype=torch.long, device=device)
    pos = torch.full((R,), pos0, dtype=torch.long, device=device)
    times = [timed(lambda: model.step(state, inputs, pos), device)[0] for _ in range(repeats)]
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", help="bundled name, pipeline folder or generator folder")
    ap.add_argument("--target-preset", help="or a preset with random weights, e.g. llamagen-gpt-b")
    ap.add_argument("--draft", help="draft: pipeline folder or generator folder (generator.json/.safetensors)")
    ap.add_argument("--draft-preset", help="or a preset with random weights (vocabulary/grid/classes of the target)")
    ap.add_argument("--draft-overrides", help="constructor overrides of --draft-preset: dim=256,depth=4")
    ap.add_argument("--sampler", choices=("speculative", "jacobi"), default=None,
                    help="default: speculative with a draft, else jacobi")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--cfg-scale", type=float, default=None, help="default: the pipeline's, else 2.0")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--num-tokens", type=int, default=None, help="draw a prefix only (big models on a CPU)")
    ap.add_argument("--pass-costs", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if (args.target is None) == (args.target_preset is None):
        ap.error("give exactly one of --target and --target-preset")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    target = load_generator(args.target, args.target_preset).to(device)
    cfg = args.cfg_scale if args.cfg_scale is not None else pipeline_cfg(args.target)
    cfg = 2.0 if cfg is None else cfg
    draft = None
    if args.draft or args.draft_preset:
        draft = load_generator(args.draft, args.draft_preset, like=target,
                               overrides=parse_overrides(args.draft_overrides)).to(device)
    kind = args.sampler or ("speculative" if draft is not None else "jacobi")
    if kind == "speculative" and draft is None:
        ap.error("--sampler speculative needs --draft or --draft-preset")
    options = dict(cfg_scale=cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   num_tokens=args.num_tokens)
    plain = AutoregressiveSampler()
    fast = SpeculativeSampler(draft=draft, k=args.k) if kind == "speculative" else JacobiSampler(window=args.window)
    width = (args.k if kind == "speculative" else args.window) + 1
    report = dict(target=args.target or args.target_preset, draft=args.draft or args.draft_preset,
                  sampler=kind, k=args.k, window=args.window, options=options, threads=args.threads,
                  device=str(device), results=[])
    print(f"{kind} ({'k=' + str(args.k) if kind == 'speculative' else 'window=' + str(args.window)}) vs "
          f"autoregressive on {report['target']} (draft {report['draft']}), {options}, {args.threads} thread(s)")
    for B in args.batch:
        cond = Condition.of(torch.arange(B) % max(getattr(target, "num_classes", 1), 1)).to(device)
        rows = []
        for i in range(args.pairs):
            a = timed(lambda: plain(target, cond, torch.Generator(device).manual_seed(i), **options), device)
            b = timed(lambda: fast(target, cond, torch.Generator(device).manual_seed(i), **options), device)
            rows.append((a, b, dict(fast.stats)))
        med = lambda xs: statistics.median(xs)  # noqa: E731
        res = dict(
            batch=B,
            plain_wall_s=med([r[0][0] for r in rows]), plain_cpu_s=med([r[0][1] for r in rows]),
            fast_wall_s=med([r[1][0] for r in rows]), fast_cpu_s=med([r[1][1] for r in rows]),
            speedup_wall=med([r[0][0] / r[1][0] for r in rows]), speedup_cpu=med([r[0][1] / r[1][1] for r in rows]),
            acceptance_rate=med([r[2]["acceptance_rate"] for r in rows]),
            tokens_per_target_pass=med([r[2]["tokens_per_target_pass"] for r in rows]),
            target_passes=med([r[2]["target_passes"] for r in rows]),
            draft_passes=med([r[2]["draft_passes"] for r in rows]),
            plain_passes=plain.stats["model_passes"],
        )
        if args.pass_costs:
            guided = is_guided(cfg)
            res["target_pass_1_s"] = pass_cost(target, B, guided, 1, device)
            res[f"target_pass_{width}_s"] = pass_cost(target, B, guided, width, device)
            if draft is not None:
                res["draft_pass_1_s"] = pass_cost(draft, B, guided, 1, device)
        report["results"].append(res)
        print(f"batch {B}: plain {res['plain_wall_s']:.3f} s wall / {res['plain_cpu_s']:.3f} s CPU; {kind} "
              f"{res['fast_wall_s']:.3f} s / {res['fast_cpu_s']:.3f} s; speed-up (median of {args.pairs} pairs) "
              f"wall {res['speedup_wall']:.2f}x, CPU {res['speedup_cpu']:.2f}x; acceptance "
              f"{res['acceptance_rate']:.3f}, tokens/target pass {res['tokens_per_target_pass']:.2f}, "
              f"target passes {res['target_passes']:g} (plain {res['plain_passes']}), draft passes "
              f"{res['draft_passes']:g}")
        if args.pass_costs:
            line = (f"  pass cost: target 1 token {1e3 * res['target_pass_1_s']:.2f} ms, {width} tokens "
                    f"{1e3 * res[f'target_pass_{width}_s']:.2f} ms")
            if draft is not None:
                line += f", draft 1 token {1e3 * res['draft_pass_1_s']:.2f} ms"
            print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
