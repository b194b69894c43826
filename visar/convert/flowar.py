"""Load the released FlowAR checkpoints (``FlowAR-S.pth``, ``FlowAR-L.pth``, ``FlowAR-H.pth``).

The files are bare float32 state dicts of the official ``FlowAR`` module. They include two kinds of
buffers that visar rebuilds instead of loading: ``mask`` (``[1, 1, L, L]`` block-causal, 0 / -inf) and
``*.rope.freqs`` (rotary frequencies of every attention layer). Both are compared with the rebuilt
values -- a mismatch means the file was made with another scale list or head count -- and dropped.

Key mapping (official -> visar): ``class_emb.weight -> class_emb.embedding_table.weight``, timm SwiGLU
``mlp.fc1_g / fc1_x / fc2 -> mlp.w1 / w3 / w2``, the flow head's ``res_blocks.N.ada_lin`` (a bare
Linear in the small-model block) -> ``ada_lin.1``. Everything else keeps its name.
"""
from __future__ import annotations

import os

import torch

from visar.convert.common import (Converter, CheckpointError, count_blocks, load_state_strict, read_checkpoint, rename_keys,
                                  require_keys, unwrap_state_dict)
from visar.convert.mar import load_tokenizer as load_mar_tokenizer
from visar.nn.adaln_block import swiglu_hidden
from visar.nn.rope import rope_frequencies
from visar.registry import register

#: timm's SwiGLU names -> visar's SwiGLU names (shared with the xAR converter)
SWIGLU_RULES = [(r"\.mlp\.fc1_g\.", ".mlp.w1."), (r"\.mlp\.fc1_x\.", ".mlp.w3."), (r"\.mlp\.fc2\.", ".mlp.w2.")]
MARKERS = ["z_proj.weight", "encoder_blocks.0.ada_lin.1.weight", "flownet.input_proj.weight",
           "diffusion_pos_embed_learned"]


def check_rope_freqs(state: dict, head_dims: dict[str, int], path: str) -> list[str]:
    """Compare every ``*.rope.freqs`` buffer with :func:`rope_frequencies`; return their keys."""
    keys = [k for k in state if k.endswith("rope.freqs")]
    for k in keys:
        hd = next(d for p, d in head_dims.items() if k.startswith(p))
        ref = rope_frequencies(hd)
        if state[k].shape != ref.shape or not torch.allclose(state[k].float(), ref, rtol=1e-6, atol=0):
            raise CheckpointError(f"{path}: buffer {k} does not hold the 2D RoPE frequencies of head dim {hd}; "
                                  "the file was made with another head count")
    return keys


def check_mask(mask: torch.Tensor, ref: torch.Tensor, path: str) -> None:
    """The stored additive mask must equal the rebuilt block-causal mask (0 / -inf)."""
    m = mask.reshape(mask.shape[-2:]).float()
    if m.shape != ref.shape or not torch.equal(torch.isinf(m), torch.isinf(ref)) or m[~torch.isinf(m)].abs().max() > 0:
        raise CheckpointError(f"{path}: buffer 'mask' {tuple(mask.shape)} is not the block-causal mask visar rebuilds "
                              f"({tuple(ref.shape)}); the file was made with another entity/scale layout")


def infer_config(state: dict, path: str = "checkpoint") -> dict:
    """Constructor arguments of :class:`NextScaleFlowGenerator` read off an official state dict."""
    require_keys(state, MARKERS, "FlowAR", path)
    width, in_ch = state["z_proj.weight"].shape
    freqs = state.get("encoder_blocks.0.attn.rope.freqs")
    head_freqs = state.get("flownet.res_blocks.0.attn.rope.freqs")
    if freqs is None or head_freqs is None:
        raise CheckpointError(f"{path} lacks the rope.freqs buffers needed to tell the head count of a FlowAR file")
    head_dim = 4 * freqs.numel()
    head_width = state["flownet.input_proj.weight"].shape[0]
    head_head_dim = 4 * head_freqs.numel()
    hidden = state["encoder_blocks.0.mlp.fc1_g.weight"].shape[0]
    if hidden != swiglu_hidden(width, 4.0):
        raise CheckpointError(f"{path}: MLP hidden {hidden} is not int({width} * 4 * 2/3); unsupported mlp_ratio")
    return dict(num_classes=state["class_emb.weight"].shape[0] - 1, in_channels=in_ch, width=width,
                encoder_depth=count_blocks(state, "encoder_blocks"),
                decoder_depth=count_blocks(state, "decoder_blocks"),
                num_heads=width // head_dim, head_width=head_width,
                head_depth=count_blocks(state, "flownet.res_blocks"), head_num_heads=head_width // head_head_dim,
                head_cross=any(".crossattn." in k for k in state))


def convert_state_dict(state: dict, model, path: str = "checkpoint") -> dict:
    """Check and drop the ``mask`` / ``rope.freqs`` buffers, rename to visar keys."""
    head_dims = {"flownet.": model.flownet.width // model.flownet.num_heads, "": model.width // model.num_heads}
    drop = set(check_rope_freqs(state, head_dims, path))
    if "mask" in state:
        check_mask(state["mask"], model.mask, path)
        drop.add("mask")
    state = {k: v for k, v in state.items() if k not in drop}
    rules = [(r"^class_emb\.weight$", "class_emb.embedding_table.weight"), *SWIGLU_RULES]
    if not model.flownet.cross:
        rules.append((r"^(flownet\.res_blocks\.\d+)\.ada_lin\.", r"\1.ada_lin.1."))
    return rename_keys(state, rules)


def load_generator(path: str | os.PathLike, **overrides):
    """Build a :class:`~visar.generators.next_scale.flowar.NextScaleFlowGenerator` from an official file.

    Args:
        path: ``FlowAR-{S,L,H}.pth`` (bare state dict; safetensors also accepted).
        overrides: constructor arguments that replace the inferred ones (e.g. ``scales`` for a model
            trained at another resolution, ``label_drop_prob``).
    Raises:
        CheckpointError: not a FlowAR file, truncated, or shapes that do not match.
    """
    from visar.generators.next_scale.flowar import NextScaleFlowGenerator

    path = str(path)
    state = unwrap_state_dict(read_checkpoint(path), path=path)
    cfg = {**infer_config(state, path), **overrides}
    model = NextScaleFlowGenerator(**cfg)
    load_state_strict(model, convert_state_dict(state, model, path), source=path)
    return model.eval()


#: ``visar convert flowar``: the KL-16 VAE it samples with (MAR's loader) and the generator
CONVERTER = register("converter", "flowar")(Converter(load_mar_tokenizer, load_generator))
