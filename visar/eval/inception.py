"""The FID Inception-v3 (torch-fidelity's port of the 2015-12-05 TensorFlow graph), loaded offline.

Weights come from a local file: the ``inception_weights=`` argument or ``$VISAR_INCEPTION_WEIGHTS``.
The file is read with ``torch.load(weights_only=True)`` (no pickled code runs) and handed to
torch-fidelity's ``FeatureExtractorInceptionV3``, which gives, for ``uint8 [B, 3, H, W]`` images
(resized inside to 299 like TF), ``"2048"`` pool features (FID, KID, precision/recall) and
``"logits_unbiased"`` (Inception Score).

:func:`random_inception_weights` writes a Kaiming-initialised file with the same layout, so tests and
offline smoke runs exercise the exact code path of the real weights (scores are then meaningless).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("visar.eval")

WEIGHTS_ENV = "VISAR_INCEPTION_WEIGHTS"
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
#: torch hub convention: the file name carries the first hex digits of its sha256
WEIGHTS_SHA256_PREFIX = "6726825d"
EXTRACTOR_NAME = "inception-v3-compat"
FEATURES = ("2048", "logits_unbiased")
_MARKER_KEYS = ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.conv.weight", "fc.weight")


def resolve_weights(inception_weights: str | os.PathLike | None = None) -> Path:
    """The local Inception weights file, from the argument or ``$VISAR_INCEPTION_WEIGHTS``.

    Raises:
        FileNotFoundError: neither is set or the file does not exist; the message says which file is
            needed and where to get it.
    """
    src = inception_weights if inception_weights is not None else os.environ.get(WEIGHTS_ENV)
    how = (f"FID/IS/KID/precision-recall need the FID Inception-v3 weights (the TF 2015-12-05 graph used by the "
           f"TTUR/ADM evaluators and pytorch-fid) in torch-fidelity's format: {WEIGHTS_FILE} (~91 MB). visar never "
           f"downloads: fetch it once on a machine with internet from\n  {WEIGHTS_URL}\nthen pass "
           f"inception_weights=PATH (CLI: --inception-weights PATH) or set {WEIGHTS_ENV}=PATH.")
    if src is None or str(src) == "":
        raise FileNotFoundError("no Inception weights given. " + how)
    path = Path(src).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file {path} not found. " + how)
    return path


def load_inception_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read and check the weights (tensors only, ``weights_only=True``)."""
    from visar.convert.common import CheckpointError, read_checkpoint

    state = read_checkpoint(path)
    missing = [k for k in _MARKER_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not the FID Inception-v3 state dict in torch-fidelity's layout (it lacks "
                              f"{missing}); expected {WEIGHTS_FILE} from {WEIGHTS_URL}")
    if tuple(state["fc.weight"].shape) != (1008, 2048):
        raise CheckpointError(f"{path}: fc.weight is {tuple(state['fc.weight'].shape)}, expected (1008, 2048) "
                              "(the TF FID graph has 1008 logits); this is a torchvision Inception, not the FID one")
    return state


def build_extractor(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` giving ``FEATURES``, with the weights at ``path``.

    The weights are loaded by visar (``weights_only=True``) and passed to torch-fidelity through the hook it
    uses for downloads, so torch-fidelity's own ``torch.load(weights_only=False)`` never runs on user files.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    from unittest import mock

    state = load_inception_state(path)
    if hasattr(fe, "load_state_dict_from_url"):
        with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: state):
            model = fe.FeatureExtractorInceptionV3(EXTRACTOR_NAME, list(FEATURES))
    else:  # a torch-fidelity without that hook: its loader reads the (already validated, tensor-only) file
        model = fe.FeatureExtractorInceptionV3(EXTRACTOR_NAME, list(FEATURES), feature_extractor_weights_path=str(path))
    return model.to(device).eval()


def random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write Kaiming-initialised FID-Inception weights to ``path`` (for tests and offline smoke runs only).

    With PyTorch's default init the features collapse (every FID is ~0); Kaiming-normal convolutions
    (fan-in, ReLU gain) keep activations alive through the 94 layers, so metrics differ between inputs.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    from unittest import mock

    class _Unloaded(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the random init: no weights are loaded
            return None

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}):
        model = _Unloaded(EXTRACTOR_NAME, list(FEATURES))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight.shape[1] ** 0.5)
                m.bias.zero_()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    import io

    from visar.utils.io import atomic_write_bytes

    buf = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path
