"""ImageFolder dataset with the ADM centre crop used by ImageNet evaluations.

``root/<class>/<image>`` trees (class ids follow the sorted folder names), or a flat folder of images
(all class 0). Each image is converted to RGB and centre-cropped the ADM way (Dhariwal & Nichol 2021,
``guided_diffusion/image_datasets.py``; also LlamaGen, VAR, MAR): while the short side is at least
twice the target, halve the image with a BOX filter; then BICUBIC-resize so the short side equals the
target; then crop the centre square.

Horizontal flips are deterministic: with ``flip=True`` the dataset has ``2 N`` items and item
``i + N`` is item ``i`` mirrored, so a seeded permutation of indices decides the flips (resumable,
identical on every process).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


def center_crop_adm(image, size: int):
    """PIL image -> PIL image ``size x size`` (ADM: repeated BOX halving, BICUBIC resize, centre crop)."""
    from PIL import Image

    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left = (image.size[0] - size) // 2
    top = (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def pil_to_tensor(image) -> torch.Tensor:
    """RGB PIL image -> ``FloatTensor [3, H, W]`` in ``[-1, 1]`` (``u8 / 127.5 - 1``)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def scan_image_folder(root: str | os.PathLike,
                      extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> tuple[list[Path], list[int], list[str]]:
    """``(files, labels, class_names)`` of an ImageFolder tree (or a flat folder: one class ``""``)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder; give the root of root/<class>/<image> files")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[Path] = []
    labels: list[int] = []
    if classes:
        for k, c in enumerate(classes):
            found = sorted(p for p in (root / c).rglob("*") if p.suffix.lower() in extensions and p.is_file())
            files += found
            labels += [k] * len(found)
    else:
        files = sorted(p for p in root.iterdir() if p.suffix.lower() in extensions and p.is_file())
        labels = [0] * len(files)
        classes = [""]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(extensions)}) found under {root}")
    return files, labels, classes


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of an ImageFolder tree, ADM centre-cropped to ``size``.

    Args:
        root: ``root/<class>/<image>`` or a flat folder of images.
        size: output side in pixels.
        flip: double the dataset with mirrored copies (item ``i + N`` = item ``i`` flipped).

    Items: ``{"image": FloatTensor [3, size, size] in [-1, 1], "label": int}``.
    """

    def __init__(self, root: str | os.PathLike, size: int = 256, flip: bool = False,
                 extensions: tuple[str, ...] = IMAGE_EXTENSIONS):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.root, self.size, self.flip = Path(root), size, bool(flip)
        self.files, self.labels, self.classes = scan_image_folder(root, extensions)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.files) * (2 if self.flip else 1)

    def item_labels(self) -> torch.Tensor:
        """``LongTensor [len(self)]``: the class index of every item, mirrored copies included, without loading
        any image."""
        labels = torch.as_tensor(self.labels, dtype=torch.long)
        return labels.repeat(2) if self.flip else labels

    def load(self, i: int) -> torch.Tensor:
        """The cropped, unflipped image of file ``i`` as ``[3, size, size]`` in ``[-1, 1]``."""
        from PIL import Image, UnidentifiedImageError

        path = self.files[i]
        try:
            with Image.open(path) as im:
                im.load()
                img = center_crop_adm(im.convert("RGB"), self.size)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"image {path} disappeared since the folder was scanned") from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"cannot read image {path}: {e} (corrupt or not an image; remove or replace it)") from e
        return pil_to_tensor(img)

    def __getitem__(self, index: int) -> dict:
        n = len(self.files)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        i, mirrored = index % n, index >= n
        x = self.load(i)
        if mirrored:
            x = x.flip(-1)
        return {"image": x, "label": self.labels[i]}
