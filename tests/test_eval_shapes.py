"""Offline shapes metrics: class fidelity and Fréchet distance in the bundled classifier's feature space."""
from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def classifier():
    from visar.eval.classifier import load_classifier

    try:
        return load_classifier()
    except FileNotFoundError as e:
        pytest.skip(f"bundled shapes classifier not available: {e}")


def test_real_shapes_score_well_and_noise_badly(classifier):
    from visar.data.shapes import ShapesDataset
    from visar.eval.shapes_metrics import shapes_metrics

    x, y = ShapesDataset(size=32, length=200, split="train", seed=0).render(range(200))
    real = shapes_metrics(x, y, num_reference=300, classifier=classifier)
    assert real["class_fidelity"] > 0.9 and real["reference_class_fidelity"] > 0.9
    noise = shapes_metrics(torch.rand_like(x) * 2 - 1, y, num_reference=300, classifier=classifier)
    assert noise["class_fidelity"] < 0.4
    assert noise["frechet_classifier_distance"] > 20 * real["frechet_classifier_distance"]
    assert set(real["per_class_fidelity"]) == set(ShapesDataset.classes)
    conf = np.array(real["confusion"])
    assert conf.shape == (10, 10) and conf.sum() == 200 and (conf.sum(1) == 20).all()
    assert np.trace(conf) / 200 == pytest.approx(real["class_fidelity"])
    for c, name in enumerate(ShapesDataset.classes):
        assert real["per_class_fidelity"][name] == pytest.approx(conf[c, c] / 20)
    wrong = shapes_metrics(x, (y + 1) % 10, num_reference=300, classifier=classifier)
    assert all(v < 0.2 for v in wrong["per_class_fidelity"].values())
    assert wrong["class_fidelity"] < 0.1  # right images, wrong classes: fidelity drops, FCD cannot see it
    assert wrong["frechet_classifier_distance"] == pytest.approx(real["frechet_classifier_distance"])


def test_shapes_metrics_inputs(classifier, tmp_path):
    from visar.eval.shapes_metrics import shapes_metrics

    u8 = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="cannot tell which class"):
        shapes_metrics(u8, classifier=classifier)
    np.savez(tmp_path / "s.npz", arr_0=u8, arr_1=np.arange(6))
    out = shapes_metrics(tmp_path / "s.npz", num_reference=10, classifier=classifier)
    assert out["num_samples"] == 6 and out["image_size"] == 32
    assert len(out["per_class_fidelity"]) == 6  # classes without samples are left out, not reported as 0
    with pytest.raises(ValueError, match="class ids must lie in"):
        shapes_metrics(u8, labels=np.full(6, 12), num_reference=10, classifier=classifier)
    with pytest.raises(ValueError, match="6 samples but 5 labels"):
        shapes_metrics(u8, labels=np.arange(5), num_reference=10, classifier=classifier)
