"""visar's default samplers against the official ones, side by side, on the same weights and seeds.

Given a local checkout of an official repository (``--official PATH``; nothing is downloaded) this builds the
official model (``--checkpoint FILE`` for real weights, else seeded random weights: the official constructor
and init under ``torch.manual_seed(--seed)``, then every all-zero parameter -- LlamaGen's output layer,
adaLN-zero gates, zero biases -- refilled from ``N(0, 0.02)`` so that nothing is trivially constant),
saves its state dict in the release format, loads that file into visar through the converter
(``visar.convert.<family>.load_generator``), and then, per batch size:

* one untimed warm-up run of each side, whose outputs must agree (below); a second visar configuration
  (``--visar-option`` / ``--visar-best``, e.g. ``compile=True``) reports its first run apart (compile time);
* ``--pairs`` timed rounds: the official sampler and visar's default sampler (and the second configuration)
  in rotating order, each round with its own seed shared by every side; every round's outputs are compared;
* the median, min and max over the rounds of ``official / visar`` for process CPU time (the figure to trust
  on a loaded machine) and wall time;
* a bandwidth roofline: the weight bytes every network pass reads (counted with forward hooks on visar's
  model during the warm-up run; embedding tables and positional tables are excluded, only their rows
  are read), divided by the memory bandwidth measured in this process with a large-tensor copy
  (``2 x bytes / time``, best of the measurements before and after each batch, in process CPU time).
  ``roof s`` is that lower bound for the whole sample on one thread, ``visar/roof`` how far visar's CPU
  time is from it; a second table gives it per pass (a decode step of LlamaGen, a scale of VAR);
* a compute bound next to it: the FLOPs of the sample's matmuls, convolutions and attention, counted on both
  sides during the warm-up runs (``torch.utils.flop_counter``; elementwise work not counted), visar's over
  the float32 GEMM rate of one thread measured with a 1024^3 matmul (``GEMM roof s``). Batch-1 decode
  steps are bandwidth-bound, the rest compute-bound.

Agreement ("parity holds"): LlamaGen tokens identical; VAR images within 2e-4 (its fixture tolerance, the
official sampler returns decoded images); MAR, FlowAR and xAR latents with ``max|a - b| <= 1e-4 max|ref|``.

Settings (official defaults; ``--num-steps`` / ``--num-iter`` / ``--num-tokens`` reduce them for CPU time):

* llamagen (gpt-b, gpt-l): cfg 4, top-k 0, top-p 1, temperature 1, 256 tokens (official ``generate`` of
  ``autoregressive/models/generate.py``; visar ``autoregressive``);
* var (d16, d20): cfg 1.5 (visar ``cfg_scale=2.5``), top-k 900, top-p 0.96, VQVAE decode included
  (``autoregressive_infer_cfg``; visar ``next_scale`` then ``tokenizer.decode``);
* mar (mar-b): 16 iterations x 50 diffusion steps, cfg 3 linear, temperature 1 (``sample_tokens``; ``masked``);
* flowar (flowar-s): 25 steps per scale, cfg 4.3, guidance 0.9 (``sample_tokens``; ``next_scale_flow``);
* xar (xar-b): 10 steps per entity, cfg 2.7 (``sample_tokens``; ``next_x``).

``tiny`` (every family) is the parity fixtures' configuration, for smoke runs. Requirements beyond visar:
the official checkout, ``timm`` (MAR, FlowAR, xAR) and ``einops`` (FlowAR, xAR) -- benchmark-only
dependencies. xAR imports ``flash_attn`` without calling it: an empty stand-in module exists while the official
xAR is imported. The official MAR/FlowAR/xAR code calls ``.cuda()``: without a GPU ``Tensor.cuda`` is made the
identity. ``--gemm-probe`` times visar's linear weights with 1-32 rows as ``F.linear`` and as ``mm(W, x^T)``
(``--batch`` with no value runs only the probe). Results: ``docs/performance.md``.

    OMP_NUM_THREADS=1 python benchmarks/vs_official.py --official /tmp/official/llamagen --family llamagen \\
        --size gpt-b --batch 1 16 --pairs 5 --json runs/vs_official/llamagen_gpt-b.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # compile in this process: the machine is shared

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # official_families, next to this file
from official_families import FAMILIES, Family, import_official, labels_for, refill_zero_parameters  # noqa: E402

# ---------------------------------------------------------------------------------------------- helpers
def measure_bandwidth(mib: int = 256, repeats: int = 9) -> float:
    """Memory bandwidth in bytes/s on this thread: best of ``repeats`` copies of a ``mib`` MiB float32
    tensor, counting the bytes read plus the bytes written, timed in process CPU time (on a loaded machine
    wall time counts other processes' turns: 6.5 vs 39 GB/s measured side by side)."""
    src = torch.ones(mib * 2 ** 20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        dst.copy_(src)
        best = min(best, time.process_time() - t0)
    return 2 * src.numel() * src.element_size() / best


def measure_matmul_rate(n: int = 1024, repeats: int = 20) -> float:
    """Float32 GEMM rate in FLOP/s on this thread: best of ``repeats`` ``n x n x n`` matmuls, timed in
    process CPU time like the samplers."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        a @ b
        best = min(best, time.process_time() - t0)
    return 2 * n ** 3 / best


class PassCounter:
    """Forward-hook counters on visar's model: ``groups`` is ``[(name, hooked module, weight bytes per call)]``,
    one hooked module per network pass (a module every pass calls exactly once), so ``calls[name]`` counts
    passes and :meth:`total_bytes` the weight bytes they read."""

    def __init__(self, groups):
        self.groups = groups
        self.calls = {name: 0 for name, _, _ in groups}
        self.handles = []

    def __enter__(self):
        for name, mod, _ in self.groups:
            self.handles.append(mod.register_forward_hook(lambda *a, name=name: self._hit(name)))
        return self

    def _hit(self, name):
        self.calls[name] += 1

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def total_bytes(self) -> int:
        return sum(self.calls[name] * b for name, _, b in self.groups)


def flop_counter():
    """``torch.utils.flop_counter.FlopCounterMode`` counting matmuls, convolutions and attention (the CPU
    fused attention kernel added to its table, as ``4 x B x H x Lq x Lk x D`` like the GPU kernels; masked
    positions count: the work is done). Elementwise work and sampling are not counted."""
    import torch.utils.flop_counter as fc

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    return fc.FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa})


def gemm_probe(model: nn.Module, rows=(1, 2, 4, 8, 16, 32), repeats: int = 5, bandwidth: float | None = None) -> list:
    """Time one pass over every ``nn.Linear`` weight of ``model`` (weights streamed from memory, as in a decode
    step) with ``rows`` input rows, computed as ``F.linear(x, W)`` (what every linear layer runs) and as
    ``mm(W, x^T)^T`` (the same product with the big matrix as the first operand); best of ``repeats``,
    process CPU time. Returns ``[{rows, linear_s, mm_wxt_s}]`` and prints a table."""
    import torch.nn.functional as F

    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear) and m.weight.numel() >= 2 ** 16]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    out = []
    print(f"GEMM probe: {len(weights)} linear weights, {nbytes / 2 ** 20:.0f} MiB per pass"
          + (f", bandwidth bound {nbytes / bandwidth * 1e3:.1f} ms" if bandwidth else ""))
    for m in rows:
        xs = {k: torch.randn(m, k) for k in {w.shape[1] for w in weights}}
        best = {"linear": float("inf"), "mm_wxt": float("inf")}
        for _ in range(repeats):
            for kind in best:
                t0 = time.process_time()
                for w in weights:
                    x = xs[w.shape[1]]
                    F.linear(x, w) if kind == "linear" else torch.mm(w, x.t())
                best[kind] = min(best[kind], time.process_time() - t0)
        out.append(dict(rows=m, linear_s=best["linear"], mm_wxt_s=best["mm_wxt"]))
        print(f"  rows {m:3d}: F.linear {best['linear'] * 1e3:7.1f} ms   mm(W, x^T) {best['mm_wxt'] * 1e3:7.1f} ms   "
              f"ratio {best['linear'] / best['mm_wxt']:.2f}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- driver
def load_official(model: nn.Module, path: Path) -> None:
    """Load a release file into the official model (``model_ema`` / ``model`` entries or a bare state dict);
    keys the official code itself would not load strictly (LlamaGen's ``freqs_cis``) are reported, not fatal."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("model_ema", obj.get("model", obj)) if isinstance(obj, dict) else obj
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        print(f"{path}: {len(missing)} missing keys {missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}")



def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def summary(xs: list[float]) -> dict:
    return dict(median=statistics.median(xs), min=min(xs), max=max(xs))


def parse_options(items: list[str]) -> dict:
    """``["compile=True", "num_steps=4"]`` -> ``{"compile": True, "num_steps": 4}`` (values as Python
    literals, else strings). Raises ``ValueError`` naming the item that is not ``KEY=VALUE``."""
    import ast

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"--visar-option {item!r}: give KEY=VALUE with a sampler option name, e.g. compile=True")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def pair_orders(sides: list[str], pairs: int) -> list[tuple[str, ...]]:
    """The run order of each timed pair (a triple with a second visar configuration): rotated every pair,
    and reversed every other rotation, so that every side runs first, middle and last equally often."""
    orders = []
    n = len(sides)
    for i in range(pairs):
        rot = sides[i % n:] + sides[:i % n]
        orders.append(tuple(rot if (i // n) % 2 == 0 else rot[::-1]))
    return orders


def roof_per_pass(groups: list, calls: dict, bandwidth: float) -> list[dict]:
    """Per network-pass group: weight bytes one pass reads, passes counted, and that pass's bandwidth
    bound ``bytes / bandwidth`` in seconds."""
    return [dict(group=name, bytes_per_pass=b, passes=calls[name], roof_per_pass_s=b / bandwidth)
            for name, _, b in groups]


def bench_batch(fam: Family, batch: int, pairs: int, seed: int, rates: dict, variants: dict) -> dict:
    """Warm-up and agreement, then ``pairs`` timed rounds of the official sampler and every visar
    configuration in ``variants`` (``{"visar": sampler, "visar_best": sampler}``), in rotating order, each
    round with its own seed shared by every side. ``rates`` holds the machine's measured ``bandwidth``
    (bytes/s) and ``matmul`` (FLOP/s), both updated here (the best seen in this process)."""
    labels = labels_for(batch)
    sides = ["official", *variants]
    run = {"official": fam.run_official,
           **{k: (lambda lab, s, smp=smp: fam.run_visar(lab, s, smp)) for k, smp in variants.items()}}
    first, agree_all, detail = {}, {k: [] for k in variants}, {}
    groups = fam.pass_groups()
    with torch.no_grad():
        with flop_counter() as official_flops:  # the warm-up runs are not timed against each other
            off, *first["official"] = timed(lambda: run["official"](labels, seed))
        for k in variants:
            if k == "visar":
                with PassCounter(groups) as counter, flop_counter() as visar_flops:
                    ours, *first[k] = timed(lambda: run[k](labels, seed))
            else:  # the first run of a compiled configuration includes its compile time
                ours, *first[k] = timed(lambda k=k: run[k](labels, seed))
            smp = variants[k]
            compile_s = getattr(getattr(smp, "sampler", smp), "stats", {}).get("compile_s")
            first[k].append(compile_s)
            ok, detail[k] = fam.agree(off, ours)
            agree_all[k].append(ok)
            print(f"  batch {batch} first run {k}: {first[k][1]:.2f} s CPU, {first[k][0]:.2f} s wall"
                  + (f" (compiling {compile_s:.1f} s)" if compile_s else "")
                  + f"; agrees with the official: {'yes' if ok else 'NO'} ({detail[k]})", flush=True)
    rows = []
    for i, order in enumerate(pair_orders(sides, pairs)):
        s = seed + 1 + i
        res = {}
        with torch.no_grad():
            for side in order:
                res[side] = timed(lambda side=side: run[side](labels, s))
        row = dict(seed=s, order=list(order))
        for side in sides:
            row[f"{side}_wall"], row[f"{side}_cpu"] = res[side][1], res[side][2]
        for k in variants:
            agree_all[k].append(fam.agree(res["official"][0], res[k][0])[0])
        rows.append(row)
        print(f"  batch {batch} pair {i}: official {row['official_cpu']:.2f} s CPU / "
              + " / ".join(f"{k} {row[f'{k}_cpu']:.2f} s = {row['official_cpu'] / row[f'{k}_cpu']:.3f}x"
                           for k in variants), flush=True)
    rates["bandwidth"] = max(rates["bandwidth"], measure_bandwidth())
    rates["matmul"] = max(rates["matmul"], measure_matmul_rate())
    roof = counter.total_bytes() / rates["bandwidth"]
    flops = dict(official=official_flops.get_total_flops(), visar=visar_flops.get_total_flops())
    flop_roof = flops["visar"] / rates["matmul"]
    med = {f"{side}_{t}": statistics.median(r[f"{side}_{t}"] for r in rows) for side in sides for t in ("cpu", "wall")}
    first["official"].append(None)
    first_run = {k: dict(wall=v[0], cpu=v[1], compile_s=v[2]) for k, v in first.items()}
    out = dict(batch=batch, pairs=rows, first_run=first_run,
               passes=dict(counter.calls), weight_bytes_read=counter.total_bytes(), roofline_s=roof,
               per_pass=roof_per_pass(groups, counter.calls, rates["bandwidth"]),
               flops=flops, gemm_roof_s=flop_roof, **med, variants={})
    for k in variants:
        out["variants"][k] = dict(
            cpu_ratio=summary([r["official_cpu"] / r[f"{k}_cpu"] for r in rows]),
            wall_ratio=summary([r["official_wall"] / r[f"{k}_wall"] for r in rows]),
            over_roofline=med[f"{k}_cpu"] / roof, over_gemm_roof=med[f"{k}_cpu"] / flop_roof,
            agree=all(agree_all[k]), agree_detail=detail[k], agree_pairs=f"{sum(agree_all[k])}/{len(agree_all[k])}")
    return out


def format_rows(fam: Family, size: str, r: dict) -> list[str]:
    lines = []
    for k, v in r["variants"].items():
        c, w = v["cpu_ratio"], v["wall_ratio"]
        lines.append(
            f"| {fam.name} {size} | {r['batch']} | {k} | {r['official_cpu']:.2f} | {r[f'{k}_cpu']:.2f} | "
            f"**{c['median']:.2f}x** [{c['min']:.2f}, {c['max']:.2f}] | {w['median']:.2f}x [{w['min']:.2f}, "
            f"{w['max']:.2f}] | {r['flops']['official'] / 1e9:.1f} / {r['flops']['visar'] / 1e9:.1f} | "
            f"{r['roofline_s']:.2f} | {v['over_roofline']:.1f}x | {r['gemm_roof_s']:.2f} | "
            f"{v['over_gemm_roof']:.1f}x | {'yes' if v['agree'] else 'NO'} ({v['agree_pairs']}; {v['agree_detail']}) |")
    return lines


HEADER = ("| case | batch | visar config | official CPU s | visar CPU s | official/visar CPU (median [min, max]) | "
          "wall ratio | GFLOP official / visar | roof s | visar/roof | GEMM roof s | visar/GEMM roof | "
          "outputs agree |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")

ROOF_HEADER = ("| case | batch | pass | weight MiB per pass | passes per sample | roof ms per pass | "
               "visar CPU ms per pass | official CPU ms per pass |\n|---|---|---|---|---|---|---|---|")


def format_roof_rows(fam: Family, size: str, r: dict) -> list[str]:
    """One row per pass group. Where one kind of pass makes the sample (LlamaGen, VAR, xAR) the measured ms
    per pass is the sample's median CPU time over its passes (so it also carries sampling, attention,
    VAR's VQVAE decode); with two kinds (MAR's and FlowAR's trunk and head) it is not split, shown as ``-``."""
    total = sum(g["passes"] for g in r["per_pass"])
    single = len(r["per_pass"]) == 1
    lines = []
    for g in r["per_pass"]:
        measured = (f"{r['visar_cpu'] / total * 1e3:.1f} | {r['official_cpu'] / total * 1e3:.1f}" if single
                    else "- | -")
        lines.append(f"| {fam.name} {size} | {r['batch']} | {g['group']} | {g['bytes_per_pass'] / 2 ** 20:.1f} | "
                     f"{g['passes']} | {g['roof_per_pass_s'] * 1e3:.1f} | {measured} |")
    return lines


#: what ``--visar-best`` adds to the default sampler, where the installed visar's sampler takes the option
BEST_OPTIONS = {"compile": True}


def best_options(fam: Family) -> dict:
    """The :data:`BEST_OPTIONS` that this family's default sampler takes (``{}`` when none)."""
    from visar.samplers.base import default_sampler

    takes = default_sampler(fam.ours).defaults
    return {k: v for k, v in BEST_OPTIONS.items() if k in takes}


def fast_linear_context():
    """``visar.ops.fast_small_linear`` (the opt-in small-row CPU linear route); ``SystemExit`` where the
    installed visar has none."""
    try:
        from visar.ops import fast_small_linear
    except ImportError:
        raise SystemExit("--visar-fast-linear / --visar-best: this visar has no visar.ops.fast_small_linear") from None
    return fast_small_linear


def visar_revision() -> str:
    """``git describe --always --dirty`` of the visar checkout next to this script (``"?"`` outside git)."""
    import subprocess

    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=30).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


class WithContext:
    """A sampler called inside ``context()`` (e.g. ``visar.ops.fast_small_linear``)."""

    def __init__(self, sampler, context):
        self.sampler, self.context = sampler, context

    def __call__(self, *args, **kwargs):
        with self.context():
            return self.sampler(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", type=Path, required=True, help="extracted checkout of the official repository")
    ap.add_argument("--family", choices=sorted(FAMILIES), required=True)
    ap.add_argument("--size", required=True, help="gpt-b, gpt-l (llamagen); d16, d20 (var); mar-b; flowar-s; "
                                                  "xar-b; tiny (any family: the parity fixtures' configuration)")
    ap.add_argument("--checkpoint", type=Path, help="official weights (release format); default: seeded random")
    ap.add_argument("--vae-checkpoint", type=Path, help="VAR only, with --checkpoint: the official VQVAE weights")
    ap.add_argument("--batch", type=int, nargs="*", default=[1], help="batch sizes (none: only --gemm-probe)")
    ap.add_argument("--pairs", type=int, default=5, help="timed official/visar pairs per batch (>= 5 to report)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--num-steps", dest="num_steps", type=int, help="MAR diffusion / FlowAR Euler / xAR steps")
    ap.add_argument("--num-iter", dest="num_iter", type=int, help="MAR iterations")
    ap.add_argument("--num-tokens", dest="num_tokens", type=int, help="LlamaGen tokens (prefix of the image)")
    ap.add_argument("--visar-option", dest="visar_option", action="append", default=[], metavar="KEY=VALUE",
                    help="time a second visar configuration too: the default sampler with these options (repeatable, "
                         "e.g. compile=True); reported as 'visar_best' next to plain 'visar'")
    ap.add_argument("--visar-fast-linear", action="store_true",
                    help="run the second configuration inside visar.ops.fast_small_linear() (the opt-in small-row "
                         "CPU linear route)")
    ap.add_argument("--visar-best", action="store_true",
                    help=f"the second configuration is visar's best: the options of {BEST_OPTIONS} that the "
                         "family's default sampler takes and --visar-fast-linear (--visar-option adds to them)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--gemm-probe", action="store_true", help="also time one pass over visar's linear weights "
                    "with 1-32 rows as F.linear and as mm(W, x^T) (the small-row GEMM cost, see docs/performance.md)")
    return ap


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """Validate ``args`` before any model is built (``ap.error`` exits with status 2 and one line);
    returns the parsed ``--visar-option`` items."""
    fam_cls = FAMILIES[args.family]
    if args.size not in fam_cls.sizes:
        ap.error(f"--size {args.size!r} is not one of {sorted(fam_cls.sizes)} for {args.family}")
    if args.pairs < 1:
        ap.error("--pairs must be >= 1 (reported figures use >= 5)")
    if args.threads < 1:
        ap.error("--threads must be >= 1")
    if any(b < 1 for b in args.batch):
        ap.error(f"--batch sizes must be >= 1, got {args.batch}")
    for name in ("num_steps", "num_iter", "num_tokens"):
        v = getattr(args, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.family == "xar" and args.num_steps is not None and args.num_steps < 3:
        ap.error("--num-steps must be >= 3 for xar (the official sampler needs three points per entity)")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        ap.error(f"--checkpoint {args.checkpoint}: no such file")
    if args.vae_checkpoint is not None and args.family != "var":
        ap.error("--vae-checkpoint is for --family var only")
    if args.family == "var" and args.checkpoint is not None and args.vae_checkpoint is None:
        ap.error("--family var with --checkpoint needs --vae-checkpoint (the official vae_ch160v4096z32.pth)")
    if not args.official.is_dir():
        ap.error(f"--official {args.official}: not a folder (give an extracted checkout of the official repository)")
    try:
        return parse_options(args.visar_option)
    except ValueError as e:
        ap.error(str(e))


def main(argv=None) -> dict:
    ap = build_parser()
    args = ap.parse_args(argv)
    extra = check_args(ap, args)
    fam_cls = FAMILIES[args.family]
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import_official(args.official)
    fam = fam_cls(args)

    rates = dict(bandwidth=measure_bandwidth(), matmul=measure_matmul_rate())
    print(f"memory bandwidth (copy, 1 thread): {rates['bandwidth'] / 1e9:.1f} GB/s; float32 GEMM "
          f"{rates['matmul'] / 1e9:.1f} GFLOP/s (measured again after each batch; the best is used)", flush=True)
    torch.manual_seed(args.seed)
    fam.official = fam.build_official(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "official.pth"
        if args.checkpoint is not None:
            load_official(fam.official, args.checkpoint)
            if hasattr(fam, "vae"):
                load_official(fam.vae, args.vae_checkpoint)
            refilled = 0
        else:
            refilled = refill_zero_parameters(fam.official, args.seed)
            if hasattr(fam, "vae"):
                refilled += refill_zero_parameters(fam.vae, args.seed + 7)
        fam.official.eval()
        fam.save_official(fam.official, path)
        fam.ours = fam.load_visar(path).eval()
    n_params = sum(p.numel() for p in fam.official.parameters())
    print(f"{args.family} {args.size}: {n_params / 1e6:.1f} M official parameters ({refilled} all-zero tensors "
          f"refilled), settings {fam.settings}", flush=True)

    variants = {"visar": fam.make_sampler()}
    best = {**(best_options(fam) if args.visar_best else {}), **extra}
    fast_linear = args.visar_fast_linear or args.visar_best
    if best or fast_linear:
        try:
            variants["visar_best"] = fam.make_sampler(best)
        except (TypeError, ValueError) as e:
            ap.error(f"--visar-option / --visar-best: {e}")
        if fast_linear:
            variants["visar_best"] = WithContext(variants["visar_best"], fast_linear_context())
        print(f"visar_best: the default sampler with {best or 'its defaults'}"
              f"{', inside visar.ops.fast_small_linear()' if fast_linear else ''}", flush=True)

    probe = gemm_probe(fam.ours, bandwidth=rates["bandwidth"]) if args.gemm_probe else None
    results = []
    for batch in args.batch:
        results.append(bench_batch(fam, batch, args.pairs, args.seed, rates, variants))
    if results:
        print("\n" + HEADER)
        for r in results:
            print("\n".join(format_rows(fam, args.size, r)))
        print("\n" + ROOF_HEADER)
        for r in results:
            print("\n".join(format_roof_rows(fam, args.size, r)))
    report = dict(family=args.family, size=args.size, settings=fam.settings, visar_best_options=best or None,
                  visar_best_fast_linear=fast_linear if len(variants) > 1 else None, visar_revision=visar_revision(),
                  official=str(args.official), checkpoint=str(args.checkpoint) if args.checkpoint else None,
                  seed=args.seed, threads=args.threads, bandwidth_bytes_per_s=rates["bandwidth"],
                  matmul_flop_per_s=rates["matmul"], params=n_params, refilled=refilled, torch=torch.__version__,
                  machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                  date=time.strftime("%Y-%m-%d %H:%M"), command=" ".join(sys.argv), results=results, gemm_probe=probe)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
