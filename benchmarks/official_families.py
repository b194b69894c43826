"""Official samplers of each family next to visar's, for ``benchmarks/vs_official.py``.

A :class:`Family` builds the official model from an extracted checkout (seeded random weights in the release
format, or a real checkpoint), saves it, loads the file into visar through the converter, runs both samplers
with the same seed and settings, compares their outputs and names the modules whose calls count network
passes. Nothing here is copied from the official code: it is imported from the checkout at run time.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visar.conditions import Condition

INIT_STD = 0.02


def refill_zero_parameters(model: nn.Module, seed: int) -> int:
    """Refill every all-zero floating parameter from ``N(0, INIT_STD)`` (seeded); returns how many."""
    g = torch.Generator().manual_seed(seed + 1)
    n = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * INIT_STD)
                n += 1
    return n


def param_bytes(modules) -> int:
    """Bytes of the parameters of ``modules`` read by a pass: embedding tables are excluded (a pass reads
    rows of them), as are the callers' positional tables (not passed here)."""
    total, seen = 0, set()
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, nn.Embedding):
                continue
            for p in sub.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel() * p.element_size()
    return total


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def identity_cuda(self, *args, **kwargs):
    return self


def import_official(path: Path) -> None:
    """Put the checkout first on ``sys.path`` and make its CUDA-only calls work on the CPU."""
    if not path.is_dir():
        raise SystemExit(f"--official {path}: not a folder (give an extracted checkout of the official repository)")
    sys.path.insert(0, str(path))
    if not torch.cuda.is_available():
        torch.Tensor.cuda = identity_cuda  # the official MAR/FlowAR/xAR code calls .cuda() on new tensors


def flash_attn_stand_in():
    """An empty ``flash_attn`` module for the duration of an import (xAR imports it and never calls it);
    removed afterwards so that other libraries' availability checks do not see it."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        had = "flash_attn" in sys.modules
        if not had:
            stub = types.ModuleType("flash_attn")

            def flash_attn_func(*a, **k):
                raise RuntimeError("flash_attn stand-in: not available in this benchmark")

            stub.flash_attn_func = flash_attn_func
            sys.modules["flash_attn"] = stub
        try:
            yield
        finally:
            if not had:
                sys.modules.pop("flash_attn", None)
    return ctx()


def labels_for(batch: int) -> torch.Tensor:
    return torch.tensor([(207 + 101 * i) % 1000 for i in range(batch)])


class Family:
    """One official family: build, save, load into visar, run both samplers, compare, count passes."""

    name = "?"
    sizes: dict = {}
    #: what the outputs are and how they must agree
    agreement = "?"
    default_settings: dict = {}

    def __init__(self, args):
        self.args = args
        self.settings = {**self.default_settings, **{k: v for k, v in vars(args).items()
                                                      if k in self.default_settings and v is not None}}

    def visar_options(self, seed: int | None = None) -> dict:
        """visar's sampler options for :attr:`settings` (the same knobs under visar's names); ``seed`` for
        samplers that take a second seeded stream."""
        return dict(self.settings)

    def make_sampler(self, extra: dict | None = None):
        """visar's default sampler for the loaded model, with ``extra`` options (e.g. ``compile=True``) as its
        constructor defaults; made once and reused, so anything it caches (a compiled step) persists across
        runs. An option the sampler does not take fails here, before any timing."""
        from visar.samplers.base import default_sampler, get_sampler

        name = default_sampler(self.ours).name
        sampler = get_sampler(name, **(extra or {}))
        sampler.resolve(self.visar_options())  # validates the merged options now
        return sampler

    def run_visar(self, labels: torch.Tensor, seed: int, sampler=None):
        """One visar sample with ``sampler`` (default: the plain default sampler), seeded like the official."""
        if sampler is None:
            sampler = self.__dict__.setdefault("_plain_sampler", self.make_sampler())
        g = torch.Generator().manual_seed(seed)
        return self.finish_visar(sampler(self.ours, Condition.of(labels), g, **self.visar_options(seed)), labels)

    def finish_visar(self, out, labels):
        """What visar's sampler returned, as the official sampler returns it."""
        return out

    def build_official(self, size: str):
        raise NotImplementedError

    def save_official(self, model, path: Path) -> None:
        torch.save(model.state_dict(), path)

    def load_visar(self, path: Path):
        raise NotImplementedError

    def run_official(self, labels: torch.Tensor, seed: int):
        raise NotImplementedError

    def agree(self, official, ours) -> tuple[bool, str]:
        d = rel_diff(ours, official)
        return d <= 1e-4, f"max rel diff {d:.1e}"

    def pass_groups(self):
        raise NotImplementedError


class LlamaGen(Family):
    name = "llamagen"
    sizes = {"gpt-b": dict(n_layer=12, n_head=12, dim=768), "gpt-l": dict(n_layer=24, n_head=16, dim=1024),
             "tiny": dict(n_layer=2, n_head=2, dim=128)}
    agreement = "tokens identical"
    default_settings = dict(cfg_scale=4.0, top_k=0, top_p=1.0, temperature=1.0, num_tokens=256)

    def build_official(self, size):
        from autoregressive.models.gpt import ModelArgs, Transformer

        vocab, block = (16384, 256) if size != "tiny" else (256, 16)
        self.block_size = block
        return Transformer(ModelArgs(vocab_size=vocab, block_size=block, num_classes=1000, cls_token_num=1,
                                     model_type="c2i", **self.sizes[size]))

    def save_official(self, model, path):
        torch.save({"model": model.state_dict()}, path)

    def load_visar(self, path):
        from visar.convert.llamagen import load_generator

        grid = int(round(self.block_size ** 0.5))
        self.settings["num_tokens"] = min(self.settings["num_tokens"], grid * grid)
        return load_generator(path, grid_size=grid)

    def run_official(self, labels, seed):
        from autoregressive.models.generate import generate

        s = self.settings
        torch.manual_seed(seed)
        return generate(self.official, labels, s["num_tokens"], cfg_scale=s["cfg_scale"], cfg_interval=-1,
                        temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"], sample_logits=True)

    def finish_visar(self, out, labels):
        return out.flatten(1)

    def agree(self, official, ours):
        same = torch.equal(official.long(), ours.long())
        return same, "tokens identical" if same else f"{int((official.long() != ours.long()).sum())} tokens differ"

    def pass_groups(self):
        m = self.ours
        return [("trunk+head", m.trunk.norm, param_bytes([m.trunk, m.head]))]


class VAR(Family):
    name = "var"
    sizes = {"d16": 16, "d20": 20, "tiny": 2}
    agreement = "images within 2e-4"
    #: cfg is the official knob (visar: cfg_scale = 1 + cfg)
    default_settings = dict(cfg=1.5, top_k=900, top_p=0.96)

    def build_official(self, size):
        from models import VAR as OfficialVAR, VQVAE

        depth = self.sizes[size]
        if size == "tiny":  # the fixtures' p4 configuration
            self.scales = (1, 2, 3, 4)
            vae = VQVAE(vocab_size=64, z_channels=16, ch=32, test_mode=True, share_quant_resi=4,
                        v_patch_nums=self.scales)
            width, heads = 64, 2
        else:
            self.scales = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
            vae = VQVAE(vocab_size=4096, z_channels=32, ch=160, test_mode=True, share_quant_resi=4,
                        v_patch_nums=self.scales)
            width, heads = depth * 64, depth
        var = OfficialVAR(vae_local=vae, num_classes=1000, depth=depth, embed_dim=width, num_heads=heads,
                          drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1 * depth / 24, norm_eps=1e-6,
                          shared_aln=False, cond_drop_rate=0.1, attn_l2_norm=True, patch_nums=self.scales,
                          flash_if_available=True, fused_if_available=True)
        self.settings["top_k"] = min(self.settings["top_k"], vae.vocab_size)  # tiny: V = 64
        var.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
        self.vae = vae.eval()
        return var

    def save_official(self, model, path):
        torch.save(model.state_dict(), path)
        torch.save(self.vae.state_dict(), path.with_name("vae.pth"))

    def load_visar(self, path):
        from visar.convert.var import load_generator, load_tokenizer

        self.tok = load_tokenizer(path.with_name("vae.pth"), scales=self.scales)
        gen = load_generator(path, scales=self.scales)
        gen.bind_tokenizer(self.tok)
        return gen

    def run_official(self, labels, seed):
        s = self.settings
        return self.official.autoregressive_infer_cfg(labels.shape[0], labels, g_seed=seed, cfg=s["cfg"],
                                                      top_k=s["top_k"], top_p=s["top_p"], more_smooth=False)

    def visar_options(self, seed=None):
        s = self.settings
        return dict(cfg_scale=1 + s["cfg"], top_k=s["top_k"], top_p=s["top_p"])

    def finish_visar(self, tokens, labels):
        return self.tok.decode(tokens).add_(1).mul_(0.5)  # the official sampler returns images in [0, 1]

    def agree(self, official, ours):
        d = float((official - ours).abs().max())
        return d <= 2e-4, f"max abs diff {d:.1e}"

    def pass_groups(self):
        m = self.ours
        return [("transformer", m.head, param_bytes([m.word_embed, m.blocks, m.head_nm, m.head]))]


class MAR(Family):
    name = "mar"
    sizes = {"mar-b": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, decoder_embed_dim=768,
                           decoder_depth=12, decoder_num_heads=12, diffloss_d=6, diffloss_w=1024, buffer_size=64),
             "tiny": dict(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, decoder_embed_dim=32,
                          decoder_depth=2, decoder_num_heads=2, diffloss_d=2, diffloss_w=32, buffer_size=8)}
    agreement = "latents max|a-b| <= 1e-4 max|ref|"
    default_settings = dict(num_iter=16, num_steps=50, cfg_scale=3.0, cfg_schedule="linear", temperature=1.0)

    def build_official(self, size):
        from models.mar import MAR as OfficialMAR

        kw = self.sizes[size]
        return OfficialMAR(img_size=256, vae_stride=16, patch_size=1, mlp_ratio=4.0,
                           norm_layer=__import__("functools").partial(nn.LayerNorm, eps=1e-6), vae_embed_dim=16,
                           mask_ratio_min=0.7, label_drop_prob=0.1, class_num=1000, attn_dropout=0.1,
                           proj_dropout=0.1, num_sampling_steps=str(self.settings["num_steps"]),
                           diffusion_batch_mul=4, grad_checkpointing=False, **kw)

    def save_official(self, model, path):
        sd = model.state_dict()
        torch.save({"model": sd, "model_ema": sd}, path)

    def load_visar(self, path):
        from visar.convert.mar import load_generator

        kw = {} if self.args.size != "tiny" else dict(encoder_num_heads=2, decoder_num_heads=2)
        return load_generator(path, **kw)

    def run_official(self, labels, seed):
        s = self.settings
        torch.manual_seed(seed)
        np.random.seed(seed)
        return self.official.sample_tokens(labels.shape[0], num_iter=s["num_iter"], cfg=s["cfg_scale"],
                                           cfg_schedule=s["cfg_schedule"], labels=labels,
                                           temperature=s["temperature"])

    def visar_options(self, seed=None):
        return dict(self.settings, order_rng=seed)  # the official draws its orders from numpy's global seed

    def pass_groups(self):
        m = self.ours
        trunk = [m.z_proj, m.z_proj_ln, m.encoder_blocks, m.encoder_norm, m.decoder_embed, m.decoder_blocks,
                 m.decoder_norm]
        return [("encoder-decoder", m.decoder_norm, param_bytes(trunk)),
                ("diffusion head", m.head.net.input_proj, param_bytes([m.head.net]))]


class FlowAR(Family):
    name = "flowar"
    sizes = {"flowar-s": dict(encoder_embed_dim=768, encoder_depth=6, encoder_num_heads=12, decoder_embed_dim=768,
                              decoder_depth=6, decoder_num_heads=12, diffloss_d=2, diffloss_w=1024),
             "tiny": dict(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, decoder_embed_dim=32,
                          decoder_depth=2, decoder_num_heads=2, diffloss_d=2, diffloss_w=64)}
    agreement = "latents max|a-b| <= 1e-4 max|ref|"
    default_settings = dict(num_steps=25, cfg_scale=4.3, guidance_high=0.9)

    def build_official(self, size):
        from models.flowar import FlowAR as OfficialFlowAR

        return OfficialFlowAR(img_size=256, vae_stride=16, patch_size=1, mlp_ratio=4.0, vae_embed_dim=16,
                              label_drop_prob=0.1, class_num=1000, attn_dropout=0.0, proj_dropout=0.0,
                              buffer_size=0, scale=(1, 2, 4, 8, 16), cross=False, use_checkpoint=False,
                              **self.sizes[size])

    def load_visar(self, path):
        from visar.convert.flowar import load_generator

        return load_generator(path)

    def run_official(self, labels, seed):
        s = self.settings
        torch.manual_seed(seed)
        return self.official.sample_tokens(num_steps=s["num_steps"], guidance=s["guidance_high"], cfg=s["cfg_scale"],
                                           labels=labels)

    def pass_groups(self):
        m = self.ours
        trunk = [m.z_proj, m.z_proj_ln, m.encoder_blocks, m.encoder_norm, m.decoder_embed, m.decoder_blocks,
                 m.decoder_norm]
        return [("encoder-decoder", m.decoder_norm, param_bytes(trunk)),
                ("flow head", m.flownet.input_proj, param_bytes([m.flownet]))]


class XAR(Family):
    name = "xar"
    sizes = {"xar-b": dict(encoder_embed_dim=768, encoder_depth=8, encoder_num_heads=12, decoder_embed_dim=768,
                           decoder_depth=8, decoder_num_heads=12),
             "tiny": dict(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, decoder_embed_dim=32,
                          decoder_depth=2, decoder_num_heads=2)}
    agreement = "latents max|a-b| <= 1e-4 max|ref|"
    default_settings = dict(num_steps=10, cfg_scale=2.7)

    def build_official(self, size):
        with flash_attn_stand_in():
            from models.xar import xAR as OfficialXAR

        return OfficialXAR(img_size=256, vae_stride=16, patch_size=1, mlp_ratio=4.0, vae_embed_dim=16,
                           label_drop_prob=0.1, class_num=1000, attn_dropout=0.0, proj_dropout=0.0, clusters=4,
                           **self.sizes[size])

    def load_visar(self, path):
        from visar.convert.xar import load_generator

        return load_generator(path)

    def run_official(self, labels, seed):
        s = self.settings
        torch.manual_seed(seed)
        return self.official.sample_tokens(num_steps=s["num_steps"], cfg=s["cfg_scale"], label=labels)

    def pass_groups(self):
        m = self.ours
        trunk = [m.time_embed, m.z_proj, m.z_proj_ln, m.encoder_blocks, m.encoder_norm, m.decoder_embed,
                 m.decoder_blocks, m.decoder_norm, m.pred]
        return [("transformer", m.decoder_norm, param_bytes(trunk))]


FAMILIES = {f.name: f for f in (LlamaGen, VAR, MAR, FlowAR, XAR)}
