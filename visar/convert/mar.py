"""Official MAR files -> visar modules.

* :func:`load_tokenizer`: MAR's ``kl16.ckpt`` (``{"model": state}`` with LDM names; also FlowAR's and
  xAR's tokenizer) or a diffusers ``AutoencoderKL`` folder (``config.json`` + weights) ->
  :class:`~visar.tokenizers.kl.KLTokenizer`. The LDM -> diffusers renaming is
  :func:`visar.convert.ldm.ldm_to_visar`, which (unlike diffusers' own single-file converter) maps the
  encoder's down-block attention; loading is strict, so a file lacking it fails loudly.
* :func:`load_generator`: MAR's ``checkpoint-last.pth`` (``{"model", "model_ema"}``; training
  checkpoints also carry ``optimizer``/``epoch``/``scaler``/``args``) ->
  :class:`~visar.generators.masked.mar.MaskedGenerator`, with the sizes detected from the state dict.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Mapping

import torch

from visar.convert.common import (Converter, CheckpointError, block_indices, count_blocks, load_state_strict, read_checkpoint,
                                  require_keys, unwrap_state_dict)
from visar.registry import register

log = logging.getLogger("visar")

_VAE_MARKERS = ("encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.weight")


# ---------------------------------------------------------------------------------------------- tokenizer
def kl_config_from_ldm_state(state: Mapping[str, torch.Tensor], sample_size: int = 256,
                             scaling_factor: float = 0.2325) -> dict:
    """``diffusers.AutoencoderKL`` config of an LDM-named KL autoencoder state dict (MAR's kl16 layout)."""
    levels = sorted(block_indices(state, "encoder.down"))
    if not levels:
        raise CheckpointError("cannot detect the VAE levels: no encoder.down.{i}.* keys")
    widths = [int(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels]
    blocks = len(block_indices(state, "encoder.down.0.block"))
    # MAR's topology rule: the encoder's deepest level always carries attention (attn_resolutions=(16,) at
    # 256 px). It is not detected from the keys, so a file that lost it (as diffusers' single-file
    # converter loses it) fails strict loading instead of silently building a model without it.
    enc_attn = [i == levels[-1] or any(k.startswith(f"encoder.down.{i}.attn.") for k in state) for i in levels]
    dec_attn = [any(k.startswith(f"decoder.up.{i}.attn.") for k in state) for i in levels]
    n = len(levels)
    return {
        "in_channels": int(state["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(state["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in enc_attn],
        # diffusers stores up blocks deepest first: up_blocks[k] is LDM level n-1-k
        "up_block_types": ["AttnUpDecoderBlock2D" if dec_attn[n - 1 - k] else "UpDecoderBlock2D" for k in range(n)],
        "block_out_channels": widths, "layers_per_block": blocks, "act_fn": "silu",
        "latent_channels": int(state["post_quant_conv.weight"].shape[0]), "norm_num_groups": 32,
        "sample_size": sample_size, "scaling_factor": scaling_factor, "force_upcast": True,
        "use_quant_conv": True, "use_post_quant_conv": True,
        "mid_block_add_attention": any(k.startswith("encoder.mid.attn_1.") for k in state),
    }


def _load_diffusers_folder(folder: Path, scale_factor: float | None):
    from visar.tokenizers.kl import KLTokenizer

    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json: a diffusers VAE folder holds config.json and "
            f"diffusion_pytorch_model.safetensors (save one with AutoencoderKL.save_pretrained); for MAR's "
            f"kl16.ckpt pass the file itself")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise CheckpointError(f"{cfg_path} describes a {cfg['_class_name']}, not an AutoencoderKL")
    weights = [folder / n for n in ("diffusion_pytorch_model.safetensors", "model.safetensors",
                                    "diffusion_pytorch_model.bin")]
    weights = [w for w in weights if w.is_file()]
    if not weights:
        raise FileNotFoundError(f"{folder} has a config.json but no diffusion_pytorch_model.safetensors (or .bin)")
    state = read_checkpoint(weights[0])
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    shift = cfg.get("shift_factor")
    tok = KLTokenizer(vae_config=cfg, scale_factor=scale_factor, shift_factor=shift)
    load_state_strict(tok.vae, state, source=str(weights[0]))
    return tok


def load_tokenizer(path: str | os.PathLike, scale_factor: float | None = None, sample_size: int = 256,
                   vae_config: dict | None = None):
    """Load MAR's ``kl16.ckpt`` (or any LDM-named KL VAE file) or a diffusers VAE folder.

    Args:
        path: a ``.ckpt/.pth/.safetensors`` file with LDM names (``encoder.down.{i}.block.{j}...``),
            optionally wrapped in ``{"model": ...}`` / ``{"state_dict": ...}``; or a folder with a
            diffusers ``config.json`` and weights.
        scale_factor: latent scale; default 0.2325 for LDM files (MAR/FlowAR/xAR) and the folder's
            ``scaling_factor`` for diffusers folders.
        sample_size: nominal image size written into the diffusers config (used only for tiling).
        vae_config: explicit ``AutoencoderKL`` config for LDM files of another topology (default: detected
            with MAR's rules: encoder attention on the deepest level, mid-block attention, 32 groups).

    Returns:
        :class:`~visar.tokenizers.kl.KLTokenizer` in eval mode.

    Raises:
        FileNotFoundError: missing file, or a folder without ``config.json``.
        CheckpointError: not a KL VAE, or keys missing/unexpected (strict loading).
    """
    from visar.convert.ldm import ldm_to_visar
    from visar.tokenizers.kl import KLTokenizer

    path = Path(path)
    if path.is_dir():
        return _load_diffusers_folder(path, scale_factor).eval()
    obj = read_checkpoint(path)
    state = unwrap_state_dict(obj, ("model", "state_dict", "module"), path=str(path))
    # VAE training files may carry the discriminator / LPIPS loss: not part of the tokenizer
    ignored = [k for k in state if k.startswith("loss.")]
    state = {k: v for k, v in state.items() if k not in ignored}
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in state:
        raise CheckpointError(f"{path} already uses diffusers names; put it in a folder with its config.json "
                              "and pass the folder")
    require_keys(state, _VAE_MARKERS, "KL autoencoder (LDM/MAR kl16)", str(path))
    scale = 0.2325 if scale_factor is None else scale_factor
    cfg = vae_config or kl_config_from_ldm_state(state, sample_size=sample_size, scaling_factor=scale)
    tok = KLTokenizer(vae_config=cfg, scale_factor=scale)
    mapped = ldm_to_visar(state, num_levels=len(cfg["block_out_channels"]))
    load_state_strict(tok.vae, mapped, source=str(path))
    log.info("loaded KL tokenizer from %s (%d levels, %d latent channels, scale %g)", path,
             len(cfg["block_out_channels"]), cfg["latent_channels"], scale)
    return tok.eval()


# ---------------------------------------------------------------------------------------------- generator
#: attention heads of the released widths (heads cannot be read from the weights)
_HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16}
_MAR_MARKERS = ("z_proj.weight", "fake_latent", "diffusion_pos_embed_learned", "diffloss.net.input_proj.weight")


def mar_config_from_state(state: Mapping[str, torch.Tensor], vae_stride: int = 16, vae_embed_dim: int = 16,
                          **overrides) -> dict:
    """Constructor arguments of :class:`~visar.generators.masked.mar.MaskedGenerator` detected from a state dict.

    Widths, depths, buffer size, token grid, class count, MLP ratio and the head size are read from tensor
    shapes; the number of attention heads is taken from the released models (768 -> 12, 1024/1280 -> 16)
    and must be passed (``encoder_num_heads=``, ``decoder_num_heads=``) for other widths.
    """
    enc_w = int(state["z_proj.weight"].shape[0])
    dec_w = int(state["decoder_embed.weight"].shape[0])
    token_dim = int(state["z_proj.weight"].shape[1])
    patch = int(round(math.sqrt(token_dim / vae_embed_dim)))
    if patch * patch * vae_embed_dim != token_dim:
        raise CheckpointError(f"token width {token_dim} is not vae_embed_dim ({vae_embed_dim}) x patch^2; "
                              "pass vae_embed_dim=")
    seq_len = int(state["diffusion_pos_embed_learned"].shape[1])
    grid = int(round(math.sqrt(seq_len)))
    cfg = {
        "img_size": grid * patch * vae_stride, "vae_stride": vae_stride, "patch_size": patch,
        "encoder_embed_dim": enc_w, "encoder_depth": count_blocks(state, "encoder_blocks"),
        "encoder_num_heads": _HEADS_BY_WIDTH.get(enc_w),
        "decoder_embed_dim": dec_w, "decoder_depth": count_blocks(state, "decoder_blocks"),
        "decoder_num_heads": _HEADS_BY_WIDTH.get(dec_w),
        "mlp_ratio": float(state["encoder_blocks.0.mlp.fc1.weight"].shape[0]) / enc_w,
        "vae_embed_dim": vae_embed_dim, "class_num": int(state["class_emb.weight"].shape[0]),
        "buffer_size": int(state["encoder_pos_embed_learned"].shape[1]) - seq_len,
        "diffloss_d": count_blocks(state, "diffloss.net.res_blocks"),
        "diffloss_w": int(state["diffloss.net.input_proj.weight"].shape[0]), "num_sampling_steps": 100,
    }
    cfg.update(overrides)
    for k in ("encoder_num_heads", "decoder_num_heads"):
        if cfg[k] is None:
            raise CheckpointError(f"cannot infer {k} for width {enc_w if k.startswith('enc') else dec_w} (not a "
                                  f"released MAR size); pass {k}=... to load_generator")
    return cfg


def load_generator(path: str | os.PathLike, use_ema: bool = True, **overrides):
    """Load an official MAR checkpoint into :class:`~visar.generators.masked.mar.MaskedGenerator`.

    Args:
        path: ``checkpoint-last.pth`` (``{"model", "model_ema"}``) or a bare state dict / safetensors file.
        use_ema: take ``model_ema`` (what the official evaluation uses), falling back to ``model``.
        overrides: constructor arguments that replace the detected ones (e.g. ``encoder_num_heads`` for
            non-released widths, ``num_sampling_steps``).

    Raises:
        CheckpointError: pickled training state (``args``), optimizer-only files, non-MAR files,
            mismatching sizes.
    """
    from visar.generators.masked.mar import MaskedGenerator

    path = Path(path)
    try:
        obj = read_checkpoint(path)
    except CheckpointError as e:
        if "pickled" in str(e):
            raise CheckpointError(
                f"{path} is a MAR training checkpoint with pickled entries (its 'args' is an argparse.Namespace), "
                f"which visar does not unpickle. If you trust the file, keep only the weights once:\n"
                f"  python -c \"import torch; c = torch.load('{path}', weights_only=False); "
                f"torch.save({{'model_ema': c.get('model_ema', c['model'])}}, 'mar_weights.pth')\"\n"
                f"and load mar_weights.pth.") from e
        raise
    keys = ("model_ema", "model") if use_ema else ("model",)
    state = unwrap_state_dict(obj, keys + ("state_dict",), path=str(path))
    picked = next((k for k in keys if isinstance(obj.get(k), Mapping) and obj.get(k)), None)
    if picked is None and not any(k in state for k in _MAR_MARKERS):
        raise CheckpointError(f"{path} holds no MAR weights (top-level keys {sorted(obj)[:8]}); a file with only "
                              "optimizer state cannot be loaded: use checkpoint-last.pth with model / model_ema")
    if use_ema and picked == "model":
        log.warning("%s has no model_ema; loading the raw training weights 'model'", path)
    require_keys(state, _MAR_MARKERS, "MAR", str(path))
    cfg = mar_config_from_state(state, **overrides)
    model = MaskedGenerator(**cfg)
    mapped = {("head." + k[len("diffloss."):] if k.startswith("diffloss.") else k): v for k, v in state.items()}
    load_state_strict(model, mapped, source=f"{path}[{picked or 'state'}]")
    log.info("loaded MAR (%s) from %s: width %d, depth %d+%d, head %dx%d", picked, path, cfg["encoder_embed_dim"],
             cfg["encoder_depth"], cfg["decoder_depth"], cfg["diffloss_d"], cfg["diffloss_w"])
    return model.eval()


#: ``visar convert mar``
CONVERTER = register("converter", "mar")(Converter(load_tokenizer, load_generator))
