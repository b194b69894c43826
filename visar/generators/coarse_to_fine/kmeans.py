"""Coarse labels for a VQ codebook: seeded k-means over the l2-normalised codewords.

CTF (Guo et al., 2025, arXiv:2503.16194, Sec. 3) groups the codewords of a large codebook into
``M`` clusters by k-means on their feature vectors; a token's *coarse label* is its codeword's
cluster. LlamaGen's VQ compares latents with the **l2-normalised** codebook rows, so the clustering
runs on those rows too.

Everything here is plain torch on the CPU in float64, with k-means++ seeding drawn from a seeded
``torch.Generator`` and a fixed number of Lloyd iterations, so a given (codebook, M, seed, iters)
always gives the same map. The map itself is still stored with the model (a buffer): it is the
model's vocabulary, and a re-run on another torch build is not guaranteed to break ties the same way.
"""
from __future__ import annotations

import hashlib
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("visar")


def normalize_codebook(codebook: torch.Tensor) -> torch.Tensor:
    """``[V, D]`` codebook -> its rows l2-normalised, float32 on the CPU (as LlamaGen's VQ uses them)."""
    if not isinstance(codebook, torch.Tensor) or codebook.dim() != 2 or not codebook.is_floating_point():
        got = tuple(codebook.shape) if isinstance(codebook, torch.Tensor) else type(codebook).__name__
        raise ValueError(f"the codebook must be a float tensor [vocab_size, dim], got {got}")
    if not torch.isfinite(codebook).all():
        raise ValueError("the codebook holds NaN or inf values; check the tokenizer checkpoint")
    return F.normalize(codebook.detach().to("cpu", torch.float32), dim=-1)


def codebook_hash(codebook: torch.Tensor) -> str:
    """sha256 (hex) of the l2-normalised codebook as contiguous float32 bytes, prefixed by its shape."""
    cb = normalize_codebook(codebook).contiguous()
    h = hashlib.sha256(f"{cb.shape[0]}x{cb.shape[1]}:".encode())
    h.update(cb.numpy().tobytes())
    return h.hexdigest()


def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[N, M]`` between rows of ``x [N, D]`` and ``c [M, D]`` (>= 0)."""
    d = (x * x).sum(1, keepdim=True) + (c * c).sum(1)[None] - 2.0 * x @ c.T
    return d.clamp_min_(0.0)


def kmeans_pp_init(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): indices ``[k]`` of the initial centres.

    The first centre is uniform; each next one is drawn with probability proportional to the squared
    distance to the nearest centre chosen so far (uniform among the rest if all distances are 0).
    """
    n = x.shape[0]
    idx = torch.empty(k, dtype=torch.long)
    idx[0] = torch.randint(n, (1,), generator=generator)
    closest = _sq_dists(x, x[idx[:1]])[:, 0]  # [N]
    for j in range(1, k):
        w = closest.clone()
        w[idx[:j]] = 0.0
        if float(w.sum()) <= 0.0:  # only duplicates of chosen centres left
            w = torch.ones(n, dtype=x.dtype)
            w[idx[:j]] = 0.0
        idx[j] = torch.multinomial(w, 1, generator=generator)
        closest = torch.minimum(closest, _sq_dists(x, x[idx[j: j + 1]])[:, 0])
    return idx


def _fill_empty(assign: torch.Tensor, dist: torch.Tensor, k: int) -> torch.Tensor:
    """Give every empty cluster one point: the point farthest from its centre among clusters with >= 2
    members (deterministic: ties go to the lower index). Needs ``N >= k``."""
    counts = torch.bincount(assign, minlength=k)
    empty = (counts == 0).nonzero()[:, 0].tolist()
    if not empty:
        return assign
    assign = assign.clone()
    own = dist.gather(1, assign[:, None])[:, 0].clone()  # [N] distance to own centre
    for c in empty:
        movable = counts[assign] >= 2
        score = torch.where(movable, own, torch.full_like(own, -1.0))
        p = int(torch.argmax(score))
        counts[assign[p]] -= 1
        counts[c] += 1
        assign[p] = c
        own[p] = -1.0  # never move it again
    return assign


def kmeans(x: torch.Tensor, num_clusters: int, seed: int = 0, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding.

    Args:
        x: ``[N, D]`` points (any float dtype; computed in float64 on the CPU).
        num_clusters: ``M`` with ``1 <= M <= N``.
        seed: seed of the ``torch.Generator`` that draws the k-means++ centres.
        iters: Lloyd iterations (fixed: no tolerance-based early stop, so runs are comparable).
    Returns:
        ``(assign, centroids)``: ``LongTensor [N]`` in ``[0, M)`` where **every** cluster has at least
        one member, and ``float64 [M, D]`` centroids (the means of the final clusters).
    """
    if x.dim() != 2:
        raise ValueError(f"k-means expects points [N, D], got {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters={num_clusters} must be between 1 and the number of codewords ({n}); "
                         f"a coarse vocabulary cannot be larger than the codebook it groups")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    x = x.detach().to("cpu", torch.float64)
    g = torch.Generator().manual_seed(int(seed))
    cent = x[kmeans_pp_init(x, num_clusters, g)].clone()  # [M, D]
    for _ in range(iters):
        dist = _sq_dists(x, cent)
        assign = _fill_empty(dist.argmin(1), dist, num_clusters)
        sums = torch.zeros_like(cent).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=num_clusters).to(x.dtype)
        new = sums / counts[:, None]
        if torch.equal(new, cent):
            break  # converged: further iterations would change nothing
        cent = new
    dist = _sq_dists(x, cent)
    assign = _fill_empty(dist.argmin(1), dist, num_clusters)
    sums = torch.zeros_like(cent).index_add_(0, assign, x)
    cent = sums / torch.bincount(assign, minlength=num_clusters).to(x.dtype)[:, None]
    return assign, cent


def build_cluster_map(codebook: torch.Tensor, num_clusters: int, seed: int = 0,
                      iters: int = 50) -> tuple[torch.Tensor, str]:
    """Coarse label of every codeword: k-means over the l2-normalised codebook.

    Args:
        codebook: ``[V, D]`` codebook as stored by the tokenizer (normalised here).
        num_clusters: number of coarse labels ``M <= V`` (512 in the CTF paper for a 16384 codebook).
    Returns:
        ``(cluster_map, hash)``: ``LongTensor [V]`` in ``[0, M)`` (every cluster non-empty) and the
        :func:`codebook_hash` of the codebook it was built on.
    """
    cb = normalize_codebook(codebook)
    if num_clusters > cb.shape[0]:
        raise ValueError(f"num_clusters={num_clusters} is larger than the codebook ({cb.shape[0]} codewords); "
                         f"choose at most {cb.shape[0]} clusters (the CTF paper uses 512 for 16384 codewords)")
    assign, _ = kmeans(cb, num_clusters, seed=seed, iters=iters)
    sizes = torch.bincount(assign, minlength=num_clusters)
    log.info("k-means: %d codewords -> %d clusters (sizes min %d, median %d, max %d)", cb.shape[0],
             num_clusters, int(sizes.min()), int(sizes.median()), int(sizes.max()))
    return assign, codebook_hash(codebook)
