"""The MAR diffusion head on a CPU budget: which head configuration samples a small toy after a short training.

Toy (the one of issue 27): 3 classes, 4-dim tokens, ``x = mu(c) + 0.1 N(0, I)`` with ``mu = N(0, I)`` draws (seed
0), one fixed conditioning vector ``z(c) = N(0, I_16)`` per class as the head's ``z``; the head is trained alone
(AdamW, lr 1e-3, no weight decay, batch 256, 1500 steps, cosine LR decay to 0 unless a row says "const lr"),
then samples 1000 tokens per class at 25 / 100 / 250 head steps. Each cell is ``mean err / std err``: the worst,
over classes, dimensions (and seeds), of ``|sample mean - mu(c)|`` and ``|sample std - 0.1|``. ``train s`` is
the process CPU time of the training (one thread).

Rows (head network ``SimpleMLPAdaLN`` 128 x 3 everywhere):

* ``official``: visar's ``DiffusionHead`` (MAR's DiffLoss: eps + learned-range variance, MSE + VLB, cosine
  schedule, 1000 training steps, respaced sampling), sampled as MAR does, and with ``x0_clip=5``;
* ``eps-mse``: the same network predicting eps only (MSE, no VLB), sampled through ``EpsilonHead`` with a fixed
  variance (``fixed_small`` = the posterior variance, ``fixed_large`` = beta), on several base schedules
  (cosine with its beta clip at 0.999, 0.99, 0.9; DDPM's linear);
* ``linear``: ``DiffusionHead(noise_schedule="linear")``;
* ``ref-ddpm``: a hand-written eps-prediction DDPM (its own tables, respacing and loop; fixed small variance),
  to tell a visar bug from a property of the schedule;
* ``exact eps``: no training: the exact noise prediction of the toy (``gaussian_mixture_eps``) inside
  ``DiffusionHead``'s sampler (checks the respacing, the timestep map and the posterior);
* ``flow``: visar's ``FlowHead`` (flow matching, Euler or Heun), uniform / logit-normal / stratified times;
* ``stratified t``: low-discrepancy training times (one draw per stratum of ``[0, T)``, shuffled).

    OMP_NUM_THREADS=1 python benchmarks/head_toy.py                      # every row, seed 0 (~20 min)
    OMP_NUM_THREADS=1 python benchmarks/head_toy.py --rows flow,linear --seeds 0,1,2
    OMP_NUM_THREADS=1 python benchmarks/head_toy.py --long               # + 6000 training steps of the official head

``tests/test_head_toy.py`` imports the toy from here.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from visar.generators.components.diffusion_schedule import cosine_betas, get_schedule, linear_betas
from visar.generators.components.eps_head import EpsilonHead, gaussian_mixture_eps
from visar.generators.components.heads import DiffusionHead, FlowHead, SimpleMLPAdaLN
from visar.samplers.heads import sample_head

K, C, D, SIGMA = 3, 4, 16, 0.1  # classes, token channels, conditioning width, per-dimension std of a class
STEPS = (25, 100, 250)


# ---------------------------------------------------------------------------------------------- the toy
def toy_law(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu [K, C], z [K, D])``: the class means and the per-class conditioning vectors (fixed ``N(0, I)`` draws)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(K, C, generator=g), torch.randn(K, D, generator=g)


def toy_batch(mu: torch.Tensor, z: torch.Tensor, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` tokens ``x = mu(c) + 0.1 e`` ``[n, C]`` and their conditioning ``z(c)`` ``[n, D]`` (uniform classes)."""
    c = torch.randint(0, K, (n,), generator=gen)
    return mu[c] + SIGMA * torch.randn(n, C, generator=gen), z[c]


def train_head(model: nn.Module, loss_fn: Callable, mu: torch.Tensor, z: torch.Tensor, steps: int = 1500,
               batch: int = 256, lr: float = 1e-3, decay: bool = True, seed: int = 0) -> float:
    """AdamW (no weight decay) on ``loss_fn(x, z, gen)``; cosine LR decay to 0 if ``decay``. Returns CPU seconds."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)) if decay else 1.0)
    gen = torch.Generator().manual_seed(seed + 1)
    model.train()
    t0 = time.process_time()
    for _ in range(steps):
        x, zz = toy_batch(mu, z, batch, gen)
        loss = loss_fn(x, zz, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return time.process_time() - t0


@torch.no_grad()
def toy_errors(sample: Callable, mu: torch.Tensor, z: torch.Tensor, steps: int, n: int = 1000,
               seed: int = 123) -> tuple[float, float, list[tuple[float, float]]]:
    """Sample ``n`` tokens per class with ``sample(z_rows [n, D], steps, gen) -> [n, C]``; returns the worst mean
    error, the worst std error and the per-class ``(mean err, std err)`` (each the max over dimensions)."""
    gen = torch.Generator().manual_seed(seed)
    per_class = []
    for k in range(K):
        x = sample(z[k].expand(n, D).contiguous(), steps, gen)
        per_class.append(((x.mean(0) - mu[k]).abs().max().item(), (x.std(0) - SIGMA).abs().max().item()))
    return max(m for m, _ in per_class), max(s for _, s in per_class), per_class


def head_sampler(head: nn.Module, **kw) -> Callable:
    """``sample(z, steps, gen)`` of a token head through visar's chain driver (``sample_head``)."""
    return lambda zz, steps, gen: sample_head(head, zz, steps=steps, generator=gen, **kw)


# ---------------------------------------------------------------------------------------------- models
def stratified_times(n: int, gen: torch.Generator) -> torch.Tensor:
    """``[n]`` low-discrepancy times in ``[0, 1)``: one uniform draw in each of ``n`` strata, shuffled."""
    u = (torch.arange(n, dtype=torch.float32) + torch.rand(n, generator=gen)) / n
    return u[torch.randperm(n, generator=gen)]


def diffusion_loss(head: DiffusionHead, times: str = "uniform") -> Callable:
    if times == "uniform":
        return lambda x, zz, gen: head.loss(x, zz, generator=gen)
    T = head.num_train_steps
    return lambda x, zz, gen: head.loss(x, zz, t=(stratified_times(len(x), gen) * T).long().clamp(max=T - 1),
                                        noise=torch.randn(x.shape, generator=gen))


def flow_loss(head: FlowHead, times: str = "uniform") -> Callable:
    def loss(x, zz, gen):
        if times == "uniform":
            return head.loss(x, zz, generator=gen)
        t = (torch.sigmoid(torch.randn(len(x), generator=gen)) if times == "logit-normal"
             else stratified_times(len(x), gen))
        return head.loss(x, zz, t=t, noise=torch.randn(x.shape, generator=gen))
    return loss


def cosine_abar(max_beta: float = 0.999, T: int = 1000) -> np.ndarray:
    return np.cumprod(1.0 - cosine_betas(T, max_beta=max_beta))


class EpsNet(nn.Module):
    """A noise predictor ``eps(x_t [N, C], abar_t [N, 1], z [N, D])`` for :class:`EpsilonHead`: the head network
    (C outputs, no variance channels) fed the training timestep whose ``abar`` is nearest ``abar_t``; trained with
    the eps MSE alone (a fixed-variance DDPM)."""

    def __init__(self, abar: np.ndarray, width: int = 128, depth: int = 3):
        super().__init__()
        self.register_buffer("abar", torch.tensor(abar, dtype=torch.float64))
        self.net = SimpleMLPAdaLN(C, width, C, D, depth)

    def forward(self, x: torch.Tensor, abar_t: torch.Tensor, zz: torch.Tensor) -> torch.Tensor:
        t = (self.abar[None, :] - abar_t.double()).abs().argmin(1)
        return self.net(x, t, zz)

    def loss(self, x0: torch.Tensor, zz: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        t = torch.randint(0, len(self.abar), (len(x0),), generator=gen)
        e = torch.randn(x0.shape, generator=gen)
        a = self.abar[t].float()[:, None]
        return ((self.net(a.sqrt() * x0 + (1 - a).sqrt() * e, t, zz) - e) ** 2).mean()


class ReferenceDDPM(nn.Module):
    """A hand-written eps-prediction DDPM (Ho et al. 2020) sharing nothing with visar but the network class: its own
    cosine (``s = 0.008``, betas clipped at ``max_beta``) or linear table, its own respacing (``S`` evenly spaced
    timesteps, rounded), posterior-mean steps with the fixed small variance, no noise on the last step."""

    def __init__(self, schedule: str = "cosine", max_beta: float = 0.999, T: int = 1000, width: int = 128,
                 depth: int = 3):
        super().__init__()
        if schedule == "cosine":
            f = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
            betas = [min(1 - f[i + 1] / f[i], max_beta) for i in range(T)]
        else:
            betas = list(np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T))
        abar, a = [], 1.0
        for b in betas:
            a *= 1 - b
            abar.append(a)
        self.abar = abar
        self.net = SimpleMLPAdaLN(C, width, C, D, depth)

    def loss(self, x0: torch.Tensor, zz: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        t = torch.randint(0, len(self.abar), (len(x0),), generator=gen)
        e = torch.randn(x0.shape, generator=gen)
        a = torch.tensor(self.abar, dtype=torch.float64)[t].float()[:, None]
        return ((self.net(a.sqrt() * x0 + (1 - a).sqrt() * e, t, zz) - e) ** 2).mean()

    @torch.no_grad()
    def sample(self, zz: torch.Tensor, steps: int, gen: torch.Generator) -> torch.Tensor:
        T = len(self.abar)
        ts = sorted({int(round(i * (T - 1) / (steps - 1))) for i in range(steps)}, reverse=True)
        x = torch.randn(len(zz), C, generator=gen)
        for j, t in enumerate(ts):
            a = self.abar[t]
            a_prev = self.abar[ts[j + 1]] if j + 1 < len(ts) else 1.0
            beta = 1 - a / a_prev
            e = self.net(x, torch.full((len(zz),), t), zz)
            x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
            mean = math.sqrt(a_prev) * beta / (1 - a) * x0 + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * x
            if j + 1 < len(ts):
                x = mean + math.sqrt(beta * (1 - a_prev) / (1 - a)) * torch.randn(x.shape, generator=gen)
            else:
                x = mean
        return x


class ExactEps(nn.Module):
    """Stands in for ``DiffusionHead.net``: the toy's exact noise prediction at training timestep ``t`` (class found
    from ``z``) and a constant variance interpolation ``v``."""

    def __init__(self, mu: torch.Tensor, z: torch.Tensor, abar: np.ndarray, v: float = 0.0):
        super().__init__()
        self.mu, self.z, self.v = mu, z, v
        self.abar = torch.tensor(abar, dtype=torch.float64)

    def forward(self, x: torch.Tensor, t: torch.Tensor, zz: torch.Tensor) -> torch.Tensor:
        c = torch.cdist(zz, self.z).argmin(1)
        e = gaussian_mixture_eps(x, self.abar[t][:, None], torch.zeros(len(x), 1), self.mu[c][:, None],
                                 torch.full((len(x), 1), SIGMA))
        return torch.cat([e, torch.full_like(e, self.v)], dim=1)


# ---------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    """One training (``build`` -> ``(model, loss_fn, {sampler name: sample fn})``) and its training recipe."""

    group: str
    build: Callable
    steps: int = 1500
    decay: bool = True
    note: str = ""


def rows(mu: torch.Tensor, z: torch.Tensor, long: bool = False) -> list[Row]:
    W = dict(width=128, depth=3)

    def official(times="uniform", T=1000):
        h = DiffusionHead(C, D, **W, num_train_steps=T)
        samplers = {"": head_sampler(h, x0_clip=None), "x0_clip 5": head_sampler(h, x0_clip=5.0)}
        return h, diffusion_loss(h, times), samplers

    def linear(times="uniform"):
        h = DiffusionHead(C, D, **W, noise_schedule="linear")
        return h, diffusion_loss(h, times), {"": head_sampler(h)}

    def eps_mse(abar):
        net = EpsNet(abar, **W)
        small = EpsilonHead(net, C, alphas_cumprod=abar, variance="posterior")
        large = EpsilonHead(net, C, alphas_cumprod=abar, variance="beta")
        return net, net.loss, {"fixed_small": head_sampler(small), "fixed_large": head_sampler(large)}

    def ref(schedule, max_beta=0.999):
        m = ReferenceDDPM(schedule, max_beta, **W)
        return m, m.loss, {"": m.sample}

    def flow(times="uniform"):
        h = FlowHead(C, D, **W)
        heun = FlowHead(C, D, **W, solver="heun")
        heun.net = h.net
        return h, flow_loss(h, times), {"euler": head_sampler(h), "heun": head_sampler(heun)}

    def exact(v):
        h = DiffusionHead(C, D, width=8, depth=1)
        h.net = ExactEps(mu, z, get_schedule(1000, None).alphas_cumprod, v)
        return None, None, {f"v={v:g}": head_sampler(h)}

    out = [
        Row("official", lambda: official(), note="MAR's DiffLoss"),
        Row("official", lambda: official(), decay=False, note="const lr"),
        Row("official", lambda: official("stratified"), note="stratified t"),
        Row("official", lambda: official(T=4000), note="T = 4000"),
        Row("eps-mse", lambda: eps_mse(cosine_abar(0.999)), note="cosine (beta clip 0.999)"),
        Row("eps-mse", lambda: eps_mse(cosine_abar(0.99)), note="cosine, beta clip 0.99"),
        Row("eps-mse", lambda: eps_mse(cosine_abar(0.9)), note="cosine, beta clip 0.9"),
        Row("eps-mse", lambda: eps_mse(np.cumprod(1.0 - linear_betas(1000))), note="linear"),
        Row("linear", lambda: linear(), note="DiffusionHead(noise_schedule='linear')"),
        Row("linear", lambda: linear("stratified"), note="noise_schedule='linear', stratified t"),
        Row("ref-ddpm", lambda: ref("cosine"), note="hand-written, cosine (clip 0.999)"),
        Row("ref-ddpm", lambda: ref("linear"), note="hand-written, linear"),
        Row("exact eps", lambda: exact(-1.0), steps=0, note="DiffusionHead sampler, cosine"),
        Row("exact eps", lambda: exact(0.0), steps=0, note="DiffusionHead sampler, cosine"),
        Row("flow", lambda: flow(), note="FlowHead, uniform t"),
        Row("flow", lambda: flow(), decay=False, note="FlowHead, uniform t, const lr"),
        Row("flow", lambda: flow("logit-normal"), note="FlowHead, logit-normal t"),
        Row("flow", lambda: flow("stratified"), note="FlowHead, stratified t"),
    ]
    if long:
        out.append(Row("official", lambda: official(), steps=6000, note="6000 training steps"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="", help="comma-separated groups to run (default: all): " +
                    "official, eps-mse, linear, ref-ddpm, exact eps, flow")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds; cells report the worst")
    ap.add_argument("--long", action="store_true", help="also train the official head for 6000 steps")
    ap.add_argument("--samples", type=int, default=1000, help="samples per class")
    ap.add_argument("--train-steps", type=int, default=0, help="override every row's training steps (smoke runs)")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    mu, z = toy_law()
    groups = {g.strip() for g in args.rows.split(",") if g.strip()}
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    print(f"| configuration | sampler | train s (CPU) | " + " | ".join(f"{s} steps" for s in STEPS) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in STEPS) + " |")
    for row in rows(mu, z, args.long):
        if groups and row.group not in groups:
            continue
        cells: dict[str, dict[int, list[tuple[float, float]]]] = {}
        times = []
        for seed in seeds if row.steps else seeds[:1]:
            model, loss_fn, samplers = row.build()
            if model is not None:
                times.append(train_head(model, loss_fn, mu, z, steps=args.train_steps or row.steps, decay=row.decay,
                                        seed=seed))
            for name, fn in samplers.items():
                for s in STEPS:
                    m, sd, _ = toy_errors(fn, mu, z, s, n=args.samples)
                    cells.setdefault(name, {}).setdefault(s, []).append((m, sd))
        label = f"{row.group}: {row.note}" + (f" ({row.steps} steps)" if row.steps not in (0, 1500) else "")
        for name, per_steps in cells.items():
            worst = {s: (max(m for m, _ in v), max(sd for _, sd in v)) for s, v in per_steps.items()}
            t = f"{statistics.median(times):.1f}" if times else "-"
            print(f"| {label} | {name or '-'} | {t} | " +
                  " | ".join(f"{worst[s][0]:.3g} / {worst[s][1]:.3g}" for s in STEPS) + " |", flush=True)
            results.append({"group": row.group, "note": row.note, "sampler": name, "train_steps": row.steps,
                            "lr_decay": row.decay, "seeds": seeds, "train_cpu_s": times,
                            "errors": {str(s): worst[s] for s in STEPS}})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
