"""Continuous KL tokenizer: the LDM "KL" autoencoder, hosted on ``diffusers.AutoencoderKL``.

This is the tokenizer of MAR, FlowAR and xAR (all three reuse MAR's ``kl16.ckpt``: 16 latent channels,
stride 16, latent scale 0.2325, no shift). Tokens are the scaled latents

    tokens = (posterior_mean - shift_factor) * scale_factor          # [B, C, h, w]

(``encode(..., sample=True)`` draws ``mean + std * noise`` instead, which is what MAR trains on) and
``decode(tokens) = vae.decode(tokens / scale_factor + shift_factor)``.

The posterior follows LDM: ``moments = quant_conv(encoder(x))``, ``mean, logvar = moments.chunk(2)``,
``logvar`` clamped to ``[-30, 20]``, ``std = exp(logvar / 2)``.

diffusers is imported inside the constructor only (it takes seconds to import). Official checkpoints
are mapped by :func:`visar.convert.mar.load_tokenizer`.

Training from scratch (:meth:`KLTokenizer.training_loss`, ``visar train`` task ``tokenizer``) uses the
LDM/MAR KL-VAE objective without its perceptual (LPIPS) and adversarial (PatchGAN) terms, which need
downloaded weights or a second network:

    loss = recon + kl_weight * kl
    recon = mean |x - decode(z)|   (or the mean squared error), z a posterior sample
    kl    = KL(N(mean, std^2) || N(0, 1)) summed over the latent, averaged over the batch, divided by 3*H*W

(LDM sums its pixel NLL and KL per image; dividing both by ``3*H*W`` keeps LDM's ``kl_weight`` meaning:
1e-6 for LDM's and MAR's KL VAEs.)

Latent scale: diffusion/flow heads expect tokens of roughly unit variance. With ``scale_factor="auto"``
the tokenizer keeps a running estimate of the std of its (unscaled, shifted) posterior means during
training (the tokens ``encode`` gives the generators), in the persistent buffer ``latent_std`` (saved with the weights, so an export carries it), and
uses ``scale_factor = 1 / latent_std``. :meth:`KLTokenizer.estimate_scale_factor` measures the same
quantity on a batch for any tokenizer (LDM's recipe: ``1 / std`` of the latents of a batch).
"""
from __future__ import annotations

import json
from typing import Any

import torch

from visar.tokenizers.base import Tokenizer
from visar.utils.config import register_config
from visar.utils.dist import all_reduce_, is_distributed
from visar.registry import Preset, register

#: ``diffusers.AutoencoderKL`` config of MAR's kl16 (fixture README, "Loading into diffusers")
KL16_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"] * 5,
    "block_out_channels": [128, 128, 256, 256, 512], "layers_per_block": 2,
    "act_fn": "silu", "latent_channels": 16, "norm_num_groups": 32, "sample_size": 256,
    "scaling_factor": 0.2325, "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}

#: the tiny twin used by tests (same topology rules, 3 levels, stride 4, width 32)
KL_TINY_CONFIG: dict[str, Any] = {
    **KL16_CONFIG,
    "down_block_types": ["DownEncoderBlock2D"] * 2 + ["AttnDownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 32, 64], "sample_size": 64,
}

LOGVAR_CLAMP = (-30.0, 20.0)
RECON_LOSSES = ("l1", "mse")


@register("tokenizer", "kl")
class KLTokenizer(Tokenizer):
    """Images ``[B, 3, H, W]`` in ``[-1, 1]`` <-> continuous tokens ``[B, C, H/s, W/s]``.

    Args:
        vae_config: keyword arguments of ``diffusers.AutoencoderKL`` (its ``config.json``).
        scale_factor: multiplies the latents (0.2325 for MAR's kl16). Defaults to the config's
            ``scaling_factor``. ``"auto"``: ``1 / latent_std``, a running estimate of the std of the
            unscaled posterior means (what :meth:`encode` returns) updated by every :meth:`training_loss` call in training mode
            (momentum ``max(0.01, 1 / n)`` after ``n`` updates) and saved with the weights.
        shift_factor: subtracted before scaling (``None`` or 0: no shift; MAR has none).
        kl_weight: weight of the KL term of :meth:`training_loss` (LDM/MAR: 1e-6).
        recon_loss: ``"l1"`` (LDM) or ``"mse"`` pixel reconstruction loss of :meth:`training_loss`.
    """

    kind = "continuous"
    family = "kl"

    @register_config
    def __init__(self, vae_config: dict | None = None, scale_factor: float | str | None = None,
                 shift_factor: float | None = None, kl_weight: float = 1e-6, recon_loss: str = "l1"):
        super().__init__()
        from diffusers import AutoencoderKL

        if vae_config is not None and not isinstance(vae_config, dict):
            raise TypeError(f"vae_config must be a dict of diffusers.AutoencoderKL kwargs, got {type(vae_config).__name__}")
        cfg = dict(KL16_CONFIG if vae_config is None else vae_config)
        cfg.pop("_class_name", None)
        cfg.pop("_diffusers_version", None)
        self.vae = AutoencoderKL(**cfg)
        if isinstance(scale_factor, str):
            if scale_factor != "auto":
                raise ValueError(f"scale_factor must be a positive number, None or 'auto', got {scale_factor!r}")
            self._fixed_scale: float | None = None
            # unscaled latent std (running estimate) and the number of updates so far
            self.register_buffer("latent_std", torch.ones(()))
            self.register_buffer("latent_std_updates", torch.zeros((), dtype=torch.long))
        else:
            if scale_factor is None:
                scale_factor = float(cfg.get("scaling_factor", 1.0))
            if not scale_factor > 0:
                raise ValueError(f"scale_factor must be > 0 (or 'auto'), got {scale_factor}")
            self._fixed_scale = float(scale_factor)
        if not kl_weight >= 0:
            raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
        if recon_loss not in RECON_LOSSES:
            raise ValueError(f"recon_loss must be one of {RECON_LOSSES}, got {recon_loss!r}")
        self.kl_weight = float(kl_weight)
        self.recon_loss = recon_loss
        self.shift_factor = float(shift_factor or 0.0)
        self.latent_channels = int(self.vae.config.latent_channels)
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ saving (a diffusers-readable folder)
    #: weights file of a saved component folder: diffusers' name, so ``AutoencoderKL.from_pretrained`` opens it
    DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"

    def component_config(self) -> dict:
        """``config.json`` of :meth:`save_pretrained`'s folder: the diffusers ``AutoencoderKL`` config at top level
        (its ``scaling_factor`` / ``shift_factor`` set to this tokenizer's latent scale and shift, as diffusers
        applies them: ``latents = (z - shift_factor) * scaling_factor``), and under ``"_visar"`` this tokenizer's
        own constructor arguments (``config``) and the running ``latent_std`` buffers of ``scale_factor="auto"``
        (``buffers``). diffusers drops keys starting with ``_``."""
        import diffusers

        cfg = {k: v for k, v in json.loads(self.vae.to_json_string()).items() if not k.startswith("_")}
        cfg.update(scaling_factor=self.scale_factor, shift_factor=self.shift_factor or None)
        buffers = {}
        if self._fixed_scale is None:
            buffers = {"latent_std": float(self.latent_std), "latent_std_updates": int(self.latent_std_updates)}
        meta = self._visar_meta(self.DIFFUSERS_WEIGHTS, config=self.config, buffers=buffers)
        return {"_class_name": "AutoencoderKL", "_diffusers_version": diffusers.__version__, **cfg, "_visar": meta}

    def component_state(self) -> dict[str, torch.Tensor]:
        """The VAE's parameters under diffusers' names (``encoder.down_blocks.0...``, no ``vae.`` prefix)."""
        return {k: v for k, v in self.vae.state_dict().items()}

    @classmethod
    def state_from_component(cls, state: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
        out = {f"vae.{k}": v for k, v in state.items()}
        buffers = (meta.get("_visar") or {}).get("buffers") or {}
        if "latent_std" in buffers:
            out["latent_std"] = torch.tensor(float(buffers["latent_std"]))
            out["latent_std_updates"] = torch.tensor(int(buffers.get("latent_std_updates", 0)), dtype=torch.long)
        return out

    # ------------------------------------------------------------------ scale
    @property
    def scale_factor(self) -> float:
        """Multiplier of the (shifted) latents: fixed, or ``1 / latent_std`` with ``scale_factor="auto"``."""
        if self._fixed_scale is not None:
            return self._fixed_scale
        return float(1.0 / self.latent_std.clamp_min(1e-6))

    def _scale(self) -> float | torch.Tensor:
        # a 0-dim tensor in auto mode (no host sync on an accelerator)
        return self._fixed_scale if self._fixed_scale is not None else 1.0 / self.latent_std.clamp_min(1e-6)

    @torch.no_grad()
    def estimate_scale_factor(self, images: torch.Tensor, sample: bool = False,
                              generator: torch.Generator | None = None) -> float:
        """``1 / std`` of the unscaled, shifted latents of ``images`` ``[B, 3, H, W]`` in ``[-1, 1]``
        (posterior means, or samples with ``sample=True``): the ``scale_factor`` that gives them unit
        std (LDM's recipe). Use a few hundred images; the result is not applied, pass it as ``scale_factor``.
        """
        mean, std = self.posterior(images)
        z = mean
        if sample:
            z = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        s = (z.float() - self.shift_factor).std()
        if not torch.isfinite(s) or s <= 0:
            raise ValueError(f"latent std is {float(s)}: cannot estimate a scale factor (need more than one "
                             "latent value and a finite encoder output)")
        return float(1.0 / s)

    # ------------------------------------------------------------------ posterior
    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior ``(mean, std)``, each ``[B, C, H/s, W/s]`` (``logvar`` clamped to [-30, 20])."""
        mean, logvar = self._posterior_moments(images)
        return mean, torch.exp(0.5 * logvar)

    def _posterior_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior ``(mean, logvar)`` with ``logvar`` clamped to [-30, 20]."""
        self.check_images(images)
        moments = self.vae.encoder(images)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_CLAMP)

    def encode(self, images: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None, *, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled latents ``[B, C, H/s, W/s]``: the posterior mean, or a posterior sample if ``sample``.

        ``noise`` (``[B, C, H/s, W/s]`` standard-normal draws, implies ``sample``) replaces the draw from
        ``generator``: the sample is ``mean + std * noise`` (e.g. to replay a recorded training step).
        """
        mean, std = self.posterior(images)
        z = mean
        if noise is not None:
            if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != tuple(mean.shape):
                raise ValueError(f"noise must be a tensor of the posterior's shape {list(mean.shape)}, got "
                                 f"{list(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
            z = mean + std * noise.to(device=mean.device, dtype=mean.dtype)
        elif sample:
            z = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (z - self.shift_factor) * self._scale()

    # ------------------------------------------------------------------ decoder
    def check_latents(self, latents: torch.Tensor) -> None:
        """``latents`` must be a float ``[B, latent_channels, h, w]`` tensor."""
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError(f"latents must be a float tensor [B, {self.latent_channels}, h, w], got "
                            f"{type(latents).__name__ if not isinstance(latents, torch.Tensor) else latents.dtype}")
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must have shape [B, {self.latent_channels}, h, w] (scaled KL latents), got "
                             f"{tuple(latents.shape)}; a generator's tokens [B, L, C] must be unpatchified first")
        if latents.shape[-1] < 1 or latents.shape[-2] < 1:
            raise ValueError(f"latents have an empty spatial grid: {tuple(latents.shape)}")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[B, C, h, w]`` -> images ``[B, 3, h*s, w*s]``, nominally in ``[-1, 1]`` (not clamped)."""
        self.check_latents(latents)
        return self._decode_unscaled(latents / self._scale() + self.shift_factor)

    def _decode_unscaled(self, z: torch.Tensor) -> torch.Tensor:
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        return self.vae.decoder(z)

    # ------------------------------------------------------------------ training
    def training_loss(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """KL-VAE loss on a batch ``[B, 3, H, W]`` in ``[-1, 1]`` (LDM/MAR objective without LPIPS and GAN).

        Returns scalars: ``loss = recon + kl_weight * kl``; ``recon``: mean L1 (or MSE) between the images
        and the decoding of a posterior sample; ``kl``: ``KL(q(z|x) || N(0, I))`` summed over the latent,
        averaged over the batch and divided by ``3*H*W``; detached ``latent_std`` (std of the unscaled
        posterior means of this batch) and ``posterior_std`` (mean posterior std).
        In training mode with ``scale_factor="auto"`` the running ``latent_std`` buffer is updated.
        Under an initialised ``torch.distributed`` group of several processes (data parallelism), in
        training mode ``latent_std`` is the std of the whole global batch (moments all-reduced in
        float64; a collective every process must run), so every replica keeps the same estimate.
        """
        mean, logvar = self._posterior_moments(images)
        std = torch.exp(0.5 * logvar)
        z = mean + std * torch.randn_like(mean)
        recon = self._decode_unscaled(z)
        if recon.shape != images.shape:
            raise ValueError(f"the decoder returned {tuple(recon.shape)} for images {tuple(images.shape)}")
        diff = recon.float() - images.float()
        rec = diff.abs().mean() if self.recon_loss == "l1" else diff.pow(2).mean()
        m, s, logvar = mean.float(), std.float(), logvar.float()
        kl_per_image = 0.5 * (m.pow(2) + s.pow(2) - 1.0 - logvar).flatten(1).sum(1)
        kl = kl_per_image.mean() / images[0].numel()
        with torch.no_grad():
            batch_std = _global_std(m - self.shift_factor) if self.training and is_distributed() \
                else (m - self.shift_factor).std()
            if self.training and self._fixed_scale is None:  # tensor ops only: no host sync per step
                self.latent_std_updates.add_(1)
                w = (1.0 / self.latent_std_updates.float()).clamp_min(0.01)
                upd = torch.lerp(self.latent_std.float(), batch_std, w)
                self.latent_std.copy_(torch.where(torch.isfinite(batch_std), upd, self.latent_std.float()))
        return {"loss": rec + self.kl_weight * kl, "recon": rec, "kl": kl,
                "latent_std": batch_std, "posterior_std": s.mean().detach()}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean."""
        return self.decode(self.encode(images))


def _global_std(x: torch.Tensor) -> torch.Tensor:
    """Unbiased std (float32 scalar) of ``x`` pooled over all processes: two all-reduced float64
    passes (count and sum, then squared deviations from the global mean), equal on every rank."""
    x = x.double()
    first = all_reduce_(torch.stack([x.new_tensor(float(x.numel())), x.sum()]), "sum")
    n, mean = first[0], first[1] / first[0]
    sq = all_reduce_((x - mean).square().sum(), "sum")
    return (sq / (n - 1).clamp_min(1)).sqrt().float()


PRESETS = {
    "mar-kl16": Preset(
        cls="visar.tokenizers.kl:KLTokenizer", kind="tokenizer",
        kwargs={"vae_config": KL16_CONFIG, "scale_factor": 0.2325},
        paper="MAR (Li et al. 2024) KL-16 VAE, kl16.ckpt; also the tokenizer of FlowAR and xAR",
        eval={"image_size": 256, "latent_scale": 0.2325, "source": "LTH14/mar README / models/vae.py"}),
    "kl-tiny": Preset(
        cls="visar.tokenizers.kl:KLTokenizer", kind="tokenizer",
        kwargs={"vae_config": KL_TINY_CONFIG, "scale_factor": 0.2325},
        paper="tiny twin of MAR's KL-16 for tests (width 32, 3 levels, stride 4)",
        eval={"image_size": 64}),
}
