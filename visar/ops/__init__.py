"""Fused operations of the sampling hot paths, each a Triton kernel on CUDA and a PyTorch reference elsewhere.

Ops (one module each): :func:`rms_norm` (``rmsnorm.py``; optionally of ``x + residual``), :func:`norm_modulate`
(``adaln.py``: LayerNorm or RMSNorm, then the AdaLN ``* (1 + scale) + shift``), :func:`gated_activation` / :func:`gelu` (the MLPs'
elementwise part), :func:`cfg_mix` (guidance), :func:`sample_logits` (guidance, temperature, top-k, top-p and
the categorical draw from explicit noise), :func:`ddpm_step` / :func:`flow_step` (one token-head step), and the
opt-in CPU route :func:`fast_small_linear` (``linear.py``).

:mod:`visar.ops.dispatch` picks the kernel or the reference per call (``VISAR_KERNELS``; ``docs/kernels.md``).
This package imports only torch (the kernels import triton on first use); :mod:`visar.nn` builds on it.
"""
from visar.ops.activations import gated_activation, gelu
from visar.ops.cfg import cfg_mix
from visar.ops.dispatch import kernel_mode, kernel_mode_set, set_kernel_mode, triton_available, use_kernel
from visar.ops.head_step import ddpm_step, flow_step
from visar.ops.linear import fast_small_linear, fast_small_linear_enabled, small_row_rule
from visar.ops.adaln import norm_modulate
from visar.ops.rmsnorm import rms_norm
from visar.ops.sampling import exponential_noise, sample_logits

__all__ = ["rms_norm", "norm_modulate", "gated_activation", "gelu", "cfg_mix", "sample_logits", "exponential_noise",
           "ddpm_step", "flow_step", "fast_small_linear", "fast_small_linear_enabled", "small_row_rule",
           "kernel_mode", "set_kernel_mode", "kernel_mode_set", "triton_available", "use_kernel"]
