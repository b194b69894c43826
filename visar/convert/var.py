"""Official VAR checkpoints (github.com/FoundationVision/VAR) -> visar modules.

Supported containers: the released bare state dicts (``var_d16.pth`` ... ``var_d36.pth``,
``vae_ch160v4096z32.pth``; float32 or float16, cast on load) and the official trainer's checkpoints
(``ar-ckpt-*.pth``: the weights nested under ``trainer`` -> ``var_wo_ddp`` / ``vae_local``; only tensors
are read, with ``weights_only=True``), plus visar's own safetensors files.

The transformer's size, head count, l2-norm attention (``scale_mul_1H11``), shared AdaLN
(``shared_ada_lin``), schedule length and class count are read from the state dict; the schedule
itself cannot be (only its length and ``L``), so it is matched against the known 256/512 px
schedules or given with ``scales=``. The ``lvl_1L`` and ``attn_bias_for_masking`` buffers are rebuilt
from the schedule and checked against the file; ``zero_k_bias`` must be zero;
``quantize.ema_vocab_hit_SV`` (a training statistic) is ignored.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping, Sequence

import torch

from visar.convert.common import (Converter, CheckpointError, load_state_strict, read_checkpoint, rename_keys,
                                  require_keys, unwrap_state_dict)
from visar.generators.next_scale.var import SCHEDULE_256, SCHEDULE_512, NextScaleGenerator, block_causal_mask, scale_index
from visar.registry import register

log = logging.getLogger("visar")

KNOWN_SCHEDULES = [list(SCHEDULE_256), list(SCHEDULE_512)]

#: official transformer names -> visar names
GENERATOR_RULES = [
    (r"^class_emb\.weight$", "class_emb.embedding_table.weight"),
    (r"\.attn\.mat_qkv\.weight$", ".attn.qkv.weight"),
    (r"\.attn\.scale_mul_1H11$", ".attn.scale_mul"),
    (r"^shared_ada_lin\.1\.", "shared_ada_lin.1."),
]


def _unwrap(obj: Mapping, path: str, inner: str) -> dict[str, torch.Tensor]:
    """Find the weights of ``inner`` (``var_wo_ddp`` / ``vae_local``) in an official trainer checkpoint."""
    for outer in ("trainer", None):
        node = obj.get(outer) if outer else obj
        if isinstance(node, Mapping) and isinstance(node.get(inner), Mapping):
            return {k: v for k, v in node[inner].items() if isinstance(v, torch.Tensor)}
    return unwrap_state_dict(obj, ("model", "state_dict", "module"), path)


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_generator_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a VAR transformer file (bare, trainer checkpoint or visar safetensors)."""
    obj = read_checkpoint(path)
    return _strip_prefix(_unwrap(obj, str(path), "var_wo_ddp"))


def detect_generator_config(state: Mapping[str, torch.Tensor], path: str = "checkpoint",
                            scales: Sequence[int] | None = None) -> dict[str, Any]:
    """Constructor arguments of :class:`NextScaleGenerator` read from an official state dict."""
    official = "class_emb.weight" in state
    emb_key = "class_emb.weight" if official else "class_emb.embedding_table.weight"
    require_keys(state, [emb_key, "pos_1LC", "lvl_embed.weight", "word_embed.weight", "head.weight"], "VAR", path)
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    width = state["pos_1LC"].shape[-1]
    seq_len = state["pos_1LC"].shape[1]
    num_scales = state["lvl_embed.weight"].shape[0]
    first_len = state["pos_start"].shape[1]
    scale_key = "blocks.0.attn.scale_mul_1H11" if official else "blocks.0.attn.scale_mul"
    l2 = scale_key in state
    if l2:
        num_heads = state[scale_key].shape[1]
    else:
        # Without l2-norm attention the head count is not stored; VAR ties it to the depth (heads = depth).
        num_heads = depth
    if scales is None:
        if "lvl_1L" in state:
            lvl = state["lvl_1L"].reshape(-1)
            counts = torch.bincount(lvl, minlength=num_scales).tolist()
            sides = [int(round(c ** 0.5)) for c in counts]
            if all(s * s == c for s, c in zip(sides, counts)):
                scales = sides
        if scales is None:
            scales = next((s for s in KNOWN_SCHEDULES if len(s) == num_scales and sum(x * x for x in s) == seq_len), None)
        if scales is None:
            raise CheckpointError(f"{path}: cannot infer the {num_scales}-scale schedule (L = {seq_len}); pass "
                                  f"scales=[...] (the 256 px release uses {list(SCHEDULE_256)}, 512 px {list(SCHEDULE_512)})")
    scales = [int(s) for s in scales]
    if len(scales) != num_scales or sum(s * s for s in scales) != seq_len or scales[0] ** 2 != first_len:
        raise CheckpointError(f"{path}: schedule {scales} does not fit the file ({num_scales} scales, L = {seq_len}, "
                              f"{first_len} start tokens)")
    mlp_hidden = state["blocks.0.ffn.fc1.weight"].shape[0]
    return dict(num_classes=state[emb_key].shape[0] - 1, vocab_size=state["head.weight"].shape[0],
                token_dim=state["word_embed.weight"].shape[1], scales=scales, depth=depth, width=width,
                num_heads=num_heads, mlp_ratio=mlp_hidden / width, shared_adaln=any(k.startswith("shared_ada_lin") for k in state),
                attn_l2_norm=l2)


def _check_buffers(state: dict[str, torch.Tensor], scales: Sequence[int], path: str) -> None:
    if "lvl_1L" in state and not torch.equal(state["lvl_1L"].reshape(-1).long(), scale_index(scales)):
        raise CheckpointError(f"{path}: lvl_1L does not match the schedule {list(scales)}; pass the schedule the "
                              "model was trained with (scales=...)")
    if "attn_bias_for_masking" in state:
        bias = state["attn_bias_for_masking"].float().reshape(len(scale_index(scales)), -1)
        if not torch.equal(bias == 0, block_causal_mask(scales)):
            raise CheckpointError(f"{path}: attn_bias_for_masking is not the block-causal mask of {list(scales)}")
    for k, v in state.items():
        if k.endswith("attn.zero_k_bias") and v.abs().max() > 0:
            raise CheckpointError(f"{path}: {k} is not zero; VAR's key projection has no bias")


def load_generator(path: str | os.PathLike, scales: Sequence[int] | None = None, **overrides: Any) -> NextScaleGenerator:
    """Build a :class:`NextScaleGenerator` from an official (or visar) VAR transformer checkpoint.

    Args:
        path: ``var_d{16,20,24,30,36}.pth``, an official trainer checkpoint, or a visar safetensors file.
        scales: the schedule, when it cannot be inferred.
        overrides: constructor arguments (e.g. ``class_dropout``); an ``attn_l2_norm`` that contradicts the
            file raises an error explaining which VAR release the file comes from.
    """
    path = str(path)
    state = read_generator_state(path)
    cfg = detect_generator_config(state, path, scales)
    want = overrides.get("attn_l2_norm")
    if want is not None and bool(want) != cfg["attn_l2_norm"]:
        if cfg["attn_l2_norm"]:
            raise CheckpointError(f"{path} is a VAR checkpoint with l2-normalised attention (it has scale_mul_1H11, "
                                  "as every released checkpoint); it cannot be loaded with attn_l2_norm=False. "
                                  "Drop the override.")
        raise CheckpointError(f"{path} is a VAR checkpoint from before the l2-norm attention release (no "
                              "scale_mul_1H11: plain softmax attention with scale 0.25/sqrt(head_dim)); it cannot be "
                              "loaded with attn_l2_norm=True. Drop the override to load it as the old variant.")
    cfg.update(overrides)
    model = NextScaleGenerator(**cfg)
    _check_buffers(state, cfg["scales"], path)
    state = rename_keys(state, GENERATOR_RULES)
    try:
        load_state_strict(model, state, source=path, ignore=[k for k in state if k in ("lvl_1L", "attn_bias_for_masking")
                                                             or k.endswith("attn.zero_k_bias")])
    except CheckpointError as e:
        raise CheckpointError(f"{e}\n  (detected VAR config: depth {cfg['depth']}, width {cfg['width']}, "
                              f"{cfg['num_heads']} heads, l2-norm attention {cfg['attn_l2_norm']}, shared AdaLN "
                              f"{cfg['shared_adaln']}, scales {cfg['scales']})") from None
    log.info("loaded VAR generator from %s: depth %d, width %d, %d scales", path, cfg["depth"], cfg["width"],
             len(cfg["scales"]))
    return model.eval()


def read_tokenizer_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a VAR VQVAE file (bare, trainer checkpoint or visar safetensors)."""
    obj = read_checkpoint(path)
    return _strip_prefix(_unwrap(obj, str(path), "vae_local"))


def detect_tokenizer_config(state: Mapping[str, torch.Tensor], path: str = "checkpoint") -> dict[str, Any]:
    """Constructor arguments of the conv autoencoder + quantizer read from a visar-named state dict."""
    vocab, dim = state["quantize.embedding.weight"].shape
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    if not levels:
        raise CheckpointError(f"{path}: no encoder blocks found; expected a VAR VQVAE (encoder.down.*)")
    ch_mult = [state[f"encoder.down_blocks.{lv}.resnets.0.conv2.weight"].shape[0] // ch for lv in levels]
    num_res = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)))
    num_phi = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"quantize\.quant_resi\.qresi_ls\.(\d+)\.", k)))
    return dict(vocab_size=vocab, token_dim=dim, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res, num_phi=num_phi,
                quant_conv_kernel=state["quant_conv.weight"].shape[-1])


def load_tokenizer(path: str | os.PathLike, scales: Sequence[int] = SCHEDULE_256, **overrides: Any):
    """Build a :class:`~visar.tokenizers.msvq.MultiScaleVQTokenizer` from ``vae_ch160v4096z32.pth``-style files.

    ``scales`` must be the schedule of the generator it serves (the same file serves the 256 px
    schedule and, with ``scales=SCHEDULE_512``, the 512 px one); ``patch_nums`` is accepted as an alias.
    The LDM names (with VAR's fused ``qkv`` attention) are mapped by :func:`visar.convert.ldm.ldm_to_visar`.
    """
    from visar.convert.ldm import ldm_to_visar
    from visar.tokenizers.msvq import MultiScaleVQTokenizer

    if "patch_nums" in overrides:
        scales = overrides.pop("patch_nums")
    path = str(path)
    state = read_tokenizer_state(path)
    require_keys(state, ["quantize.embedding.weight", "quant_conv.weight", "post_quant_conv.weight",
                         "encoder.conv_in.weight"], "VAR VQVAE", path)
    state = {k: v for k, v in state.items() if k != "quantize.ema_vocab_hit_SV"}
    if any(k.startswith("encoder.down.") for k in state):
        state = ldm_to_visar(state)
    cfg = detect_tokenizer_config(state, path)
    cfg["scales"] = [int(s) for s in scales]
    cfg.update(overrides)
    model = MultiScaleVQTokenizer(**cfg)
    load_state_strict(model, state, source=path)
    log.info("loaded VAR VQVAE from %s: V=%d, Cvae=%d, ch=%d, scales %s", path, cfg["vocab_size"], cfg["token_dim"],
             cfg["ch"], cfg["scales"])
    return model.eval()


def generator_to_official(model: NextScaleGenerator) -> dict[str, torch.Tensor]:
    """visar generator -> the official VAR state-dict layout (names, buffers ``lvl_1L``,
    ``attn_bias_for_masking`` and ``zero_k_bias`` included), e.g. to run it with the official code."""
    out: dict[str, torch.Tensor] = {}
    ref = model.pos_1LC
    for k, v in model.state_dict().items():
        k = (k.replace("class_emb.embedding_table.weight", "class_emb.weight").replace(".attn.qkv.weight", ".attn.mat_qkv.weight")
             .replace(".attn.scale_mul", ".attn.scale_mul_1H11"))
        out[k] = v
        m = re.match(r"^(blocks\.\d+\.attn)\.v_bias$", k)
        if m:
            out[f"{m.group(1)}.zero_k_bias"] = torch.zeros_like(v)
    out["lvl_1L"] = scale_index(model.scales)[None].to(ref.device)
    bias = torch.zeros(model.seq_len, model.seq_len, dtype=ref.dtype, device=ref.device)
    out["attn_bias_for_masking"] = bias.masked_fill(~block_causal_mask(model.scales).to(ref.device), float("-inf"))[None, None]
    return out


def tokenizer_to_official(model) -> dict[str, torch.Tensor]:
    """visar :class:`MultiScaleVQTokenizer` -> the official VQVAE layout (LDM names, fused ``qkv``)."""
    from visar.convert.ldm import visar_to_ldm

    return visar_to_ldm(model.state_dict(), fused_qkv=True)


#: ``visar convert var``
CONVERTER = register("converter", "var")(Converter(load_tokenizer, load_generator))
