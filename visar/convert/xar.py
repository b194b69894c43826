"""Load the released xAR checkpoints (``xAR-B.pth``, ``xAR-L.pth``, ``xAR-H.pth``).

The files are bare float32 state dicts of the official ``xAR`` module with buffers that visar
rebuilds: ``mask`` (``[1, 1, 256, 256]``, block-causal over the 4 cells) and, in every attention
layer, ``rope.freqs`` / ``rope.freqs_cos`` / ``rope.freqs_sin`` (``[256, head_dim]`` tables permuted
into cell order). They are compared with visar's rebuilt values and dropped.

Key mapping: ``class_emb.weight -> class_emb.embedding_table.weight`` and timm SwiGLU
``mlp.fc1_g / fc1_x / fc2 -> mlp.w1 / w3 / w2``; everything else keeps its name.
"""
from __future__ import annotations

import math
import os

import torch

from visar.convert.common import (Converter, CheckpointError, load_state_strict, read_checkpoint, rename_keys, require_keys,
                                  unwrap_state_dict)
from visar.convert.mar import load_tokenizer as load_mar_tokenizer
from visar.convert.common import count_blocks
from visar.convert.flowar import SWIGLU_RULES, check_mask, check_rope_freqs
from visar.nn.adaln_block import swiglu_hidden
from visar.registry import register

MARKERS = ["z_proj.weight", "time_embed.mlp.0.weight", "encoder_blocks.0.ada_lin.1.weight", "pred.weight"]


def infer_config(state: dict, path: str = "checkpoint", cell: int = 8) -> dict:
    """Constructor arguments of :class:`NextXGenerator` read off an official state dict."""
    require_keys(state, MARKERS, "xAR", path)
    width, in_ch = state["z_proj.weight"].shape
    freqs = state.get("encoder_blocks.0.attn.rope.freqs")
    if freqs is None:
        raise CheckpointError(f"{path} lacks the rope.freqs buffers needed to tell the head count of an xAR file")
    n_tokens = state["encoder_pos_embed_learned"].shape[1]
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise CheckpointError(f"{path}: {n_tokens} positions do not form a square token grid")
    hidden = state["encoder_blocks.0.mlp.fc1_g.weight"].shape[0]
    if hidden != swiglu_hidden(width, 4.0):
        raise CheckpointError(f"{path}: MLP hidden {hidden} is not int({width} * 4 * 2/3); unsupported mlp_ratio")
    return dict(num_classes=state["class_emb.weight"].shape[0] - 1, in_channels=in_ch, latent_size=side, cell=cell,
                width=width, encoder_depth=count_blocks(state, "encoder_blocks"),
                decoder_depth=count_blocks(state, "decoder_blocks"), num_heads=width // (4 * freqs.numel()))


def convert_state_dict(state: dict, model, path: str = "checkpoint") -> dict:
    """Check and drop the ``mask`` / ``rope.*`` buffers, rename to visar keys."""
    hd = model.width // model.num_heads
    drop = set(check_rope_freqs(state, {"": hd}, path))
    # the stored tables are [N, head_dim]: every visar angle repeated for its interleaved pair
    ref = {"freqs_cos": model.rope_cos.repeat_interleave(2, dim=-1),
           "freqs_sin": model.rope_sin.repeat_interleave(2, dim=-1)}
    for k in [k for k in state if k.endswith(("rope.freqs_cos", "rope.freqs_sin"))]:
        r = ref[k.rsplit(".", 1)[1]]
        if state[k].shape != r.shape or not torch.allclose(state[k].float(), r, atol=1e-5):
            raise CheckpointError(f"{path}: buffer {k} is not the cell-ordered 2D RoPE table visar rebuilds "
                                  f"(cell {model.partition.cell}); pass cell= if the file uses another entity size")
        drop.add(k)
    if "mask" in state:
        check_mask(state["mask"], model.mask, path)
        drop.add("mask")
    state = {k: v for k, v in state.items() if k not in drop}
    return rename_keys(state, [(r"^class_emb\.weight$", "class_emb.embedding_table.weight"), *SWIGLU_RULES])


def load_generator(path: str | os.PathLike, **overrides):
    """Build a :class:`~visar.generators.next_x.xar.NextXGenerator` from an official file.

    Args:
        path: ``xAR-{B,L,H}.pth`` (bare state dict; safetensors also accepted).
        overrides: constructor arguments that replace the inferred ones (``cell`` defaults to 8).
    Raises:
        CheckpointError: not an xAR file, truncated, or shapes/buffers that do not match.
    """
    from visar.generators.next_x.xar import NextXGenerator

    path = str(path)
    state = unwrap_state_dict(read_checkpoint(path), path=path)
    cfg = {**infer_config(state, path, overrides.get("cell", 8)), **overrides}
    model = NextXGenerator(**cfg)
    load_state_strict(model, convert_state_dict(state, model, path), source=path)
    return model.eval()


#: ``visar convert xar``: the KL-16 VAE it samples with (MAR's loader) and the generator
CONVERTER = register("converter", "xar")(Converter(load_mar_tokenizer, load_generator))
