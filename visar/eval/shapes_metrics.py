"""Offline quality metrics for models trained on the procedural shapes dataset.

No Inception weights are needed: the bundled :class:`~visar.eval.classifier.ShapesClassifier` gives

* **class fidelity**: the fraction of samples the classifier assigns to the class they were generated
  for (the same number on held-out real shapes, ``reference_class_fidelity``, is its ceiling);
* **Fréchet classifier distance** (FCD): the Fréchet distance (float64, :mod:`visar.eval.frechet`)
  between the classifier's pooled features of the samples and of held-out shapes
  (``ShapesDataset(split="test")`` rendered at the samples' size). Like FID, lower is better and it is
  biased upwards for small sets: compare numbers made with the same ``num_reference`` and sample count.

It also reports which classes fail: the class fidelity of each class (``per_class_fidelity``, keyed by
:data:`~visar.data.shapes.CLASSES` name) and the confusion counts (``confusion[i][j]``: samples of class
``i`` the classifier calls ``j``).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from visar.eval.frechet import frechet_distance_from_features, gaussian_statistics

log = logging.getLogger("visar.eval")

#: npz members read as the class of each sample, in this order
LABEL_KEYS = ("arr_1", "labels")


def _samples_and_labels(samples: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``[N, H, W, 3]`` images and ``LongTensor [N]`` labels from a folder / npz / arrays."""
    from pathlib import Path

    from visar.eval.metrics import open_input
    from visar.eval.sidecar import SIDECAR_NAME, load_sidecar

    if isinstance(samples, torch.Tensor) and samples.is_floating_point():
        if labels is None:
            raise ValueError("give the class labels the samples were generated for (labels=[N] ints)")
        if samples.dim() != 4 or samples.shape[1] != 3:
            raise ValueError(f"float samples must be [N, 3, H, W] in [-1, 1], got {tuple(samples.shape)}")
        from visar.utils.images import to_uint8

        return to_uint8(samples), torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    inp = open_input(samples, "samples")
    if not inp.has_images:
        raise ValueError(f"{inp.name} holds no images")
    images = torch.from_numpy(np.concatenate(list(inp.batches(1024))))
    if labels is None and isinstance(samples, (str, os.PathLike)):
        p = Path(samples)
        if p.suffix == ".npz":
            with np.load(p) as f:
                for key in LABEL_KEYS:  # arr_1 (ADM, `visar eval sample`, `visar sample --npz`), labels (older files)
                    if key in f.files:
                        labels = f[key]
                        break
            if labels is None and (p.parent / SIDECAR_NAME).is_file():
                p = p.parent
        if labels is None and p.is_dir() and (p / SIDECAR_NAME).is_file():
            from visar.eval.sampling import class_labels

            rec = load_sidecar(p)
            labels = class_labels(rec.labels, rec.num, rec.num_classes, rec.seed)[:len(images)]
    if labels is None:
        raise ValueError(f"{inp.name}: cannot tell which class each sample was generated for; give the labels "
                         "(`visar eval shapes --labels FILE|IDS`, or labels= in Python), use a folder made by "
                         "`visar eval sample` (its samples.json) or an npz with arr_1 labels (`visar sample --npz`)")
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} samples but {len(labels)} labels")
    return images, labels


@torch.no_grad()
def _features_and_predictions(classifier, images_u8: torch.Tensor, batch_size: int, device) -> tuple[np.ndarray,
                                                                                                     torch.Tensor]:
    feats, preds = [], []
    for s in range(0, len(images_u8), batch_size):
        x = images_u8[s:s + batch_size].permute(0, 3, 1, 2).to(device).float() / 127.5 - 1.0  # [B, 3, H, W]
        f = classifier.features(x)
        feats.append(f.double().cpu().numpy())
        preds.append(classifier.head(f).argmax(-1).cpu())
    return np.concatenate(feats), torch.cat(preds)


def shapes_metrics(samples: Any, labels: Any = None, *, num_reference: int = 2000, reference_seed: int = 0,
                   classifier: Any = None, batch_size: int = 256, device: str | torch.device = "cpu") -> dict:
    """Class fidelity and Fréchet classifier distance of shapes samples.

    Args:
        samples: a ``visar eval sample`` folder (labels from its sidecar), an ``.npz`` (``arr_0`` images,
            ``arr_1`` or ``labels`` labels), a folder of images with ``labels``, a ``uint8 [N, H, W, 3]`` array, or a float
            tensor ``[N, 3, H, W]`` in ``[-1, 1]`` with ``labels``.
        labels: class of each sample, ``[N]`` ints in ``[0, 10)`` (read from the sample set when omitted).
        num_reference: held-out real shapes (``ShapesDataset(split="test", seed=reference_seed)``).
        classifier: a :class:`~visar.eval.classifier.ShapesClassifier` (default: the bundled one).

    Returns:
        ``{"class_fidelity", "reference_class_fidelity", "frechet_classifier_distance", "num_samples",
        "num_reference", "image_size", "per_class_fidelity", "confusion"}``: ``per_class_fidelity`` maps each
        class name that has samples to its fidelity in ``[0, 1]``; ``confusion`` is a ``num_classes x
        num_classes`` list of int counts (rows: asked class, columns: the classifier's answer).
    """
    from visar.data.shapes import CLASSES, ShapesDataset
    from visar.eval.classifier import load_classifier
    from visar.utils.validation import check_labels

    if not isinstance(num_reference, int) or num_reference < 2:
        raise ValueError(f"num_reference must be an int >= 2, got {num_reference!r}")
    images, labels = _samples_and_labels(samples, labels)
    if len(images) < 2:
        raise ValueError(f"the Fréchet distance needs at least 2 samples, got {len(images)}")
    clf = (classifier if classifier is not None else load_classifier()).to(device).eval()
    check_labels(labels, clf.num_classes)
    H, W = images.shape[1:3]
    if H != W:
        raise ValueError(f"shapes samples must be square, got {H}x{W}")
    ref = ShapesDataset(size=int(H), length=num_reference, split="test", seed=reference_seed)
    ref_u8 = torch.cat([torch.from_numpy(np.ascontiguousarray(
        ((ref.render(range(s, min(s + 512, num_reference)))[0] * 127.5 + 128).clamp(0, 255).to(torch.uint8)
         .permute(0, 2, 3, 1).numpy()))) for s in range(0, num_reference, 512)])
    ref_labels = torch.as_tensor(ref.attributes(range(num_reference))["label"], dtype=torch.long)
    s_feat, s_pred = _features_and_predictions(clf, images, batch_size, device)
    r_feat, r_pred = _features_and_predictions(clf, ref_u8, batch_size, device)
    k = clf.num_classes
    confusion = torch.bincount(labels * k + s_pred, minlength=k * k).reshape(k, k)
    names = CLASSES if len(CLASSES) == k else tuple(str(c) for c in range(k))
    per_class = {names[c]: float(confusion[c, c] / confusion[c].sum()) for c in range(k) if confusion[c].sum() > 0}
    return {
        "class_fidelity": float((s_pred == labels).float().mean()),
        "reference_class_fidelity": float((r_pred == ref_labels).float().mean()),
        "frechet_classifier_distance": frechet_distance_from_features(s_feat, *gaussian_statistics(r_feat)),
        "num_samples": len(images), "num_reference": num_reference, "image_size": int(H),
        "per_class_fidelity": per_class, "confusion": confusion.tolist(),
    }
