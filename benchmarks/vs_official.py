"""visar's default samplers against the official ones, side by side, on the same weights and seeds.

Given a local checkout of an official repository (``--official PATH``; nothing is downloaded) this builds the
official model (``--checkpoint FILE`` for real weights, else seeded random weights: the official constructor
and init under ``torch.manual_seed(--seed)``, then every all-zero parameter -- LlamaGen's output layer,
adaLN-zero gates, zero biases -- refilled from ``N(0, 0.02)`` so that nothing is trivially constant),
saves its state dict in the release format, loads that file into visar through the converter
(``visar.convert.<family>.load_generator``), and then, per batch size:

* one untimed warm-up run of each side, whose outputs must agree (below);
* ``--pairs`` timed pairs, the official sampler and visar's default sampler alternately (the order flips
  every pair), each pair with its own seed shared by both sides; every pair's outputs are compared too;
* the median, min and max over the pairs of ``official / visar`` for process CPU time (the figure to trust on
  a loaded machine) and wall time;
* a bandwidth roofline: the weight bytes every network pass reads (counted with forward hooks on visar's
  model during the warm-up run; embedding tables and positional tables are excluded, only their rows
  are read), divided by the memory bandwidth measured in this process with a large-tensor copy
  (``2 x bytes / time``, the best of the measurements before and after each batch). ``roof s`` is that
  lower bound for the whole sample on one thread, ``visar/roof`` how far visar's CPU time is from it;
* a compute bound next to it: the FLOPs of every linear / convolution call of the sample (hooks again;
  attention scores and elementwise work not counted) over the float32 GEMM rate of one thread measured
  with a 1024^3 matmul (``GEMM roof s``). Batch-1 decode steps are bandwidth-bound, the rest compute-bound.

Agreement ("parity holds"): LlamaGen tokens identical; VAR images within 2e-4 (its fixture tolerance, the
official sampler returns decoded images); MAR, FlowAR and xAR latents with ``max|a - b| <= 1e-4 max|ref|``.

Settings (official defaults; ``--num-steps`` / ``--num-iter`` / ``--num-tokens`` reduce them for CPU time):

====== ========= =========================================================================================
family sizes     sampler settings
====== ========= =========================================================================================
llamagen gpt-b, gpt-l  cfg 4, top-k 0, top-p 1, temperature 1, 256 tokens (``generate`` of
                 ``autoregressive/models/generate.py``; visar ``autoregressive``)
var    d16, d20  cfg 1.5 (visar ``cfg_scale=2.5``), top-k 900, top-p 0.96, VQVAE decode included
                 (``autoregressive_infer_cfg``; visar ``next_scale`` + ``tokenizer.decode``)
mar    mar-b     16 iterations x 50 diffusion steps, cfg 3 linear, temperature 1 (``sample_tokens``;
                 visar ``masked``)
flowar flowar-s  25 steps per scale, cfg 4.3, guidance 0.9 (``sample_tokens``; visar ``next_scale_flow``)
xar    xar-b     10 steps per entity, cfg 2.7 (``sample_tokens``; visar ``next_x``)
====== ========= =========================================================================================

``tiny`` (every family) is the parity fixtures' configuration, for smoke runs. Requirements beyond visar:
the official checkout, ``timm`` (MAR, FlowAR, xAR) and ``einops`` (FlowAR, xAR) -- benchmark-only
dependencies; xAR imports ``flash_attn`` without calling it, so an empty stand-in module is installed. The
official MAR/FlowAR/xAR code calls ``.cuda()``; on a CPU-only machine ``Tensor.cuda`` is made the identity.

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
import types
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from visar.conditions import Condition  # noqa: E402

INIT_STD = 0.02


# ---------------------------------------------------------------------------------------------- helpers
def measure_bandwidth(mib: int = 256, repeats: int = 7) -> float:
    """Memory bandwidth in bytes/s on this thread: best of ``repeats`` copies of a ``mib`` MiB float32
    tensor, counting the bytes read plus the bytes written."""
    src = torch.ones(mib * 2 ** 20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


def measure_matmul_rate(n: int = 1024, repeats: int = 10) -> float:
    """Float32 GEMM rate in FLOP/s on this thread: best of ``repeats`` ``n x n x n`` matmuls."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def refill_zero_parameters(model: nn.Module, seed: int) -> int:
    """Refill every all-zero floating parameter from ``N(0, INIT_STD)`` (seeded); returns how many."""
    g = torch.Generator().manual_seed(seed + 1)
    n = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * INIT_STD)
                n += 1
    return n


def param_bytes(modules) -> int:
    """Bytes of the parameters of ``modules`` read by a pass: embedding tables are excluded (a pass reads
    rows of them), as are the callers' positional tables (not passed here)."""
    total, seen = 0, set()
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, nn.Embedding):
                continue
            for p in sub.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel() * p.element_size()
    return total


class PassCounter:
    """Forward-hook counters on visar's model.

    ``groups`` is ``[(name, hooked module, weight bytes per call)]``: one hooked module per network pass (a
    module every pass calls exactly once), so ``calls[name]`` counts passes. ``flops`` adds up the
    multiply-adds (x2) of every ``nn.Linear`` and ``nn.Conv2d`` call under ``model`` (attention scores and
    elementwise work are not counted).
    """

    def __init__(self, groups, model: nn.Module | None = None):
        self.groups, self.model = groups, model
        self.calls = {name: 0 for name, _, _ in groups}
        self.flops = 0
        self.handles = []

    def __enter__(self):
        for name, mod, _ in self.groups:
            self.handles.append(mod.register_forward_hook(lambda *a, name=name: self._hit(name)))
        if self.model is not None:
            from visar.nn.attention import Attention

            for m in self.model.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)) or (isinstance(m, Attention) and m.q_bias is not None):
                    self.handles.append(m.register_forward_hook(self._count_flops))
        return self

    def _hit(self, name):
        self.calls[name] += 1

    def _count_flops(self, m, inputs, out):
        if not isinstance(m, (nn.Linear, nn.Conv2d)):  # VAR's attention runs its qkv weight through F.linear
            self.flops += 2 * (inputs[0].numel() // m.dim) * m.dim * 3 * m.dim
        elif isinstance(m, nn.Linear):
            self.flops += 2 * (out.numel() // m.out_features) * m.in_features * m.out_features
        else:
            k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            self.flops += 2 * out.numel() * k

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def total_bytes(self) -> int:
        return sum(self.calls[name] * b for name, _, b in self.groups)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def identity_cuda(self, *args, **kwargs):
    return self


def import_official(path: Path) -> None:
    """Put the checkout first on ``sys.path`` and make its CUDA-only calls work on the CPU."""
    if not path.is_dir():
        raise SystemExit(f"--official {path}: not a folder (give an extracted checkout of the official repository)")
    sys.path.insert(0, str(path))
    if not torch.cuda.is_available():
        torch.Tensor.cuda = identity_cuda  # the official MAR/FlowAR/xAR code calls .cuda() on new tensors


def flash_attn_stand_in():
    """An empty ``flash_attn`` module for the duration of an import (xAR imports it and never calls it);
    removed afterwards so that other libraries' availability checks do not see it."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        had = "flash_attn" in sys.modules
        if not had:
            stub = types.ModuleType("flash_attn")

            def flash_attn_func(*a, **k):
                raise RuntimeError("flash_attn stand-in: not available in this benchmark")

            stub.flash_attn_func = flash_attn_func
            sys.modules["flash_attn"] = stub
        try:
            yield
        finally:
            if not had:
                sys.modules.pop("flash_attn", None)
    return ctx()


def labels_for(batch: int) -> torch.Tensor:
    return torch.tensor([(207 + 101 * i) % 1000 for i in range(batch)])


# ---------------------------------------------------------------------------------------------- families
class Family:
    """One official family: build, save, load into visar, run both samplers, compare, count passes."""

    name = "?"
    sizes: dict = {}
    #: what the outputs are and how they must agree
    agreement = "?"
    default_settings: dict = {}

    def __init__(self, args):
        self.args = args
        self.settings = {**self.default_settings, **{k: v for k, v in vars(args).items()
                                                      if k in self.default_settings and v is not None}}

    def build_official(self, size: str):
        raise NotImplementedError

    def save_official(self, model, path: Path) -> None:
        torch.save(model.state_dict(), path)

    def load_visar(self, path: Path):
        raise NotImplementedError

    def run_official(self, labels: torch.Tensor, seed: int):
        raise NotImplementedError

    def run_visar(self, labels: torch.Tensor, seed: int):
        raise NotImplementedError

    def agree(self, official, ours) -> tuple[bool, str]:
        d = rel_diff(ours, official)
        return d <= 1e-4, f"max rel diff {d:.1e}"

    def pass_groups(self):
        raise NotImplementedError

    def counted_modules(self) -> nn.Module:
        """What the GEMM FLOP count covers (visar's side of the sampler: the generator)."""
        return self.ours


class LlamaGen(Family):
    name = "llamagen"
    sizes = {"gpt-b": dict(n_layer=12, n_head=12, dim=768), "gpt-l": dict(n_layer=24, n_head=16, dim=1024),
             "tiny": dict(n_layer=2, n_head=2, dim=128)}
    agreement = "tokens identical"
    default_settings = dict(cfg_scale=4.0, top_k=0, top_p=1.0, temperature=1.0, num_tokens=256)

    def build_official(self, size):
        from autoregressive.models.gpt import ModelArgs, Transformer

        vocab, block = (16384, 256) if size != "tiny" else (256, 16)
        self.block_size = block
        return Transformer(ModelArgs(vocab_size=vocab, block_size=block, num_classes=1000, cls_token_num=1,
                                     model_type="c2i", **self.sizes[size]))

    def save_official(self, model, path):
        torch.save({"model": model.state_dict()}, path)

    def load_visar(self, path):
        from visar.convert.llamagen import load_generator

        grid = int(round(self.block_size ** 0.5))
        self.settings["num_tokens"] = min(self.settings["num_tokens"], grid * grid)
        return load_generator(path, grid_size=grid)

    def run_official(self, labels, seed):
        from autoregressive.models.generate import generate

        s = self.settings
        torch.manual_seed(seed)
        return generate(self.official, labels, s["num_tokens"], cfg_scale=s["cfg_scale"], cfg_interval=-1,
                        temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"], sample_logits=True)

    def run_visar(self, labels, seed):
        from visar.samplers.base import default_sampler

        s = self.settings
        g = torch.Generator().manual_seed(seed)
        out = default_sampler(self.ours)(self.ours, Condition.of(labels), g, **s)
        return out.flatten(1)

    def agree(self, official, ours):
        same = torch.equal(official.long(), ours.long())
        return same, "tokens identical" if same else f"{int((official.long() != ours.long()).sum())} tokens differ"

    def pass_groups(self):
        m = self.ours
        return [("trunk+head", m.trunk.norm, param_bytes([m.trunk, m.head]))]


class VAR(Family):
    name = "var"
    sizes = {"d16": 16, "d20": 20, "tiny": 2}
    agreement = "images within 2e-4"
    #: cfg is the official knob (visar: cfg_scale = 1 + cfg)
    default_settings = dict(cfg=1.5, top_k=900, top_p=0.96)

    def build_official(self, size):
        from models import VAR as OfficialVAR, VQVAE

        depth = self.sizes[size]
        if size == "tiny":  # the fixtures' p4 configuration
            self.scales = (1, 2, 3, 4)
            vae = VQVAE(vocab_size=64, z_channels=16, ch=32, test_mode=True, share_quant_resi=4,
                        v_patch_nums=self.scales)
            width, heads = 64, 2
        else:
            self.scales = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
            vae = VQVAE(vocab_size=4096, z_channels=32, ch=160, test_mode=True, share_quant_resi=4,
                        v_patch_nums=self.scales)
            width, heads = depth * 64, depth
        var = OfficialVAR(vae_local=vae, num_classes=1000, depth=depth, embed_dim=width, num_heads=heads,
                          drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1 * depth / 24, norm_eps=1e-6,
                          shared_aln=False, cond_drop_rate=0.1, attn_l2_norm=True, patch_nums=self.scales,
                          flash_if_available=True, fused_if_available=True)
        self.settings["top_k"] = min(self.settings["top_k"], vae.vocab_size)  # tiny: V = 64
        var.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
        self.vae = vae.eval()
        return var

    def save_official(self, model, path):
        torch.save(model.state_dict(), path)
        torch.save(self.vae.state_dict(), path.with_name("vae.pth"))

    def counted_modules(self):
        return nn.ModuleList([self.ours, self.tok])  # the VQVAE decode is part of the sample

    def load_visar(self, path):
        from visar.convert.var import load_generator, load_tokenizer

        self.tok = load_tokenizer(path.with_name("vae.pth"), scales=self.scales)
        gen = load_generator(path, scales=self.scales)
        gen.bind_tokenizer(self.tok)
        return gen

    def run_official(self, labels, seed):
        s = self.settings
        return self.official.autoregressive_infer_cfg(labels.shape[0], labels, g_seed=seed, cfg=s["cfg"],
                                                      top_k=s["top_k"], top_p=s["top_p"], more_smooth=False)

    def run_visar(self, labels, seed):
        s = self.settings
        g = torch.Generator().manual_seed(seed)
        tokens = self.ours.sample(Condition.of(labels), generator=g, cfg_scale=1 + s["cfg"], top_k=s["top_k"],
                                  top_p=s["top_p"])
        return self.tok.decode(tokens).add_(1).mul_(0.5)

    def agree(self, official, ours):
        d = float((official - ours).abs().max())
        return d <= 2e-4, f"max abs diff {d:.1e}"

    def pass_groups(self):
        m = self.ours
        return [("transformer", m.head, param_bytes([m.word_embed, m.blocks, m.head_nm, m.head]))]


class MAR(Family):
    name = "mar"
    sizes = {"mar-b": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, decoder_embed_dim=768,
                           decoder_depth=12, decoder_num_heads=12, diffloss_d=6, diffloss_w=1024, buffer_size=64),
             "tiny": dict(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, decoder_embed_dim=32,
                          decoder_depth=2, decoder_num_heads=2, diffloss_d=2, diffloss_w=32, buffer_size=8)}
    agreement = "latents max|a-b| <= 1e-4 max|ref|"
    default_settings = dict(num_iter=16, num_steps=50, cfg_scale=3.0, cfg_schedule="linear", temperature=1.0)

    def build_official(self, size):
        from models.mar import MAR as OfficialMAR

        kw = self.sizes[size]
        return OfficialMAR(img_size=256, vae_stride=16, patch_size=1, mlp_ratio=4.0,
                           norm_layer=__import__("functools").partial(nn.LayerNorm, eps=1e-6), vae_embed_dim=16,
                           mask_ratio_min=0.7, label_drop_prob=0.1, class_num=1000, attn_dropout=0.1,
                           proj_dropout=0.1, num_sampling_steps=str(self.settings["num_steps"]),
                           diffusion_batch_mul=4, grad_checkpointing=False, **kw)

    def save_official(self, model, path):
        sd = model.state_dict()
        torch.save({"model": sd, "model_ema": sd}, path)

    def load_visar(self, path):
        from visar.convert.mar import load_generator

        kw = {} if self.args.size != "tiny" else dict(encoder_num_heads=2, decoder_num_heads=2)
        return load_generator(path, **kw)

    def run_official(self, labels, seed):
        s = self.settings
        torch.manual_seed(seed)
        np.random.seed(seed)
        return self.official.sample_tokens(labels.shape[0], num_iter=s["num_iter"], cfg=s["cfg_scale"],
                                           cfg_schedule=s["cfg_schedule"], labels=labels,
                                           temperature=s["temperature"])

    def run_visar(self, labels, seed):
        from visar.samplers.base import default_sampler

        s = self.settings
        g = torch.Generator().manual_seed(seed)
        return default_sampler(self.ours)(self.ours, Condition.of(labels), g, order_rng=seed, **s)

    def pass_groups(self):
        m = self.ours
        trunk = [m.z_proj, m.z_proj_ln, m.encoder_blocks, m.encoder_norm, m.decoder_embed, m.decoder_blocks,
                 m.decoder_norm]
        return [("encoder-decoder", m.decoder_norm, param_bytes(trunk)),
                ("diffusion head", m.head.net.input_proj, param_bytes([m.head.net]))]


class FlowAR(Family):
    name = "flowar"
    sizes = {"flowar-s": dict(encoder_embed_dim=768, encoder_depth=6, encoder_num_heads=12, decoder_embed_dim=768,
                              decoder_depth=6, decoder_num_heads=12, diffloss_d=2, diffloss_w=1024),
             "tiny": dict(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, decoder_embed_dim=32,
                          decoder_depth=2, decoder_num_heads=2, diffloss_d=2, diffloss_w=64)}
    agreement = "latents max|a-b| <= 1e-4 max|ref|"
    default_settings = dict(num_steps=25, cfg_scale=4.3, guidance_high=0.9)

    def build_official(self, size):
        from models.flowar import FlowAR as OfficialFlowAR

        return OfficialFlowAR(img_size=256, vae_stride=16, patch_size=1, mlp_ratio=4.0, vae_embed_dim=16,
                              label_drop_prob=0.1, class_num=1000, attn_dropout=0.0, proj_dropout=0.0,
                              buffer_size=0, scale=(1, 2, 4, 8, 16), cross=False, use_checkpoint=False,
                              **self.sizes[size])

    def load_visar(self, path):
        from visar.convert.flowar import load_generator

        return load_generator(path)

    def run_official(self, labels, seed):
        s = self.settings
        torch.manual_seed(seed)
        return self.official.sample_tokens(num_steps=s["num_steps"], guidance=s["guidance_high"], cfg=s["cfg_scale"],
                                           labels=labels)

    def run_visar(self, labels, seed):
        s = self.settings
        g = torch.Generator().manual_seed(seed)
        return self.ours.sample(Condition.of(labels), generator=g, **s)

    def pass_groups(self):
        m = self.ours
        trunk = [m.z_proj, m.z_proj_ln, m.encoder_blocks, m.encoder_norm, m.decoder_embed, m.decoder_blocks,
                 m.decoder_norm]
        return [("encoder-decoder", m.decoder_norm, param_bytes(trunk)),
                ("flow head", m.flownet.input_proj, param_bytes([m.flownet]))]


class XAR(Family):
    name = "xar"
    sizes = {"xar-b": dict(encoder_embed_dim=768, encoder_depth=8, encoder_num_heads=12, decoder_embed_dim=768,
                           decoder_depth=8, decoder_num_heads=12),
             "tiny": dict(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, decoder_embed_dim=32,
                          decoder_depth=2, decoder_num_heads=2)}
    agreement = "latents max|a-b| <= 1e-4 max|ref|"
    default_settings = dict(num_steps=10, cfg_scale=2.7)

    def build_official(self, size):
        with flash_attn_stand_in():
            from models.xar import xAR as OfficialXAR

        return OfficialXAR(img_size=256, vae_stride=16, patch_size=1, mlp_ratio=4.0, vae_embed_dim=16,
                           label_drop_prob=0.1, class_num=1000, attn_dropout=0.0, proj_dropout=0.0, clusters=4,
                           **self.sizes[size])

    def load_visar(self, path):
        from visar.convert.xar import load_generator

        return load_generator(path)

    def run_official(self, labels, seed):
        s = self.settings
        torch.manual_seed(seed)
        return self.official.sample_tokens(num_steps=s["num_steps"], cfg=s["cfg_scale"], label=labels)

    def run_visar(self, labels, seed):
        s = self.settings
        g = torch.Generator().manual_seed(seed)
        return self.ours.sample(Condition.of(labels), generator=g, **s)

    def pass_groups(self):
        m = self.ours
        trunk = [m.time_embed, m.z_proj, m.z_proj_ln, m.encoder_blocks, m.encoder_norm, m.decoder_embed,
                 m.decoder_blocks, m.decoder_norm, m.pred]
        return [("transformer", m.decoder_norm, param_bytes(trunk))]


FAMILIES = {f.name: f for f in (LlamaGen, VAR, MAR, FlowAR, XAR)}


# ---------------------------------------------------------------------------------------------- driver
def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def summary(xs: list[float]) -> dict:
    return dict(median=statistics.median(xs), min=min(xs), max=max(xs))


def bench_batch(fam: Family, batch: int, pairs: int, seed: int, rates: dict) -> dict:
    """Warm-up and agreement, then ``pairs`` alternating timed pairs; ``rates`` holds the machine's measured
    ``bandwidth`` (bytes/s) and ``matmul`` (FLOP/s), both updated here (the best seen in this process)."""
    labels = labels_for(batch)
    with torch.no_grad():
        off, *_ = timed(lambda: fam.run_official(labels, seed))
        with PassCounter(fam.pass_groups(), fam.counted_modules()) as counter:
            ours, *_ = timed(lambda: fam.run_visar(labels, seed))
    ok, detail = fam.agree(off, ours)
    agree_all = [ok]
    rows = []
    for i in range(pairs):
        s = seed + 1 + i
        order = ("official", "visar") if i % 2 == 0 else ("visar", "official")
        res = {}
        with torch.no_grad():
            for side in order:
                fn = fam.run_official if side == "official" else fam.run_visar
                res[side] = timed(lambda fn=fn: fn(labels, s))
        agree_all.append(fam.agree(res["official"][0], res["visar"][0])[0])
        rows.append(dict(seed=s, official_wall=res["official"][1], official_cpu=res["official"][2],
                         visar_wall=res["visar"][1], visar_cpu=res["visar"][2]))
        print(f"  batch {batch} pair {i}: official {rows[-1]['official_cpu']:.2f} s CPU / visar "
              f"{rows[-1]['visar_cpu']:.2f} s CPU = {rows[-1]['official_cpu'] / rows[-1]['visar_cpu']:.3f}x",
              flush=True)
    cpu_ratio = summary([r["official_cpu"] / r["visar_cpu"] for r in rows])
    wall_ratio = summary([r["official_wall"] / r["visar_wall"] for r in rows])
    rates["bandwidth"] = max(rates["bandwidth"], measure_bandwidth())
    rates["matmul"] = max(rates["matmul"], measure_matmul_rate())
    roof = counter.total_bytes() / rates["bandwidth"]
    flop_roof = counter.flops / rates["matmul"]
    visar_cpu = statistics.median(r["visar_cpu"] for r in rows)
    return dict(batch=batch, pairs=rows, cpu_ratio=cpu_ratio, wall_ratio=wall_ratio,
                official_cpu=statistics.median(r["official_cpu"] for r in rows), visar_cpu=visar_cpu,
                official_wall=statistics.median(r["official_wall"] for r in rows),
                visar_wall=statistics.median(r["visar_wall"] for r in rows),
                passes=dict(counter.calls), weight_bytes_read=counter.total_bytes(), roofline_s=roof,
                visar_over_roofline=visar_cpu / roof, gemm_flops=counter.flops, gemm_roof_s=flop_roof,
                visar_over_gemm_roof=visar_cpu / flop_roof, agree=all(agree_all), agree_detail=detail,
                agree_pairs=f"{sum(agree_all)}/{len(agree_all)}")


def format_row(fam: Family, size: str, r: dict) -> str:
    c, w = r["cpu_ratio"], r["wall_ratio"]
    return (f"| {fam.name} {size} | {r['batch']} | {r['official_cpu']:.2f} | {r['visar_cpu']:.2f} | "
            f"**{c['median']:.2f}x** [{c['min']:.2f}, {c['max']:.2f}] | {w['median']:.2f}x [{w['min']:.2f}, "
            f"{w['max']:.2f}] | {r['roofline_s']:.2f} | {r['visar_over_roofline']:.1f}x | {r['gemm_roof_s']:.2f} | "
            f"{r['visar_over_gemm_roof']:.1f}x | "
            f"{'yes' if r['agree'] else 'NO'} ({r['agree_pairs']}; {r['agree_detail']}) |")


HEADER = ("| case | batch | official CPU s | visar CPU s | official/visar CPU (median [min, max]) | wall ratio | "
          "roof s | visar/roof | GEMM roof s | visar/GEMM roof | outputs agree |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", type=Path, required=True, help="extracted checkout of the official repository")
    ap.add_argument("--family", choices=sorted(FAMILIES), required=True)
    ap.add_argument("--size", required=True, help="gpt-b, gpt-l (llamagen); d16, d20 (var); mar-b; flowar-s; "
                                                  "xar-b; tiny (any family: the parity fixtures' configuration)")
    ap.add_argument("--checkpoint", type=Path, help="official weights (release format); default: seeded random")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--pairs", type=int, default=5, help="timed official/visar pairs per batch (>= 5 to report)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--num-steps", dest="num_steps", type=int, help="MAR diffusion / FlowAR Euler / xAR steps")
    ap.add_argument("--num-iter", dest="num_iter", type=int, help="MAR iterations")
    ap.add_argument("--num-tokens", dest="num_tokens", type=int, help="LlamaGen tokens (prefix of the image)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    fam_cls = FAMILIES[args.family]
    if args.size not in fam_cls.sizes:
        ap.error(f"--size {args.size!r} is not one of {sorted(fam_cls.sizes)} for {args.family}")
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
            obj = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
            state = obj.get("model_ema", obj.get("model", obj)) if isinstance(obj, dict) else obj
            fam.official.load_state_dict(state, strict=False)
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

    results = []
    for batch in args.batch:
        results.append(bench_batch(fam, batch, args.pairs, args.seed, rates))
    print("\n" + HEADER)
    for r in results:
        print(format_row(fam, args.size, r))
    report = dict(family=args.family, size=args.size, settings=fam.settings, official=str(args.official),
                  checkpoint=str(args.checkpoint) if args.checkpoint else None, seed=args.seed,
                  threads=args.threads, bandwidth_bytes_per_s=rates["bandwidth"], matmul_flop_per_s=rates["matmul"], params=n_params, refilled=refilled,
                  torch=torch.__version__, machine=platform.processor() or platform.machine(),
                  date=time.strftime("%Y-%m-%d %H:%M"), command=" ".join(sys.argv), results=results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
