"""FID / IS / KID / precision-recall: float64 Fréchet distance, offline random Inception, caches, bad inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from visar.eval import metrics
from visar.eval.frechet import frechet_distance, frechet_distance_from_features, gaussian_statistics
from visar.eval.io import write_png

N = 6  # images per side: enough for FID (>= 2), KID subsets of 4, precision/recall (> 3 neighbours)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A Kaiming-random FID Inception saved to a local file: the same code path as the real weights."""
    from visar.eval.inception import random_inception_weights

    return random_inception_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth", seed=0)


def _images(seed: int, n: int = N, size: int = 16, smooth: bool = False) -> np.ndarray:
    g = np.random.default_rng(seed)
    if smooth:  # colour gradients: a distribution unlike uniform noise
        ramp = np.linspace(0, 1, size)[None, :, None, None] * g.uniform(0, 255, (n, 1, 1, 3))
        return np.broadcast_to(ramp, (n, size, size, 3)).astype(np.uint8).copy()
    return g.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _folder(path, images):
    path.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        write_png(path / f"{i:06d}.png", im)
    return path


@pytest.mark.parametrize("n,d", [(300, 64), (40, 64)])  # full-rank and rank-deficient covariances
def test_frechet_distance_matches_torch_fidelity(n, d):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    g = np.random.default_rng(n)
    a = g.normal(size=(n, d)).astype(np.float32)
    b = (g.normal(size=(n, d)) * 1.3 + 0.2).astype(np.float32)
    ours = frechet_distance(*gaussian_statistics(a), *gaussian_statistics(b))
    theirs = fid_statistics_to_metric(fid_features_to_statistics(torch.from_numpy(a).double()),
                                      fid_features_to_statistics(torch.from_numpy(b).double()), False)
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-7)
    assert frechet_distance_from_features(a, *gaussian_statistics(b)) == pytest.approx(ours, rel=1e-7)
    mu, sigma = gaussian_statistics(a)
    assert mu.dtype == sigma.dtype == np.float64
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-5 * np.trace(sigma)  # sqrt of round-off eigenvalues


def test_metrics_end_to_end_with_local_random_inception(tmp_path, weights, monkeypatch):
    samples, ref = _images(1), _images(2, smooth=True)
    s_dir = _folder(tmp_path / "samples", samples)
    ref_npz = tmp_path / "ref.npz"
    np.savez(ref_npz, arr_0=ref)
    cache = tmp_path / "cache"
    kw = dict(inception_weights=weights, batch_size=N, kid_subset_size=4, kid_subsets=5, isc_splits=2,
              cache_dir=cache, progress=False)
    out = metrics.compute_metrics(s_dir, ref_npz, **kw)
    assert out["num_samples"] == out["num_reference"] == N
    assert out["frechet_inception_distance"] > 1e-3 and np.isfinite(out["frechet_inception_distance"])
    assert out["inception_score_mean"] >= 1.0 and np.isfinite(out["kernel_inception_distance_mean"])
    assert 0.0 <= out["precision"] <= 1.0 and 0.0 <= out["recall"] <= 1.0
    # the features are those of torch-fidelity's extractor loading the same file itself
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    tf = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    with torch.no_grad():
        (tf_feat,) = tf(torch.from_numpy(ref).permute(0, 3, 1, 2))
    with np.load(next(cache.glob("ref-*.npz"))) as f:
        assert np.array_equal(f["features"], tf_feat.numpy())
        mu, sigma = f["mu"], f["sigma"]
    s_feat, _ = metrics._extract(metrics.build_extractor(weights), metrics.open_input(samples, "samples"), N,
                                 torch.device("cpu"), False)
    # (frechet_distance_from_features == frechet_distance is checked above; the D x D route costs ~30 s here)
    assert out["frechet_inception_distance"] == pytest.approx(frechet_distance_from_features(s_feat, mu, sigma),
                                                              rel=1e-9)
    # second run: the reference comes from the content-hash cache (only the samples are extracted)
    assert len(list(cache.glob("ref-*.npz"))) == 1
    calls = []
    real = metrics._extract
    monkeypatch.setattr(metrics, "_extract", lambda ex, inp, *a: calls.append(inp.name) or real(ex, inp, *a))
    out2 = metrics.compute_metrics(samples, ref_npz, fid=True, isc=False, kid=False, prc=False,
                                   **{k: v for k, v in kw.items() if k not in ("kid_subset_size", "kid_subsets")})
    assert calls == ["samples"]
    assert out2["frechet_inception_distance"] == pytest.approx(out["frechet_inception_distance"], rel=1e-6)
    # an ADM-style reference batch (float64 mu/sigma only) gives the same FID
    np.savez(tmp_path / "adm.npz", mu=mu, sigma=sigma)
    out3 = metrics.compute_metrics(samples, tmp_path / "adm.npz", isc=False, kid=False, prc=False,
                                   inception_weights=weights, batch_size=N, progress=False)
    assert out3["frechet_inception_distance"] == pytest.approx(out["frechet_inception_distance"], rel=1e-6)


def test_missing_weights_say_which_file(monkeypatch, tmp_path):
    monkeypatch.delenv("VISAR_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="(?s)weights-inception-2015-12-05-6726825d.pth.*VISAR_INCEPTION"):
        metrics.compute_metrics(_images(0), _images(1))
    with pytest.raises(FileNotFoundError, match="(?s)not found.*torch-fidelity/releases"):
        metrics.compute_metrics(_images(0), _images(1), inception_weights=tmp_path / "nope.pth")
    monkeypatch.setenv("VISAR_INCEPTION_WEIGHTS", str(tmp_path / "env.pth"))
    with pytest.raises(FileNotFoundError, match="env.pth"):
        metrics.compute_metrics(_images(0), _images(1))


def test_bad_inputs_fail_before_feature_extraction(tmp_path):
    fake = tmp_path / "w.pth"
    torch.save({"conv.weight": torch.zeros(1)}, fake)
    kw = dict(inception_weights=fake, progress=False)
    with pytest.raises(ValueError, match="384x384 but the reference is 256x256.*resize=256"):
        metrics.compute_metrics(_images(0, size=384, n=2), _images(1, size=256, n=2), **kw)
    np.savez(tmp_path / "bad.npz", images=_images(0))
    with pytest.raises(ValueError, match="'arr_0'.*'mu' and 'sigma'"):
        metrics.compute_metrics(_images(0), tmp_path / "bad.npz", **kw)
    with pytest.raises(ValueError, match="has neither: it needs 'arr_0'"):
        metrics.compute_metrics(tmp_path / "bad.npz", _images(0), **kw)
    with pytest.raises(ValueError, match="kid_subset_size=1000.*have 6"):
        metrics.compute_metrics(_images(0), _images(1), fid=False, isc=False, prc=False, kid_subset_size=1000, **kw)
    with pytest.raises(ValueError, match="isc_splits=10"):
        metrics.compute_metrics(_images(0), None, fid=False, kid=False, prc=False, **kw)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(ValueError, match="only mu/sigma: KID"):
        metrics.compute_metrics(_images(0), tmp_path / "stats.npz", **kw)
    with pytest.raises(ValueError, match="uint8"):
        metrics.compute_metrics(_images(0).astype(np.float32), _images(1), **kw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        metrics.compute_metrics(tmp_path / "empty", _images(1), **kw)
    from visar.convert.common import CheckpointError

    with pytest.raises(CheckpointError, match="not the FID Inception"):
        metrics.compute_metrics(_images(0), _images(1), fid=True, isc=False, kid=False, prc=False, **kw)


def test_corrupt_image_is_named(tmp_path, weights):
    d = _folder(tmp_path / "s", _images(0, n=4))
    (d / "000002.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="000002.png"):
        metrics.compute_metrics(d, _images(1, n=4), inception_weights=weights, isc=False, kid=False, prc=False,
                                progress=False)
    (d / "000000.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="000000.png"):
        metrics.compute_metrics(d, _images(1, n=4), inception_weights=weights, progress=False)
