"""Continuous speculative decoding (``cspd``) vs the plain sampler of the same target: speed and counts.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/speculative_continuous.py --pairs 5 --batches 1 16

Tiny random models on one CPU thread, float32: ``mar-ar-tiny`` (causal, 64 tokens) with a smaller draft
(width 32, 1 block, head 32 x 1), and ``mar-tiny`` (MAR, 64 tokens) with a smaller draft head (16 x 1).
The baseline is the target's plain sampler with ``final_noise=True`` (``continuous_ar`` / ``masked``),
i.e. the law ``cspd`` reproduces. Plain and ``cspd`` alternate inside one process after a warm-up; the
report gives the median wall time and process CPU time of each and the median of the per-pair ratios
(plain / cspd, > 1 = cspd faster), plus ``cspd``'s counts.

**Acceptance with random weights is meaningless**, so two head regimes bracket it:

* ``zero``: MAR's initialisation zeroes the head's output layer, so every head predicts ``eps = 0`` whatever
  its conditioning; draft and target heads then agree exactly and every draft is accepted (the ceiling:
  ``k + 1`` tokens per target pass);
* ``random``: the heads' linear layers re-drawn from ``N(0, 0.05^2)``: draft and target disagree and almost
  nothing is accepted (the floor: one token per target pass plus the draft's cost).

Real speed-ups sit between the two and depend on trained models: ``--target PATH --draft PATH`` runs two
trained pipeline folders instead (e.g. the MAR shapes generator of ``configs/mar_shapes.yaml`` and its draft
``configs/mar_shapes_draft.yaml``), with the pipeline's stored sampling options (guidance, schedule, head
steps), ``--final-std`` as the std of both flow heads' last step (a flow head's last step is noise-free
by default, and ``cspd`` needs a Gaussian one), ``--relaxation`` for the lossy public rule next to the
exact one, and ``--fidelity N`` for the class fidelity of ``N`` images of each sampler (bundled shapes
classifier; the lossless samplers must agree within sampling noise)::

    OMP_NUM_THREADS=1 python benchmarks/speculative_continuous.py --target runs/mar_shapes_m1/export \
        --draft runs/mar_shapes_draft/export --final-std 0.1 --batches 1 16 --relaxation 0.5 --fidelity 200

The cost per pass (one transformer step, one head chain) is measured separately and printed, so the
timings can be read as ``rounds * (k * (draft step + draft chain) + target step + target chain on k + 1 tokens)``.
For MAR, ``cspd`` reproduces the target's ``num_iter``-step law (each block in one target step), which the
plain sampler gets with the same target passes and no draft; the plain sampler at ``num_iter * k`` steps
(a *different*, finer law, the public method's comparison) is reported too.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from visar import zoo  # noqa: E402
from visar.conditions import Condition  # noqa: E402
from visar.samplers.base import get_sampler  # noqa: E402
from visar.samplers.continuous_speculative import model_layout  # noqa: E402
from visar.samplers.heads import sample_head  # noqa: E402


def randomise_heads(model: nn.Module, std: float = 0.05) -> None:
    """Re-draw every linear weight of the model's head from ``N(0, std^2)`` (MAR's init zeroes its output)."""
    for mod in model.head.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=std)


def models(layout: str, regime: str, steps: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    if layout == "causal":
        target = zoo.create("mar-ar-tiny", num_sampling_steps=steps)
        draft = zoo.create("mar-ar-tiny", dim=32, depth=1, num_heads=2, head_width=32, head_depth=1,
                           num_sampling_steps=steps)
    else:
        target = zoo.create("mar-tiny", num_sampling_steps=steps)
        draft = zoo.create("mar-tiny", encoder_embed_dim=16, encoder_depth=1, decoder_embed_dim=16, decoder_depth=1,
                           diffloss_w=16, diffloss_d=1, num_sampling_steps=steps)
    if regime == "random":
        randomise_heads(target)
        randomise_heads(draft)
    return target.eval(), draft.eval()


def trained_models(target_path: str, draft_path: str, final_std: float | None):
    """Two trained pipeline folders: ``(target generator, draft generator, target pipeline)``, evaluation
    mode; ``final_std`` (if given) becomes the last-step std of both heads."""
    pipe = zoo.load(target_path)
    draft = zoo.load(draft_path).generator.eval()
    target = pipe.generator.eval()
    if final_std is not None:
        if not final_std > 0:
            raise SystemExit(f"--final-std must be > 0, got {final_std}")
        for model in (target, draft):
            if not hasattr(model.head, "final_std"):
                raise SystemExit(f"{type(model.head).__name__} has no final_std to set")
            model.head.final_std = float(final_std)
    return target, draft, pipe


def fidelity(pipe, sampler, num: int, batch: int, opts: dict) -> float:
    """Class fidelity of ``num`` images (labels ``i % 10``) drawn with ``sampler`` and ``opts``."""
    from visar.eval.classifier import class_fidelity
    from visar.eval.sampling import chunk_seed, class_labels

    labels = class_labels("balanced", num, pipe.generator.num_classes)
    with torch.no_grad():
        images = torch.cat([pipe.generate(labels[s:s + batch], seed=chunk_seed(0, s), sampler=sampler,
                                          **opts).float() for s in range(0, num, batch)])
    return class_fidelity(images, labels)


def clock(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def pass_costs(target, draft, layout: str, batch: int, k: int, reps: int = 5) -> dict[str, float]:
    """Milliseconds of one transformer step and one head chain of each model (median of ``reps``)."""
    cond = Condition.of([i % 10 for i in range(batch)])
    C = target.token_dim
    out = {}
    with torch.no_grad():
        for name, model, width in (("target", target, k + 1), ("draft", draft, 1)):
            if layout == "causal":
                state, _ = model.start(cond)
                def step(model=model, width=width, state=state):  # a window of `width` tokens at position 0
                    model.step(state, torch.zeros(batch, width, C), 0)
            else:
                state = model.start(cond)
                def step(model=model, state=state):
                    model.step(state, torch.zeros(batch, model.num_tokens, C),
                               torch.ones(batch, model.num_tokens, dtype=torch.bool))
            z = torch.randn(batch * (k + 1 if name == "target" else 1), model.head.net.cond_embed.in_features)
            chain = (lambda model=model, z=z: sample_head(model.head, z, final_noise=True))
            out[f"{name}_step_ms"] = 1e3 * statistics.median(clock(step)[0] for _ in range(reps))
            out[f"{name}_chain_ms"] = 1e3 * statistics.median(clock(chain)[0] for _ in range(reps))
    return out


def compare(target, draft, layout: str, batch: int, pairs: int, opts: dict, plain_opts: dict) -> dict:
    cond = Condition.of([i % 10 for i in range(batch)])
    plain = get_sampler("continuous_ar" if layout == "causal" else "masked", final_noise=True)
    spec = get_sampler("cspd", draft=draft)

    def run_a():
        plain(target, cond, torch.Generator().manual_seed(0), **plain_opts)

    def run_b():
        spec(target, cond, torch.Generator().manual_seed(0), **opts)

    run_a(), run_b()  # warm-up
    a, b = [], []
    for _ in range(pairs):
        a.append(clock(run_a))
        b.append(clock(run_b))
    return {"plain_wall": statistics.median(x[0] for x in a), "cspd_wall": statistics.median(x[0] for x in b),
            "wall_speedup": statistics.median(x[0] / y[0] for x, y in zip(a, b)),
            "cpu_speedup": statistics.median(x[1] / y[1] for x, y in zip(a, b)), "stats": dict(spec.stats)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=5, help="alternating plain/cspd pairs (median ratio)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--k", type=int, default=4, help="draft length (causal) / draft steps per target step (MAR)")
    ap.add_argument("--steps", type=int, default=20, help="head denoising steps of both models")
    ap.add_argument("--num-iter", type=int, default=8, help="MAR target steps")
    ap.add_argument("--cfg", type=float, default=1.0, help="guidance scale (1 = none)")
    ap.add_argument("--layouts", nargs="+", default=["causal", "masked"], choices=["causal", "masked"])
    ap.add_argument("--regimes", nargs="+", default=["zero", "random"], choices=["zero", "random"])
    ap.add_argument("--target", help="a trained pipeline folder as target (with --draft) instead of the random toys")
    ap.add_argument("--draft", help="a trained pipeline folder whose generator is the draft (with --target)")
    ap.add_argument("--final-std", type=float, default=None,
                    help="trained mode: std of both heads' last step (needed for flow heads, whose default is 0)")
    ap.add_argument("--relaxation", type=float, default=None,
                    help="trained mode: also run the lossy public rule with this lambda")
    ap.add_argument("--fidelity", type=int, default=0,
                    help="trained mode: class fidelity of this many images per sampler (multiple of 10)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if (args.target is None) != (args.draft is None):
        raise SystemExit("--target and --draft go together")
    if args.target is not None:
        return main_trained(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, k={args.k}, head steps {args.steps}, "
          f"cfg {args.cfg}, {args.pairs} pairs; ratios are plain / cspd (> 1: cspd faster)")
    for layout in args.layouts:
        for regime in args.regimes:
            target, draft = models(layout, regime, args.steps)
            for batch in args.batches:
                opts = dict(k=args.k, cfg_scale=args.cfg)
                plain_opts = dict(cfg_scale=args.cfg)
                if layout == "masked":
                    opts["num_iter"] = plain_opts["num_iter"] = args.num_iter
                r = compare(target, draft, layout, batch, args.pairs, opts, plain_opts)
                s = r["stats"]
                print(f"[{layout} {regime:6s} B={batch:2d}] plain {r['plain_wall']:.3f}s  cspd {r['cspd_wall']:.3f}s  "
                      f"wall x{r['wall_speedup']:.2f}  cpu x{r['cpu_speedup']:.2f} | acceptance "
                      f"{s['test_acceptance']:.2f}, tokens/target pass {s['tokens_per_target_pass']:.2f}, "
                      f"target passes {s['target_passes']}, draft passes {s['draft_passes']}, "
                      f"residual proposals {s['residual_proposals']}")
                costs = pass_costs(target, draft, layout, batch, args.k)
                print("    cost per pass (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()))
                if layout == "masked":
                    fine = compare(target, draft, layout, batch, args.pairs, opts,
                                   dict(plain_opts, num_iter=args.num_iter * args.k))
                    print(f"    vs plain at num_iter={args.num_iter * args.k} (a finer, different law): "
                          f"wall x{fine['wall_speedup']:.2f}  cpu x{fine['cpu_speedup']:.2f}")


def main_trained(args: argparse.Namespace) -> None:
    """``--target``/``--draft`` mode: two trained pipelines with their stored sampling options."""
    if args.fidelity < 0 or args.fidelity % 10:
        raise SystemExit(f"--fidelity {args.fidelity} must be a multiple of 10 (balanced labels)")
    target, draft, pipe = trained_models(args.target, args.draft, args.final_std)
    layout = model_layout(target)
    if layout is None:
        raise SystemExit(f"{args.target}: {type(target).__name__} is neither a causal continuous nor a MAR model")
    stored = {k: v for k, v in pipe.sampling_defaults.items()
              if k in ("cfg_scale", "cfg_schedule", "temperature", "num_steps", "num_iter")}
    plain_opts = dict(stored)
    opts = dict(stored, k=args.k)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread; target {args.target} "
          f"({sum(p.numel() for p in target.parameters()) / 1e6:.2f}M), draft {args.draft} "
          f"({sum(p.numel() for p in draft.parameters()) / 1e6:.2f}M), layout {layout}, final_std "
          f"{args.final_std}, k={args.k}, options {stored}, {args.pairs} pairs; ratios plain / cspd (> 1: cspd faster)")
    variants = [("exact", {})]
    if args.relaxation is not None:
        variants.append((f"lossy lambda={args.relaxation}", {"relaxation": args.relaxation, "lossy": True}))
    for batch in args.batches:
        for name, extra in variants:
            r = compare(target, draft, layout, batch, args.pairs, dict(opts, **extra), plain_opts)
            s = r["stats"]
            print(f"[{name} B={batch:2d}] plain {r['plain_wall']:.3f}s  cspd {r['cspd_wall']:.3f}s  wall "
                  f"x{r['wall_speedup']:.2f}  cpu x{r['cpu_speedup']:.2f} | acceptance {s['test_acceptance']:.3f}, "
                  f"tokens/target pass {s['tokens_per_target_pass']:.2f}, target passes {s['target_passes']}, "
                  f"draft passes {s['draft_passes']}, residual proposals {s['residual_proposals']}, "
                  f"cap hits {s['residual_cap_hits']}")
            if layout == "masked" and "num_iter" in plain_opts:
                fine = compare(target, draft, layout, batch, args.pairs, dict(opts, **extra),
                               dict(plain_opts, num_iter=plain_opts["num_iter"] * args.k))
                print(f"    vs plain at num_iter={plain_opts['num_iter'] * args.k} (a finer, different law): "
                      f"wall x{fine['wall_speedup']:.2f}  cpu x{fine['cpu_speedup']:.2f}")
        costs = pass_costs(target, draft, layout, batch, args.k)
        print("    cost per pass (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()))
    if args.fidelity:
        plain_name = "continuous_ar" if layout == "causal" else "masked"
        runs = [("plain, final_noise", get_sampler(plain_name, final_noise=True), plain_opts),
                ("plain, official (no last-step noise)", get_sampler(plain_name), plain_opts)]
        runs += [(f"cspd {name}", get_sampler("cspd", draft=draft), dict(opts, **extra)) for name, extra in variants]
        runs.append(("draft alone, final_noise", None, plain_opts))
        for name, sampler, o in runs:
            if sampler is None:
                dpipe = zoo.load(args.draft)
                if args.final_std is not None:
                    dpipe.generator.head.final_std = float(args.final_std)
                f = fidelity(dpipe, get_sampler(plain_name, final_noise=True), args.fidelity, 50, o)
            else:
                f = fidelity(pipe, sampler, args.fidelity, 50, o)
            print(f"class fidelity, {name}: {100 * f:.1f}% of {args.fidelity}")


if __name__ == "__main__":
    main()
