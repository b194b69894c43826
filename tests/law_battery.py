"""Exact-law checks for samplers: enumerable joint laws, goodness-of-fit tests, exact expected costs.

Statistics (general; any sampler whose output law is known exactly):

* :func:`gof_test`: chi-square or G-test of observed counts against *exact* cell probabilities, with
  cells of expected count below ``min_expected`` pooled (smallest first) and a support check (a count in a
  cell of probability zero rejects outright);
* :func:`bonferroni` (per-test level of a family of tests), :func:`mean_z` (z of a sample mean against
  its exact expectation), :func:`sequence_index` / :func:`exact_joint` (the joint law of ``L`` tokens over
  ``V`` symbols from teacher-forced conditional laws, cells indexed base ``V``, token 0 most significant);
* :func:`speculative_cost`: the exact expected rounds and accepted drafts of lossless speculative
  decoding from a prefix (``docs/design/samplers.md`` 1.1: accept ``x`` with mass ``min(p, q)(x)``, correct ``y``
  with mass ``(p - min(p, q))(y)``, bonus from ``p``).

Toys (next-token, logits, CFG with a null class; any :class:`visar.generators.protocol.NextTokenModel`
sampler runs on them): :class:`MarkovToy`, an order-2 Markov table, and :func:`tiny_llamagen`, a 2-layer
random LlamaGen with a real KV cache. :func:`plain_laws` turns a toy's teacher-forced logits into the
plain sampler's processed laws (``visar.samplers.autoregressive``'s own functions).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
import torch

from visar.conditions import Condition
from visar.generators.protocol import StepState
from visar.samplers.autoregressive import guided_logits
from visar.samplers.logits import process_logits

# -- statistics ---------------------------------------------------------------------------------


@dataclass
class GoF:
    """A goodness-of-fit result: statistic, degrees of freedom, p-value, cells after pooling."""

    stat: float
    dof: int
    pvalue: float
    cells: int


def chi2_sf(x: float, dof: int) -> float:
    """Survival function of the chi-square distribution (regularised upper incomplete gamma)."""
    if dof <= 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(x / 2, dtype=torch.float64)))


def pool_cells(counts: torch.Tensor, expected: torch.Tensor, min_expected: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge cells (smallest expectation first) until every pooled cell expects ``>= min_expected``."""
    order = torch.argsort(expected)
    e, c = expected[order].tolist(), counts[order].tolist()
    out_e, out_c, acc_e, acc_c = [], [], 0.0, 0.0
    for ei, ci in zip(e, c):
        acc_e, acc_c = acc_e + ei, acc_c + ci
        if acc_e >= min_expected:
            out_e.append(acc_e)
            out_c.append(acc_c)
            acc_e = acc_c = 0.0
    if acc_e > 0 or acc_c > 0:  # the leftover joins the last pooled cell
        if out_e:
            out_e[-1] += acc_e
            out_c[-1] += acc_c
        else:
            out_e, out_c = [acc_e], [acc_c]
    return torch.tensor(out_c, dtype=torch.float64), torch.tensor(out_e, dtype=torch.float64)


def gof_test(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0, kind: str = "chi2") -> GoF:
    """Test observed ``counts [K]`` against exact cell probabilities ``probs [K]`` (summing to 1).

    ``kind``: ``"chi2"`` (Pearson) or ``"g"`` (likelihood ratio). Cells of zero probability must be
    empty: any count there returns ``pvalue = 0`` (the support check).
    """
    counts, probs = counts.double().flatten(), probs.double().flatten()
    assert abs(float(probs.sum()) - 1.0) < 1e-6, f"cell probabilities sum to {float(probs.sum())}"
    n = float(counts.sum())
    zero = probs <= 0
    if bool((counts[zero] > 0).any()):
        return GoF(float("inf"), 0, 0.0, int((~zero).sum()))
    c, e = pool_cells(counts[~zero], n * probs[~zero], min_expected)
    if kind == "chi2":
        stat = float(((c - e) ** 2 / e).sum())
    elif kind == "g":
        stat = float(2 * torch.where(c > 0, c * torch.log(c / e), torch.zeros_like(c)).sum())
    else:
        raise ValueError(f"kind must be 'chi2' or 'g', got {kind!r}")
    dof = len(c) - 1
    return GoF(stat, dof, chi2_sf(stat, dof), len(c))


def bonferroni(alpha: float, tests: int) -> float:
    """Per-test level that keeps the family-wise false-alarm rate of ``tests`` tests at ``alpha``."""
    return alpha / tests


def mean_z(values: torch.Tensor, expected: torch.Tensor | float) -> float:
    """z of the mean of ``values - expected`` (per-sample expectations allowed) with the sample variance."""
    d = values.double().flatten() - torch.as_tensor(expected, dtype=torch.float64).flatten()
    sd = float(d.std())
    if sd == 0:
        return 0.0 if float(d.mean()) == 0 else float("inf")
    return float(d.mean()) / (sd / len(d) ** 0.5)


def sequence_index(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """Cell index ``[N]`` of token sequences ``[N, L]`` (base ``vocab``, token 0 most significant)."""
    tokens = tokens.flatten(1).long()
    weights = vocab ** torch.arange(tokens.shape[1] - 1, -1, -1)
    return (tokens * weights).sum(1)


def all_sequences(vocab: int, length: int) -> torch.Tensor:
    """Every sequence ``[vocab**length, length]``, in :func:`sequence_index` order."""
    return torch.tensor(list(itertools.product(range(vocab), repeat=length)), dtype=torch.long)


def exact_joint(laws: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
    """Joint probabilities ``[M]`` of ``seqs [M, L]`` from teacher-forced laws ``[M, L, V]`` (``laws[m, t]``
    is the law of token ``t`` given ``seqs[m, :t]``)."""
    return laws.double().gather(2, seqs[..., None])[..., 0].prod(1)


def prefix_laws(laws: torch.Tensor, seqs: torch.Tensor) -> dict[tuple, torch.Tensor]:
    """``{prefix: law [V]}`` for every prefix shorter than ``L`` (from teacher-forced ``laws [M, L, V]``)."""
    out: dict[tuple, torch.Tensor] = {}
    for m, seq in enumerate(seqs.tolist()):
        for t in range(len(seq)):
            out.setdefault(tuple(seq[:t]), laws[m, t].double())
    return out


def speculative_cost(p: dict[tuple, torch.Tensor], q: dict[tuple, torch.Tensor], length: int, k: int,
                     prefix: tuple = ()) -> tuple[float, float]:
    """Exact ``(E[rounds], E[accepted drafts])`` of speculative decoding from ``prefix`` to ``length``
    tokens with draft length ``k`` (``p``, ``q``: processed target / draft laws by prefix)."""
    memo: dict[tuple, tuple[float, float]] = {}

    def value(s: tuple) -> tuple[float, float]:
        if len(s) >= length:
            return 0.0, 0.0
        if s not in memo:
            kk = min(k, length - len(s))
            rounds, accepted = 1.0, 0.0

            def walk(path: tuple, mass: float) -> None:  # ``path``: accepted drafts so far
                nonlocal rounds, accepted
                if len(s) + len(path) == length:  # all accepted and the image is complete: no bonus
                    accepted += mass * len(path)
                    return
                pj = p[s + path]
                if len(path) == kk:  # all accepted: the bonus
                    follow = pj
                else:
                    both = torch.minimum(pj, q[s + path])
                    follow = pj - both
                    for x in range(len(pj)):
                        if both[x] > 0:
                            walk(path + (x,), mass * float(both[x]))
                for y in range(len(pj)):
                    if follow[y] > 0:
                        r, a = value(s + path + (y,))
                        w = mass * float(follow[y])
                        rounds += w * r
                        accepted += w * (len(path) + a)

            walk((), 1.0)
            memo[s] = (rounds, accepted)
        return memo[s]

    return value(tuple(prefix))


# -- toys -------------------------------------------------------------------------------------


@dataclass
class MarkovState(StepState):
    tokens: torch.Tensor = None  # [R, L] fed tokens
    lengths: torch.Tensor = None  # [R] committed tokens per row
    labels: torch.Tensor = None  # [R] class ids (null = num_classes)


class MarkovToy:
    """Class-conditional order-2 Markov chain over ``V`` tokens implementing ``NextTokenModel``.

    Logits of token ``t`` are ``table[label, token t-2, token t-1]`` (index ``V``: before the start).
    ``step`` refuses positions beyond a row's committed length, so a sampler that skips fails loudly.
    """

    emits = "logits"

    def __init__(self, vocab: int = 5, length: int = 4, classes: int = 3, seed: int = 0, scale: float = 1.5,
                 base: "MarkovToy | None" = None, noise: float = 1.0):
        g = torch.Generator().manual_seed(seed)
        table = scale * torch.randn(classes + 1, vocab + 1, vocab + 1, vocab, generator=g)
        if base is not None:  # a draft: the base's table, perturbed
            table = base.table + noise * torch.randn(base.table.shape, generator=g)
        self.table, self.vocab_size, self.num_tokens, self.num_classes = table, vocab, length, classes

    def start(self, cond: Condition, guided: bool = False):
        labels = cond.labels
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, self.num_classes)])
        R, V = labels.shape[0], self.vocab_size
        state = MarkovState(batch=cond.batch_size, guided=guided, labels=labels,
                            tokens=torch.zeros(R, self.num_tokens, dtype=torch.long),
                            lengths=torch.zeros(R, dtype=torch.long))
        return state, self.table[labels, V, V]

    def step(self, state: MarkovState, inputs: torch.Tensor, pos) -> torch.Tensor:
        R, V = state.rows, self.vocab_size
        inputs = inputs if inputs.shape[0] == R else inputs.repeat(R // inputs.shape[0], 1)
        pos = torch.as_tensor(pos, dtype=torch.long)
        pos = pos.expand(R).clone() if pos.dim() == 0 else pos.repeat(R // pos.shape[0])
        n = inputs.shape[1]
        if (pos > state.lengths).any() or int(pos.max()) + n > self.num_tokens:
            raise ValueError(f"pos {pos.tolist()} skips committed tokens {state.lengths.tolist()} or overflows")
        rows = torch.arange(R)[:, None]
        state.tokens[rows, pos[:, None] + torch.arange(n)] = inputs
        prev = torch.where(pos > 0, state.tokens[torch.arange(R), (pos - 1).clamp_min(0)], V)
        seq = torch.cat([prev[:, None], inputs], 1)  # [R, n + 1]
        state.lengths = pos + n
        return self.table[state.labels[:, None], seq[:, :-1], seq[:, 1:]]

    def rewind(self, state: MarkovState, n) -> None:
        state.lengths = state.lengths - torch.as_tensor(n)

    def teacher_logits(self, seqs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Raw logits ``[M, L, V]`` of every token of ``seqs [M, L]`` given its prefix, class ``labels [M]``."""
        V = self.vocab_size
        L = seqs.shape[1]
        ext = torch.cat([torch.full((seqs.shape[0], 2), V, dtype=torch.long), seqs], 1)  # token t at t + 2
        return self.table[labels[:, None], ext[:, :L], ext[:, 1:L + 1]]


def tiny_llamagen(vocab: int = 5, grid: int = 2, seed: int = 0, dim: int = 32, head_std: float = 0.8,
                  classes: int = 3):
    """A 2-layer random LlamaGen (``llamagen-gpt-tiny`` shape, real KV cache) with a random head (LlamaGen
    initialises the head at zero) so its laws are far from uniform."""
    from visar import zoo

    torch.manual_seed(seed)
    m = zoo.create("llamagen-gpt-tiny", vocab_size=vocab, grid_size=grid, dim=dim, num_classes=classes,
                    ffn_hidden=2 * dim).eval()
    with torch.no_grad():
        torch.nn.init.normal_(m.head.weight, std=head_std)
    return m


def perturbed(model, noise: float, seed: int = 0):
    """A copy of ``model`` with every parameter moved by ``noise * std(parameter) * N(0, 1)`` (a draft close
    to a target)."""
    import copy

    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(noise * float(p.std()) * torch.randn(p.shape, generator=g))
    return out


def teacher_logits(model, seqs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Raw teacher-forced logits ``[M, L, V]`` of a toy (``MarkovToy`` or a LlamaGen) for ``seqs`` of class
    ``labels``."""
    if hasattr(model, "teacher_logits"):
        return model.teacher_logits(seqs, labels)
    with torch.no_grad():
        return model(seqs, Condition.of(labels))


def plain_laws(model, seqs: torch.Tensor, label: int, cfg_scale: float = 1.0, cfg_interval: int = -1,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The plain sampler's processed law of every token of ``seqs [M, L]`` given its prefix: ``[M, L, V]``
    float64 (CFG by the sampler's ``guided_logits`` at each absolute index, then ``process_logits``)."""
    M, L = seqs.shape
    cond = teacher_logits(model, seqs, torch.full((M,), label))
    raw = cond
    if cfg_scale != 1.0:
        raw = torch.cat([cond, teacher_logits(model, seqs, torch.full((M,), model.num_classes))])
    out = []
    for t in range(L):
        logits = guided_logits(raw[:, t], M, cfg_scale, t, cfg_interval)
        out.append(torch.softmax(process_logits(logits, temperature, top_k, top_p), -1))
    return torch.stack(out, 1).double()


def class_joints(model, labels: list[int], length: int, **options) -> dict[int, torch.Tensor]:
    """``{label: joint [V**length]}`` of the plain sampler with ``options``."""
    seqs = all_sequences(model.vocab_size, length)
    return {c: exact_joint(plain_laws(model, seqs, c, **options), seqs) for c in labels}


def law_test(tokens: torch.Tensor, labels: torch.Tensor, joints: dict[int, torch.Tensor], vocab: int,
             kind: str = "chi2", min_expected: float = 5.0) -> GoF:
    """One goodness-of-fit test of samples ``tokens [N, L]`` with class ``labels [N]`` against the exact
    per-class joints (cells: class x sequence, each class weighted by its share of the samples)."""
    idx = sequence_index(tokens, vocab)
    counts, probs = [], []
    N = len(labels)
    for c, joint in joints.items():
        sel = labels == c
        counts.append(torch.bincount(idx[sel], minlength=joint.numel()).double())
        probs.append(joint * (float(sel.sum()) / N))
    return gof_test(torch.cat(counts), torch.cat(probs), min_expected, kind)


__all__ = ["GoF", "chi2_sf", "pool_cells", "gof_test", "bonferroni", "mean_z", "sequence_index", "all_sequences",
           "exact_joint", "prefix_laws", "speculative_cost", "MarkovState", "MarkovToy", "tiny_llamagen", "perturbed",
           "teacher_logits", "plain_laws", "class_joints", "law_test"]
