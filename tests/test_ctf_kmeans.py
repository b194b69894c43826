"""CTF coarse labels: seeded k-means over the l2-normalised codebook."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visar.generators.coarse_to_fine.kmeans import build_cluster_map, codebook_hash, kmeans, normalize_codebook


def _codebook(v=256, d=8, seed=0, scale=3.0):
    return torch.randn(v, d, generator=torch.Generator().manual_seed(seed)) * scale


def test_map_is_deterministic_given_seed_and_covers_every_codeword():
    cb = _codebook()
    m1, h1 = build_cluster_map(cb, 32, seed=7, iters=20)
    m2, h2 = build_cluster_map(cb.clone(), 32, seed=7, iters=20)
    assert m1.dtype == torch.long and m1.shape == (256,)
    assert torch.equal(m1, m2) and h1 == h2
    assert int(m1.min()) >= 0 and int(m1.max()) < 32
    assert (torch.bincount(m1, minlength=32) > 0).all(), "every cluster must have a codeword"
    m3, _ = build_cluster_map(cb, 32, seed=8, iters=20)
    assert not torch.equal(m1, m3), "another seed should give another clustering"


def test_clusters_follow_normalised_rows_not_raw_scale():
    # scaling a codeword does not move it on the unit sphere: the map must not change
    cb = _codebook()
    scaled = cb * torch.rand(256, 1, generator=torch.Generator().manual_seed(1)).add(0.5)
    m1, h1 = build_cluster_map(cb, 16, seed=0, iters=20)
    m2, h2 = build_cluster_map(scaled, 16, seed=0, iters=20)
    assert torch.equal(m1, m2)
    assert codebook_hash(cb) != codebook_hash(cb + 0.01)


def test_kmeans_assigns_each_point_to_nearest_centroid_on_separated_data():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 10
    x = torch.cat([c + 0.1 * torch.randn(20, 4, generator=g) for c in centres])
    assign, cent = kmeans(x, 4, seed=3, iters=30)
    # each true group ends up in exactly one cluster
    for k in range(4):
        assert assign[20 * k: 20 * (k + 1)].unique().numel() == 1
    assert assign.unique().numel() == 4
    d = torch.cdist(x.double(), cent)
    assert torch.equal(d.argmin(1), assign)


def test_duplicated_codewords_still_fill_every_cluster():
    cb = _codebook(4).repeat(10, 1)  # 40 codewords, only 4 distinct
    m, _ = build_cluster_map(cb, 8, seed=0, iters=10)
    assert (torch.bincount(m, minlength=8) > 0).all()


def test_too_many_clusters_is_a_clear_error():
    with pytest.raises(ValueError, match="larger than the codebook"):
        build_cluster_map(_codebook(16), 17)
    with pytest.raises(ValueError, match="float tensor"):
        build_cluster_map(torch.zeros(16, dtype=torch.long), 4)


def test_normalize_matches_llamagen_rows():
    cb = _codebook()
    assert torch.allclose(normalize_codebook(cb), F.normalize(cb, dim=-1))
