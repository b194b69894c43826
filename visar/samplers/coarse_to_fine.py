"""Coarse-to-fine sampling (CTF, Guo et al. 2025): an AR stage over cluster ids, then one fine draw.

:class:`CoarseToFineSampler` (registered ``"coarse_to_fine"``) drives a
:class:`~visar.generators.protocol.CoarseToFineModel`:

1. coarse stage: ``model.coarse`` (a logits-emitting next-token model over the ``M`` clusters) through
   the autoregressive sampler's loop (:func:`visar.samplers.autoregressive.decode_tokens`) with
   ``cfg_scale``, ``cfg_interval``, ``temperature_coarse``, ``top_k``, ``top_p``;
2. fine stage (:func:`sample_fine`): ``model.fine_scores`` scores every position's candidates in one
   auxiliary pass (twice with guidance: class and null class), guidance ``u + s (c - u)`` with
   ``cfg_scale_fine``, padding columns to ``-inf``, then ``temperature_fine``, ``top_k_fine``,
   ``top_p_fine`` (LlamaGen order) and one multinomial draw per position.

Both stages draw from the one ``torch.Generator``, coarse first. Rows are processed in chunks so that
at most :data:`FINE_CHUNK_ELEMENTS` fine logits exist at once.
"""
from __future__ import annotations

from typing import Any

import torch

from visar.conditions import Condition
from visar.generators.protocol import CoarseToFineModel
from visar.nn.guidance import is_guided
from visar.registry import register
from visar.samplers.autoregressive import check_cfg_interval, decode_tokens
from visar.samplers.base import Sampler
from visar.samplers.logits import cfg_mix, check_finite, process_logits, sample_categorical
from visar.samplers.options import check_cfg_scale, check_temperature, check_top_k, check_top_p

#: upper bound on ``rows * positions * vocab`` logits materialised at once by the fine stage
FINE_CHUNK_ELEMENTS = 1 << 26


@torch.no_grad()
def sample_fine(model: Any, coarse: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None,
                temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, cfg_scale: float = 1.0,
                stats: dict | None = None) -> torch.Tensor:
    """Stage 2: draw every fine label of ``coarse [B, N]`` (cluster ids) given labels ``[B]`` at once.

    Guidance runs iff ``cfg_scale != 1``; ``temperature > 0``, ``top_k >= 0`` (0 disables), ``top_p`` in
    ``(0, 1]`` (1 disables). Returns codeword ids ``LongTensor [B, N]``; ``stats`` (if given) receives
    ``fine_passes`` (auxiliary passes).
    """
    B, N = coarse.shape
    guided = is_guided(cfg_scale)
    rows = max(1, FINE_CHUNK_ELEMENTS // (N * model.vocab_size * (2 if guided else 1)))
    out, passes = [], 0
    for s in range(0, B, rows):
        c, y = coarse[s: s + rows], labels[s: s + rows]
        logits, ids = model.fine_scores(c, y)  # [r, N, K], ids [r, N, K] (-1 = padding) or None
        passes += 1
        if guided:
            logits = cfg_mix(logits, model.fine_scores(c, torch.full_like(y, model.num_classes))[0], cfg_scale)
            passes += 1
        if ids is not None:
            logits = logits.masked_fill(ids < 0, float("-inf"))
        check_finite(logits, "CTF fine-label sampling")
        probs = process_logits(logits, temperature, top_k, top_p).softmax(-1)
        pick = sample_categorical(probs, generator)  # [r, N]
        out.append(pick if ids is None else ids.gather(-1, pick[..., None])[..., 0])
    if stats is not None:
        stats["fine_passes"] = passes
    return torch.cat(out)


@register("sampler", "coarse_to_fine")
class CoarseToFineSampler(Sampler):
    """CTF sampling: AR over coarse labels, then every fine label in one auxiliary pass.

    Options (defaults reproduce the former ``CoarseToFineGenerator.sample``):
        cfg_scale, cfg_interval, temperature_coarse, top_k, top_p: the coarse AR stage (LlamaGen's
            conventions; guidance iff ``cfg_scale != 1``).
        temperature_fine, top_k_fine, top_p_fine, cfg_scale_fine: the fine stage.
        progress: tqdm bar over the coarse tokens.
        compile: ``torch.compile`` the coarse stage's decode step (as the autoregressive sampler; the fine
            stage is one pass and stays eager).

    There is no ``temperature``: CTF has two (``temperature_coarse``, ``temperature_fine``).
    Returns codeword ids ``LongTensor [B, grid, grid]``. ``stats``: ``model_passes`` (coarse + fine),
    ``coarse_passes``, ``fine_passes``, ``tokens`` (per row); with ``compile``, ``compile_s`` and
    ``compiled_graphs``.
    """

    name = "coarse_to_fine"
    protocol = CoarseToFineModel
    defaults = dict(cfg_scale=1.0, temperature_coarse=1.0, temperature_fine=1.0, top_k=0, top_p=1.0,
                    top_k_fine=0, top_p_fine=1.0, cfg_scale_fine=1.0, cfg_interval=-1, progress=False, compile=False)

    @staticmethod
    def _no_single_temperature(options: dict[str, Any]) -> None:
        if "temperature" in options:
            raise TypeError("CTF has two temperatures: pass temperature_coarse= (AR stage) and/or "
                            "temperature_fine= (auxiliary stage) instead of temperature=")

    def __init__(self, **options: Any):
        self._no_single_temperature(options)
        super().__init__(**options)

    def resolve(self, options: dict[str, Any]) -> dict[str, Any]:
        self._no_single_temperature(options)
        return super().resolve(options)

    def validate(self, options: dict[str, Any]) -> None:
        check_cfg_interval(options["cfg_interval"])
        check_temperature(options["temperature_coarse"])
        check_temperature(options["temperature_fine"])
        check_cfg_scale(options["cfg_scale_fine"])
        check_top_k(options["top_k_fine"])
        check_top_p(options["top_p_fine"])

    def run(self, model: Any, cond: Condition, generator: torch.Generator | None, **o: Any) -> torch.Tensor:
        model.require_clusters()
        coarse_stats: dict = {}
        coarse = decode_tokens(model.coarse, cond, generator, cfg_scale=o["cfg_scale"],
                               cfg_interval=o["cfg_interval"], temperature=o["temperature_coarse"],
                               top_k=o["top_k"], top_p=o["top_p"], num_tokens=model.coarse.num_tokens,
                               progress=o["progress"], compile=o["compile"], stats=coarse_stats)  # [B, N]
        fine = sample_fine(model, coarse, cond.labels.to(coarse.device), generator, o["temperature_fine"],
                           o["top_k_fine"], o["top_p_fine"], o["cfg_scale_fine"], stats=self.stats)
        self.stats.update(coarse_passes=coarse_stats["model_passes"], tokens=coarse_stats["tokens"],
                          model_passes=coarse_stats["model_passes"] + self.stats["fine_passes"])
        self.stats.update({k: coarse_stats[k] for k in ("compile_s", "compiled_graphs") if k in coarse_stats})
        return fine.reshape(coarse.shape[0], model.grid_size, model.grid_size)


__all__ = ["CoarseToFineSampler", "sample_fine", "FINE_CHUNK_ELEMENTS"]
