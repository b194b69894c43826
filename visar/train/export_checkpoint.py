"""Export a training checkpoint (a run in progress, or any step kept) as what the run exports at its end.

``visar export RUN_OR_CHECKPOINT --out DIR`` rebuilds the model from the checkpoint's own ``meta.json``
(the whole training config), loads its EMA weights (or, with ``weights="model"``, the raw trained ones) and
writes a Pipeline folder for a generator (the config's frozen tokenizer, the caption cache's text encoder
for text-to-image, the config's ``sample.options`` as sampling defaults), or the task's
``save_pretrained`` folder otherwise. Nothing is unpickled: weights are safetensors and the trainer state
is not read. Use it to probe a run between checkpoints without stopping it.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from visar.train.checkpoint import find_latest, is_complete, is_sharded

log = logging.getLogger("visar.train")

WEIGHTS = ("ema", "model")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder ``path`` names: a complete ``step_*`` folder, or the newest complete one of a run's
    output folder (``<output_dir>`` or ``<output_dir>/checkpoints``)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} not found: give a run's train.output_dir or one of its "
                                "checkpoints/step_* folders")
    if is_complete(p):
        return p
    for root in (p / "checkpoints", p):
        if root.is_dir():
            found = find_latest(root)
            if found is not None:
                return found
    raise FileNotFoundError(f"{p} holds no complete visar checkpoint (a checkpoints/step_* folder with "
                            "model.safetensors, ema.safetensors, trainer_state.pt and meta.json)")


def export_checkpoint(path: str | os.PathLike, out: str | os.PathLike, weights: str = "ema") -> Path:
    """Write checkpoint ``path`` (see :func:`resolve_checkpoint`) to ``out`` as the run's export would be.

    Args:
        path: a run's output folder (its newest complete checkpoint is used) or a ``step_*`` folder.
        out: the folder to write (created; must not be inside the checkpoint folder).
        weights: ``"ema"`` (what the trainer exports and samples with) or ``"model"`` (the raw weights).

    Returns ``out``. Raises ``FileNotFoundError`` for a missing checkpoint or tokenizer, ``ValueError`` for a
    sharded checkpoint (export reads whole weights), an ``out`` inside the checkpoint or the installed package,
    or an ``out`` that cannot be written.
    """
    from visar.convert.common import load_state_strict
    from visar.train.config import load_config
    from visar.train.trainer import build_dataset, build_model, load_frozen_tokenizer, write_export
    from visar.utils.io import check_writable_dir, inside_package, load_safetensors, package_root

    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(map(repr, WEIGHTS))}, got {weights!r}")
    ckpt = resolve_checkpoint(path)
    out = Path(out)
    if out.resolve() == ckpt.resolve() or ckpt.resolve() in out.resolve().parents:
        raise ValueError(f"out={out} is inside the checkpoint {ckpt}: choose another folder")
    if inside_package(out):
        raise ValueError(f"out={out} lies inside the installed visar package ({package_root()}); write exports "
                         "elsewhere (e.g. runs/probe)")
    check_writable_dir(out, "out")
    file = ckpt / f"{weights}.safetensors"
    if is_sharded(ckpt):
        raise ValueError(f"{ckpt} is a sharded checkpoint (train.fsdp.state_dict: sharded) and holds no whole "
                         f"{file.name}; resume the run with train.fsdp.state_dict=full to write one, then export")
    meta = json.loads((ckpt / "meta.json").read_text())
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{ckpt / 'meta.json'} holds no training config (written by an older visar?)")
    cfg = load_config(None, [], data=meta["config"])
    model = build_model(cfg)
    load_state_strict(model, load_safetensors(file), source=str(file))
    model.eval()
    tokenizer = load_frozen_tokenizer(cfg) if cfg.task == "generator" else None
    text_encoder = None
    if getattr(model, "text_conditional", False):
        from visar.text import text_encoder_of  # the caption cache names its encoder

        text_encoder = text_encoder_of(build_dataset(cfg.data))
    write_export(cfg, model, tokenizer, out, text_encoder)
    log.info("exported %s weights of %s (step %s) to %s", weights, ckpt, meta.get("step"), out)
    return out


__all__ = ["export_checkpoint", "resolve_checkpoint", "WEIGHTS"]
