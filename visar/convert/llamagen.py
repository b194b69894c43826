"""Official LlamaGen checkpoints (github.com/FoundationVision/LlamaGen) -> visar modules.

Tokenizer: ``vq_ds16_c2i.pt``, ``vq_ds8_c2i.pt``, ``vq_ds16_t2i.pt`` (``{"model": state_dict}``) ->
:class:`visar.tokenizers.vq.VQTokenizer` with :func:`load_tokenizer`. Containers ``model``, ``module``,
``state_dict`` and bare state dicts are accepted; ``.pt`` files are read with ``weights_only=True``.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import torch

from visar.convert.common import (Converter, CheckpointError, load_state_strict, read_checkpoint, require_keys,
                                  unwrap_state_dict)
from visar.convert.ldm import ldm_to_llamagen, ldm_to_visar, llamagen_to_ldm, visar_to_ldm
from visar.registry import register

# ============================================================================================ VQ tokenizer
#: keys every LlamaGen VQModel file has
VQ_MARKER_KEYS = ("quantize.embedding.weight", "encoder.conv_in.weight", "encoder.conv_blocks.0.res.0.conv1.weight",
                  "decoder.conv_blocks.0.res.0.conv1.weight", "quant_conv.weight", "post_quant_conv.weight")
#: training statistics of the official quantizer (a ring of recent indices), unused at inference
VQ_IGNORED_KEYS = ("quantize.codebook_used",)


def detect_vq_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """VQTokenizer constructor arguments read from an official LlamaGen VQ state dict."""
    K, D = state["quantize.embedding.weight"].shape
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(m.group(1)) for k in state for m in [re.match(r"encoder\.conv_blocks\.(\d+)\.", k)] if m})
    ch_mult = []
    for lv in levels:
        width = state[f"encoder.conv_blocks.{lv}.res.0.conv1.weight"].shape[0]
        if width % ch:
            raise CheckpointError(f"level {lv} width {width} is not a multiple of the base width {ch}")
        ch_mult.append(width // ch)
    res = {int(m.group(1)) for k in state for m in [re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", k)] if m}
    return dict(codebook_size=int(K), codebook_embed_dim=int(D), ch=int(ch), ch_mult=tuple(ch_mult),
                num_res_blocks=len(res), z_channels=int(state["encoder.conv_out.weight"].shape[0]))


def vq_state_from_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official VQModel keys -> VQTokenizer keys (drops ``quantize.codebook_used``, adds fresh
    ``quantize.steps_unused`` counters)."""
    state = {k: v for k, v in state.items() if k not in VQ_IGNORED_KEYS}
    out = ldm_to_visar(llamagen_to_ldm(state))
    K = state["quantize.embedding.weight"].shape[0]
    out["quantize.steps_unused"] = torch.zeros(K, dtype=torch.long)
    return out


def vq_state_to_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """VQTokenizer state dict -> official VQModel key names and shapes (without the official
    ``quantize.codebook_used`` statistics and without visar's ``quantize.steps_unused``)."""
    state = {k: v for k, v in state.items() if k != "quantize.steps_unused"}
    return ldm_to_llamagen(visar_to_ldm(state))


def load_tokenizer(path: str | os.PathLike, **overrides: Any):
    """Load an official LlamaGen VQ checkpoint as a :class:`~visar.tokenizers.vq.VQTokenizer` (eval mode).

    Args:
        path: ``.pt`` / ``.pth`` / ``.safetensors`` file (``{"model": ...}``, ``{"module": ...}``,
            ``{"state_dict": ...}`` or a bare state dict).
        overrides: constructor arguments replacing the detected ones (e.g. ``dead_code_steps``).

    Raises:
        CheckpointError: the file is not a LlamaGen VQ checkpoint, is truncated, or does not match.
    """
    from visar.tokenizers.vq import VQTokenizer

    obj = read_checkpoint(path)
    state = unwrap_state_dict(obj, ("model", "module", "state_dict"), path=str(path))
    require_keys(state, VQ_MARKER_KEYS, "LlamaGen VQ tokenizer", str(path))
    config = {**detect_vq_config(state), **overrides}
    model = VQTokenizer(**config)
    load_state_strict(model, vq_state_from_official(state), source=str(path))
    return model.eval()


# ============================================================================================ GPT generator
#: keys every LlamaGen GPT file has (class- or text-conditional)
GPT_MARKER_KEYS = ("tok_embeddings.weight", "layers.0.attention.wqkv.weight", "norm.weight", "output.weight")
#: the RoPE table some exports carry (never needed: it is rebuilt from the configuration)
GPT_IGNORED_KEYS = ("freqs_cis",)
#: official widths -> heads (GPT-B, L, XL, XXL, 3B; the 3B model has head_dim 100)
GPT_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1536: 24, 3200: 32}
#: official GPT names -> visar NextTokenGenerator names (regex rules, applied in order)
GPT_KEY_RULES = [
    (r"^cls_embedding\.embedding_table\.", "cond_embed.embedding_table."),
    (r"^cls_embedding\.uncond_embedding$", "cond_embed.uncond_embedding"),
    (r"^cls_embedding\.cap_proj\.", "cond_embed.proj."),
    (r"^tok_embeddings\.", "tok_embed."),
    (r"^layers\.(\d+)\.attention\.wqkv\.", r"trunk.blocks.\1.attn.qkv."),
    (r"^layers\.(\d+)\.attention\.wo\.", r"trunk.blocks.\1.attn.proj."),
    (r"^layers\.(\d+)\.feed_forward\.", r"trunk.blocks.\1.mlp."),
    (r"^layers\.(\d+)\.attention_norm\.", r"trunk.blocks.\1.attn_norm."),
    (r"^layers\.(\d+)\.ffn_norm\.", r"trunk.blocks.\1.mlp_norm."),
    (r"^norm\.", "trunk.norm."),
    (r"^output\.", "head."),
]
GPT_KEY_RULES_INVERSE = [
    (r"^cond_embed\.embedding_table\.", "cls_embedding.embedding_table."),
    (r"^cond_embed\.uncond_embedding$", "cls_embedding.uncond_embedding"),
    (r"^cond_embed\.proj\.", "cls_embedding.cap_proj."),
    (r"^tok_embed\.", "tok_embeddings."),
    (r"^trunk\.blocks\.(\d+)\.attn\.qkv\.", r"layers.\1.attention.wqkv."),
    (r"^trunk\.blocks\.(\d+)\.attn\.proj\.", r"layers.\1.attention.wo."),
    (r"^trunk\.blocks\.(\d+)\.mlp\.", r"layers.\1.feed_forward."),
    (r"^trunk\.blocks\.(\d+)\.attn_norm\.", r"layers.\1.attention_norm."),
    (r"^trunk\.blocks\.(\d+)\.mlp_norm\.", r"layers.\1.ffn_norm."),
    (r"^trunk\.norm\.", "norm."),
    (r"^head\.", "output."),
]


def gpt_state_from_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official GPT keys -> :class:`~visar.generators.next_token.llamagen.NextTokenGenerator` keys."""
    from visar.convert.common import rename_keys

    return rename_keys({k: v for k, v in state.items() if k not in GPT_IGNORED_KEYS}, GPT_KEY_RULES)


def gpt_state_to_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:class:`~visar.generators.next_token.llamagen.NextTokenGenerator` keys -> official GPT keys."""
    from visar.convert.common import rename_keys

    return rename_keys(state, GPT_KEY_RULES_INVERSE)


def detect_gpt_config(state: Mapping[str, torch.Tensor], path: str = "checkpoint") -> dict[str, Any]:
    """NextTokenGenerator constructor arguments read from an official LlamaGen GPT state dict.

    Heads come from the official width table (``GPT_HEADS_BY_WIDTH``); other widths assume
    ``head_dim = 64`` (pass ``num_heads=`` to override). ``grid_size`` is not stored in the file.
    """
    import logging

    from visar.generators.components.llama_trunk import llama_ffn_hidden

    vocab, dim = state["tok_embeddings.weight"].shape
    if state["output.weight"].shape != (vocab, dim):
        raise CheckpointError(f"{path}: output.weight {tuple(state['output.weight'].shape)} does not match "
                              f"tok_embeddings.weight {(vocab, dim)}")
    depth = 1 + max(int(m.group(1)) for k in state for m in [re.match(r"layers\.(\d+)\.", k)] if m)
    cfg: dict[str, Any] = dict(vocab_size=int(vocab), dim=int(dim), depth=depth)
    if dim in GPT_HEADS_BY_WIDTH:
        cfg["num_heads"] = GPT_HEADS_BY_WIDTH[dim]
    elif dim % 64 == 0:
        cfg["num_heads"] = dim // 64
        logging.getLogger("visar").warning("%s: width %d is not an official LlamaGen width; assuming head_dim 64 (%d heads). "
                    "Pass num_heads= if that is wrong.", path, dim, dim // 64)
    else:
        raise CheckpointError(f"{path}: cannot infer the number of heads for width {dim}; pass num_heads=")
    hidden = int(state["layers.0.feed_forward.w1.weight"].shape[0])
    if hidden != llama_ffn_hidden(dim):
        cfg["ffn_hidden"] = hidden
    if "cls_embedding.cap_proj.fc1.weight" in state:  # text-conditional
        cfg["caption_dim"] = int(state["cls_embedding.cap_proj.fc1.weight"].shape[1])
        cfg["cls_token_num"] = int(state["cls_embedding.uncond_embedding"].shape[0]) \
            if "cls_embedding.uncond_embedding" in state else 120
    elif "cls_embedding.embedding_table.weight" in state:
        cfg["num_classes"] = int(state["cls_embedding.embedding_table.weight"].shape[0]) - 1
        cfg["cls_token_num"] = 1
    else:
        raise CheckpointError(f"{path}: neither a class table (cls_embedding.embedding_table.weight) nor a "
                              "caption projection (cls_embedding.cap_proj.*): not a LlamaGen GPT file")
    return cfg


def _grid_from_filename(path: str) -> int | None:
    """``c2i_L_384.pt`` -> 24, ``t2i_XL_stage2_512.pt`` -> 32 (ds16 VQ); ``None`` if no size in the name."""
    m = re.search(r"_(256|384|512)(?:\D*)$", os.path.splitext(os.path.basename(path))[0])
    return int(m.group(1)) // 16 if m else None


def load_generator(path: str | os.PathLike, **overrides: Any):
    """Load an official LlamaGen GPT checkpoint as a
    :class:`~visar.generators.next_token.llamagen.NextTokenGenerator` (eval mode).

    Detects depth, width, vocabulary, classes, class- vs text-conditioning, caption width and the
    number of condition tokens from the state dict; heads from the official width table. The image
    grid is not stored: it is taken from ``grid_size=`` if given, else from a ``_256/_384/_512`` file
    name suffix (ds16 VQ), else 16. A ``freqs_cis`` entry is ignored; everything else loads strictly.

    Args:
        path: ``.pt`` / ``.pth`` / ``.safetensors`` (``{"model": ...}``, ``{"module": ...}``,
            ``{"state_dict": ...}`` or bare, as the FSDP-consolidated XXL/3B files are).
        overrides: constructor arguments replacing the detected ones (``num_heads``, ``grid_size``, ...).

    Raises:
        CheckpointError: not a LlamaGen GPT file (e.g. a VQ or another family), truncated, holding
            pickled objects, or not matching the configuration.
    """
    from visar.generators.next_token.llamagen import NextTokenGenerator

    path = str(path)
    obj = read_checkpoint(path)
    state = unwrap_state_dict(obj, ("model", "module", "state_dict"), path=path)
    if all(k in state for k in VQ_MARKER_KEYS[:2]):
        raise CheckpointError(f"{path} is a LlamaGen VQ tokenizer checkpoint; load it with load_tokenizer")
    require_keys(state, GPT_MARKER_KEYS, "LlamaGen GPT", path)
    config = detect_gpt_config(state, path)
    grid = _grid_from_filename(path)
    if grid is not None:
        config["grid_size"] = grid
    config.update(overrides)
    model = NextTokenGenerator(**config)
    load_state_strict(model, gpt_state_from_official(state), source=path)
    return model.eval()


#: ``visar convert llamagen``
CONVERTER = register("converter", "llamagen")(Converter(load_tokenizer, load_generator))
