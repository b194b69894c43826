"""Training throughput of ``visar train``'s step: samples/s, tokens/s and (on GPUs) model FLOP utilisation, for
a GPT-B-size LlamaGen generator (``llamagen-gpt-b``, 111M parameters, 256 tokens) and VAR-d16 (``var-d16``,
310M parameters, 680 tokens), on 1 or more processes (DDP, or FSDP with ``--fsdp``).

Each configuration starts its processes the way ``visar train --num-processes N`` does (``accelerate launch``;
gloo on a CPU machine, NCCL on GPUs). Every process runs the trainer's step on synthetic tokens (random ids and
labels, so data loading is not measured): the generator task's loss under autocast, backward, gradient
clipping, AdamW over the official weight-decay groups, and the EMA update; with ``--fsdp`` the model, optimizer
and EMA are sharded by :func:`visar.train.fsdp.shard_model` as in ``train.fsdp.enabled=true``. After
``--warmup`` steps, ``--steps`` steps are timed (wall and process CPU time, median over steps; all processes
synchronised around each step), with each process's peak resident memory (CPU) or peak allocated GPU memory.
The batch is per process (weak scaling): N processes train N x ``--batch`` samples per step.

FLOPs per step are estimated, not counted: ``6 N T + 12 n_layer d L T`` (PaLM, appendix B: ``N`` = parameters of
the model's ``nn.Linear`` layers, the weights each token meets in a matmul; ``T`` = tokens in the step; ``L`` =
sequence length, attention counted over the full sequence). MFU = achieved FLOP/s / peak FLOP/s of the
device, for GPUs only: ``--peak-tflops`` or the vendor's dense peak for the GPU's name and dtype.

    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --device cpu --processes 1 2 --steps 3 --warmup 1
    python benchmarks/train_throughput.py --device cuda --processes 1 --batch 32 --mixed-precision bf16 --steps 20
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

#: the benchmarked models: zoo preset, tokens per sample, depth and width (for the attention FLOPs)
MODELS = {"gpt-b": {"preset": "llamagen-gpt-b", "tokens": 256, "depth": 12, "width": 768},
          "var-d16": {"preset": "var-d16", "tokens": 680, "depth": 16, "width": 1024}}
#: vendor dense peak TFLOP/s by (GPU name fragment, dtype): spec-sheet values (SXM parts), not measurements
PEAK_TFLOPS = {("H200", "bf16"): 989.4, ("H100", "bf16"): 989.4, ("A100", "bf16"): 312.0,
               ("H200", "no"): 494.7, ("H100", "no"): 494.7, ("A100", "no"): 156.0}  # "no": fp32 matmuls as TF32


def build(name: str, device):
    """The generator with random weights, and what its loss needs (VAR: the bound quantizer of its VQVAE)."""
    import torch

    from visar import zoo

    torch.manual_seed(0)
    model = zoo.create(MODELS[name]["preset"])
    if name == "var-d16":
        model.bind_tokenizer(zoo.create("var-vqvae").to(device))
    return model


def synthetic_batch(name: str, model, batch: int, step: int, rank: int, device) -> dict:
    import torch

    g = torch.Generator().manual_seed(1000 * step + rank)
    labels = torch.randint(0, model.num_classes, (batch,), generator=g)
    if name == "var-d16":
        tokens = [torch.randint(0, model.vocab_size, (batch, s, s), generator=g) for s in model.scales]
        tokens = [t.to(device) for t in tokens]
    else:
        tokens = torch.randint(0, model.vocab_size, (batch, model.grid_size ** 2), generator=g).to(device)
    return {"tokens": tokens, "label": labels.to(device)}


def linear_params(model) -> int:
    from torch import nn

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def step_flops(name: str, model, samples: int) -> float:
    spec = MODELS[name]
    tokens = samples * spec["tokens"]
    return 6.0 * linear_params(model) * tokens + 12.0 * spec["depth"] * spec["width"] * spec["tokens"] * tokens


def worker(opts: dict) -> None:
    """One process of one configuration: time the training step, rank 0 writes the result to ``opts["out"]``."""
    import torch
    from accelerate import Accelerator

    from visar.train.fsdp import is_sharded_tensor, shard_model
    from visar.train.optim import EMA, ema_rule, param_groups
    from visar.train.tasks import make_task

    torch.set_num_threads(opts["threads"])
    acc = Accelerator(cpu=opts["device"] == "cpu", mixed_precision=opts["mixed_precision"])
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    name = opts["model"]
    model = build(name, device)
    n_params, n_linear = sum(p.numel() for p in model.parameters()), linear_params(model)
    flops = step_flops(name, model, opts["batch"] * world)
    task = make_task("generator", model, None)
    sharded = opts["fsdp"] and world > 1
    if sharded:
        shard_model(model, device, world, "full")
    else:
        model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05, "official"), lr=1e-4, betas=(0.9, 0.95))
    ema = EMA(model, **ema_rule(model, "warmup", 0.999))
    if not sharded:
        task, optimizer = acc.prepare(task, optimizer)
    task.train()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        acc.wait_for_everyone()

    walls, cpus = [], []
    for step in range(opts["warmup"] + opts["steps"]):
        batch = synthetic_batch(name, model, opts["batch"], step, rank, device)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        with acc.autocast():
            loss = task(batch)["loss"]
        acc.backward(loss)
        if sharded:
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            gn = gn.full_tensor() if is_sharded_tensor(gn) else gn
        else:
            acc.clip_grad_norm_(task.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model, step)
        sync()
        if step >= opts["warmup"]:
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    cpu_all = acc.gather(torch.tensor([statistics.median(cpus)], device=device)).cpu().tolist()
    rss_all = acc.gather(torch.tensor([rss], device=device)).cpu().tolist()
    if acc.is_main_process:
        wall = statistics.median(walls)
        samples = opts["batch"] * world
        out = {"model": name, "params_M": round(n_params / 1e6, 1), "linear_params_M": round(n_linear / 1e6, 1),
               "processes": world, "fsdp": sharded, "batch_per_process": opts["batch"],
               "device": str(device), "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "threads_per_process": opts["threads"], "mixed_precision": opts["mixed_precision"],
               "steps_timed": len(walls), "step_wall_s": wall, "step_cpu_s_per_process": cpu_all,
               "samples_per_s": samples / wall, "tokens_per_s": samples * MODELS[name]["tokens"] / wall,
               "flops_per_step": flops, "achieved_tflops": flops / wall / 1e12, "peak_gpu_mem_gib": peak_mem,
               "peak_rss_gib_per_process": [round(x, 2) for x in rss_all],
               "torch": torch.__version__, "loss": float(loss.detach().float())}
        peak = opts.get("peak_tflops")
        if device.type == "cuda" and not peak:
            gpu = torch.cuda.get_device_name()
            peak = next((v for (frag, dt), v in PEAK_TFLOPS.items() if frag in gpu and dt == opts["mixed_precision"]),
                        None)
        out["peak_tflops"] = peak if device.type == "cuda" else None
        out["mfu"] = out["achieved_tflops"] / peak if device.type == "cuda" and peak else None
        Path(opts["out"]).write_text(json.dumps(out))


def run_config(opts: dict, processes: int) -> dict | None:
    """Start ``processes`` workers through the trainer's launcher; returns rank 0's result (None: failed)."""
    from visar.train.launch import launcher_command

    with tempfile.TemporaryDirectory() as tmp:
        opts = {**opts, "out": str(Path(tmp) / "result.json")}
        cmd, env = launcher_command([str(Path(__file__).resolve()), "--worker", json.dumps(opts)], processes,
                                    cuda=opts["device"] == "cuda")
        env["OMP_NUM_THREADS"] = str(opts["threads"])
        code = subprocess.call(cmd, env=env)
        if code or not Path(opts["out"]).is_file():
            print(f"  {opts['model']} x{processes}: failed (exit {code})", file=sys.stderr)
            return None
        return json.loads(Path(opts["out"]).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--processes", nargs="+", type=int, default=[1, 2], help="process counts to compare")
    p.add_argument("--fsdp", choices=["off", "on", "both"], default="off",
                   help="shard the model over the processes (train.fsdp.enabled): off, on, or both one after the other")
    p.add_argument("--batch", type=int, default=2, help="samples per process per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU peak for MFU (default: vendor table)")
    p.add_argument("--skip", nargs="*", default=[], metavar="MODEL:N[:fsdp]",
                   help="configurations not to run, e.g. var-d16:2 (memory of a small machine)")
    p.add_argument("--json", default=None, help="also write all results to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    import torch

    if args.device == "cpu" and args.mixed_precision == "bf16":
        print("note: bf16 on a CPU is 7-70x slower than float32; the figures will not reflect a GPU", file=sys.stderr)
    print(f"torch {torch.__version__}, device {args.device}, {args.threads} thread(s) per process, batch "
          f"{args.batch} per process, {args.warmup} warmup + {args.steps} timed steps (median), "
          f"mixed precision {args.mixed_precision}")
    header = (f"{'model':8} {'procs':>5} {'fsdp':>4} {'step s':>7} {'CPU s/proc':>10} {'samples/s':>9} "
              f"{'tokens/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'RSS GiB/proc':>12}")
    print(header)
    print("-" * len(header))
    results = []
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.fsdp]
    for name in args.models:
        for n in args.processes:
            for fsdp in modes:
                if fsdp and n == 1:
                    continue
                tag = f"{name}:{n}" + (":fsdp" if fsdp else "")
                if tag in args.skip:
                    print(f"{name:8} {n:5d} {'yes' if fsdp else 'no':>4}  skipped (--skip)")
                    continue
                r = run_config({"model": name, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
                                "threads": args.threads, "device": args.device, "fsdp": fsdp,
                                "mixed_precision": args.mixed_precision, "peak_tflops": args.peak_tflops}, n)
                if r is None:
                    continue
                results.append(r)
                cpu = statistics.mean(r["step_cpu_s_per_process"])
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
                rss = max(r["peak_rss_gib_per_process"])
                print(f"{name:8} {n:5d} {'yes' if fsdp else 'no':>4} {r['step_wall_s']:7.2f} {cpu:10.2f} "
                      f"{r['samples_per_s']:9.3f} {r['tokens_per_s']:9.1f} {r['achieved_tflops']:8.4f} {mfu:>6} "
                      f"{rss:12.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
