"""Class fidelity of shapes samples: a small CNN that tells the ten shape kinds apart.

:class:`ShapesClassifier` is trained by the visar trainer (``visar train configs/shapes_classifier.yaml``,
task ``classifier``) on :class:`visar.data.shapes.ShapesDataset`; its weights ship in
``visar/assets/classifier/`` (``classifier.json`` + ``classifier.safetensors``).

* ``class_fidelity(images, labels)``: the fraction of generated images classified as the class they were
  generated for (the class-conditional analogue of "does the model draw what it was asked for").
* ``ShapesClassifier.features(images)``: the pooled penultimate features ``[B, D]``, for a Fréchet
  distance between real and generated shapes.

The network uses GroupNorm (no BatchNorm), so a batch's loss does not depend on how the batch is split
across processes.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from visar.utils.config import Configurable, register_config
from visar.utils.validation import check_images, check_labels
from visar.registry import Preset

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "classifier"


class ShapesClassifier(Configurable):
    """CNN: stem conv, then per width a stride-2 conv block (conv-GN-SiLU x2), global average pool, linear.

    Args:
        num_classes: output classes (10 for shapes).
        widths: channels of the stages; each stage halves the resolution.
        image_size: inputs of another size are resized (area / bilinear) to this size first.
        groups: GroupNorm groups.
        blur_aug: training only: probability that an image is blurred with a Gaussian of random
            ``sigma ~ U(0.3, 1.5)`` px (at ``image_size``) and gets pixel noise of std ``U(0, 0.06)``;
            makes the classifier judge the shape kind of generated images rather than their sharpness.
    """

    family = "shapes-classifier"

    @register_config
    def __init__(self, num_classes: int = 10, widths: tuple = (32, 64, 128), image_size: int = 32, groups: int = 8,
                 blur_aug: float = 0.0):
        super().__init__()
        if num_classes < 2 or not widths or image_size < 8:
            raise ValueError("num_classes >= 2, a non-empty widths list and image_size >= 8 are required")
        if not 0.0 <= blur_aug <= 1.0:
            raise ValueError(f"blur_aug is a probability in [0, 1], got {blur_aug}")
        self.num_classes, self.image_size, self.blur_aug = num_classes, image_size, blur_aug
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1), nn.GroupNorm(min(groups, widths[0]), widths[0]),
                                   nn.SiLU()]
        c = widths[0]
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GroupNorm(min(groups, w), w), nn.SiLU(),
                       nn.Conv2d(w, w, 3, padding=1), nn.GroupNorm(min(groups, w), w), nn.SiLU()]
            c = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)
        self.feature_dim = c

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, 1)
        x = images.to(self.head.weight.dtype)
        if x.shape[-2:] != (self.image_size, self.image_size):
            down = x.shape[-1] > self.image_size
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="area" if down else "bilinear",
                              align_corners=None if down else False)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` -> pooled features ``[B, feature_dim]``."""
        return self.body(self._prepare(images)).mean((2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` -> logits ``[B, num_classes]``."""
        return self.head(self.features(images))

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """Random Gaussian blur and pixel noise (``blur_aug``), drawn from the global torch RNG. ``x``: prepared ``[B, 3, S, S]``."""
        B = x.shape[0]
        pick = torch.rand(B, device=x.device) < self.blur_aug
        sigma = 0.3 + 1.2 * torch.rand(B, device=x.device)
        noise = 0.06 * torch.rand(B, 1, 1, 1, device=x.device)
        t = torch.arange(-3, 4, device=x.device, dtype=x.dtype)
        k = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
        k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)          # [B*3, 7]
        y = x.reshape(1, B * 3, *x.shape[-2:])
        y = F.conv2d(F.pad(y, (3, 3, 0, 0), mode="replicate"), k[:, None, None, :], groups=B * 3)
        y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), k[:, None, :, None], groups=B * 3)
        y = y.reshape_as(x)
        y = y + noise * torch.randn_like(y)
        return torch.where(pick[:, None, None, None], y, x)

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy (``loss``) and batch accuracy (``acc``) of ``images`` against ``labels [B]``
        (with the ``blur_aug`` augmentation in training mode)."""
        check_labels(labels, self.num_classes)
        x = self._prepare(images)
        if self.training and self.blur_aug > 0:
            x = self.augment(x)
        logits = self.head(self.body(x).mean((2, 3)))
        loss = F.cross_entropy(logits.float(), labels)
        acc = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, "acc": acc.detach()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Predicted class ids ``LongTensor [B]``."""
        was = self.training
        self.eval()
        out = torch.cat([self(images[i:i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)])
        self.train(was)
        return out


def load_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> ShapesClassifier:
    """The bundled classifier (``visar/assets/classifier``), or one exported by the trainer at ``path`` (flat
    ``classifier.json`` + ``classifier.safetensors``, or a component folder: ``path/classifier/config.json`` or
    ``path/config.json``)."""
    from visar.utils.config import find_saved

    d = Path(path) if path is not None else ASSET_DIR
    if find_saved(d, "classifier") is None:
        raise FileNotFoundError(f"no classifier.json (or classifier/config.json, config.json) in {d}; train one with "
                                "`visar train configs/shapes_classifier.yaml` (it exports to its output_dir/export)")
    return ShapesClassifier.from_pretrained(d, "classifier", map_location=device).eval()


_CACHE: dict[str, ShapesClassifier] = {}


@torch.no_grad()
def class_fidelity(images: torch.Tensor, labels: torch.Tensor, classifier: ShapesClassifier | None = None) -> float:
    """Fraction of ``images [B, 3, H, W]`` in ``[-1, 1]`` that the classifier assigns to ``labels [B]``."""
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {labels.shape[0]} labels")
    if classifier is None:
        if "bundled" not in _CACHE:
            _CACHE["bundled"] = load_classifier()
        classifier = _CACHE["bundled"]
    check_labels(labels, classifier.num_classes)
    dev = next(classifier.parameters()).device
    pred = classifier.predict(images.to(dev).float())
    return float((pred.cpu() == labels.cpu()).float().mean())


PRESETS = {
    "shapes-classifier": Preset(cls="visar.eval.classifier:ShapesClassifier",
                                kwargs={"num_classes": 10, "widths": [32, 64, 128], "image_size": 32},
                                kind="classifier", paper="visar: class-fidelity classifier for the shapes dataset"),
}
