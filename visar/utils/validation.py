"""Input checks shared by every public entry point; errors say what is wrong and how to fix it."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("visar")


def check_images(images: torch.Tensor, downsample: int, name: str = "images") -> None:
    """Validate ``images [B, 3, H, W]`` in ``[-1, 1]`` for a tokenizer with the given ``downsample``."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B, 3, H, W] in [-1, 1], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must have shape [B, 3, H, W] (RGB, channels first), got {tuple(images.shape)}; "
                         "convert grayscale/RGBA images to RGB first")
    H, W = images.shape[-2:]
    if H % downsample or W % downsample:
        raise ValueError(f"{name} size {H}x{W} is not divisible by the tokenizer's downsample factor {downsample}; "
                         f"resize or crop to a multiple of {downsample} (e.g. {H // downsample * downsample or downsample}"
                         f"x{W // downsample * downsample or downsample})")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be floating point in [-1, 1]; uint8 images: x = x.float() / 127.5 - 1")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch {tuple(images.shape)}: give at least one image")
    if images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"{name} have an empty size {H}x{W}")
    bad = int((~torch.isfinite(images)).sum())
    if bad:
        raise ValueError(f"{name} hold {bad} NaN or infinite values (of {images.numel()}); tokenizers need finite "
                         "pixels in [-1, 1]: check how the images were loaded or normalised")
    lo, hi = (float(v) for v in torch.aminmax(images.detach()))
    if lo < -1.5 or hi > 1.5:
        log.warning("%s range [%.3g, %.3g] is far outside [-1, 1]; visar tokenizers expect x = 2 * u8 / 255 - 1",
                    name, lo, hi)


def check_labels(labels: torch.Tensor, num_classes: int, allow_null: bool = False) -> None:
    """Class ids must be integers in ``[0, num_classes)`` (``num_classes`` itself if ``allow_null``)."""
    if labels.is_floating_point():
        raise TypeError("class ids must be an integer tensor")
    hi = num_classes + 1 if allow_null else num_classes
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= hi):
        raise ValueError(f"class ids must lie in [0, {num_classes}) for this model; got "
                         f"min {int(labels.min())}, max {int(labels.max())}")


def check_tokens(tokens: torch.Tensor, vocab_size: int, name: str = "tokens") -> None:
    if tokens.is_floating_point():
        raise TypeError(f"{name} must be integer token ids, got {tokens.dtype}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"{name} must lie in [0, {vocab_size}) (the vocabulary size); got min {int(tokens.min())}, "
                         f"max {int(tokens.max())}. Is the tokenizer the one this generator was trained with?")


def check_device(device: "str | torch.device", flag: str = "device") -> torch.device:
    """A ``torch.device`` for ``device``, or a ``ValueError`` naming ``flag`` when it does not exist here
    (``cuda`` without a GPU says that CUDA is not available, instead of failing later while loading)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{flag} {device!r} is not a device (use cpu, cuda or cuda:N): {e}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device}: CUDA is not available on this machine (torch.cuda.is_available() "
                             "is False: no GPU, or a CPU-only build of torch); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{flag} {device}: MPS is not available on this machine; use cpu")
    return dev
