"""The step protocol: what a generator exposes so that samplers (which own the loops) can drive it.

Every AR family implements one of the protocols below; a sampler checks the protocol it needs with
``isinstance(model, Protocol)`` and never touches a family's private names. The *unit* of a step
differs by paradigm (a token, a masked set, a scale, an entity), the shape of the contract does not:

* ``start(cond, guided) -> state`` allocates what a sample needs (static KV caches of both CFG
  halves). Rows are ``[cond; null]`` (``R = 2B``) when ``guided`` and ``R = B`` otherwise.
* ``step(state, inputs, ...)`` consumes new inputs and returns what the family emits: logits
  (discrete tokens) or conditioning vectors ``z`` for a token head (continuous tokens), for all
  ``R`` rows. Guidance, temperature, filtering and drawing are the sampler's job.
* next-token states hold **per-row** lengths ``[R]``: rows may sit at different positions, and
  ``rewind`` only lowers lengths (nothing is copied; stale cache entries are masked, then overwritten).

Token heads (:class:`TokenHead`) expose one denoising step; the chain is driven by
:mod:`visar.samplers.heads`, so speculative samplers can share noise and stop before the last step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from visar.conditions import Condition


@dataclass
class StepState:
    """What every decoding state carries.

    Attributes:
        batch: ``B``, the number of images.
        guided: rows are ``[cond; null]`` (``R = 2B``) for classifier-free guidance, else ``R = B``.
    """

    batch: int
    guided: bool

    @property
    def rows(self) -> int:
        """``R``: ``2B`` when guided, else ``B``."""
        return 2 * self.batch if self.guided else self.batch


@runtime_checkable
class NextTokenModel(Protocol):
    """Raster-order next-token models (LlamaGen; the causal continuous model; CTF's coarse stage).

    Written once in :class:`visar.generators.components.token_cache_steps.CachedTokenSteps`, whose state
    (:class:`~visar.generators.components.token_cache_steps.NextTokenState`) carries ``batch``, ``guided``, ``rows``,
    ``cond_len`` and per-row ``lengths [R]``. It also offers ``decode_step(state, inputs [R, n, ...],
    pos [R], attend_len=None)``, the unchecked step samplers' hot loops use (``attend_len=None``, the whole
    cache, is the static-shape step ``compile=True`` compiles).

    Attributes:
        num_tokens: ``L`` image tokens.
        emits: ``"logits"`` (``[.., V]`` raw float32 logits, discrete tokens) or ``"condition"``
            (``[.., D]`` conditioning of a :class:`TokenHead`, continuous tokens).
    """

    num_tokens: int
    emits: ClassVar[str]

    def start(self, cond: Condition, guided: bool = False) -> tuple[Any, torch.Tensor]:
        """Allocate the static cache and prefill the condition (rows ``[cond; null]`` when ``guided``).

        Returns ``(state, first)``: ``first [R, V or D]`` predicts image token 0 for every row;
        ``state.lengths [R]`` counts committed image tokens per row (0 here).
        """

    def step(self, state: Any, inputs: torch.Tensor, pos: torch.Tensor | int) -> torch.Tensor:
        """Feed ``inputs`` (``LongTensor [B or R, n]`` ids, or ``[B or R, n, C]`` continuous tokens; ``B``
        rows are fed to both halves) at per-row image positions ``pos`` (int, ``[B]`` or ``[R]``, each at
        most the row's committed length; a smaller one rolls the row back). Returns ``[R, n, V or D]``:
        entry ``j`` predicts image token ``pos + j + 1``; committed lengths become ``pos + n``."""

    def rewind(self, state: Any, n: int | torch.Tensor) -> None:
        """Forget the last ``n`` committed tokens (int or per-row ``[R]``): lengths only go down."""


@runtime_checkable
class TokenHead(Protocol):
    """A per-token denoising head (diffusion: MAR's DiffLoss; flow matching), one step at a time.

    The chain (start noise, the loop, the draws) is :func:`visar.samplers.heads.sample_head`'s; a head
    exposes its one step by ``kind``:

    * ``"diffusion"``: ``step_gaussian(x [R, C], index, z [R, D], steps, cfg, guided, x0_clip) -> (mean,
      std)`` each ``[R, C]``, un-tempered (``index`` runs from ``steps - 1`` down to 0);
      ``resolve_x0_clip(x0_clip)``;
    * ``"flow"``: ``solver_step(x [N, C], t0, t1, z [R, D], cfg, guided) -> [N, C]`` (one Euler / Heun step
      of the velocity ODE), ``time_grid(steps)`` (``steps + 1`` floats from 0 to 1), ``final_std``.

    Rows of ``z`` are ``[cond; uncond]`` (``R = 2N``) when guided, else ``R = N``.

    Attributes:
        token_dim: ``C`` channels of a token; num_sampling_steps: its default step count.
        kind: ``"diffusion"`` or ``"flow"``.
    """

    token_dim: int
    num_sampling_steps: int
    kind: ClassVar[str]

    def resolve_steps(self, steps: int | None = None, temperature: float = 1.0) -> int:
        """The validated step count of a chain (``None``: ``num_sampling_steps``); ``temperature > 0``."""


@runtime_checkable
class MaskedModel(Protocol):
    """Masked random-order models (MAR): a step predicts ``z`` for every position from the visible set.

    The sampler (``"masked"``) owns the generation order, the mask schedule, guidance and the head chain.

    Attributes:
        num_tokens: ``L``; token_dim: ``C`` per token; head: a :class:`TokenHead` (conditioning width ``D``).
    """

    num_tokens: int
    token_dim: int
    head: Any

    def start(self, cond: Condition, guided: bool = False) -> Any:
        """Condition embeddings of the ``R`` rows (a :class:`StepState` with ``device`` and ``dtype``, the
        device and float type of the tokens a sampler builds); rows are ``[cond; null]`` when ``guided``."""

    def step(self, state: Any, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``tokens [B, L, C]`` with ``mask [B, L]`` (True = still unknown; every row masks as many tokens)
        -> ``z [R, L, D]`` (both guidance halves see the same tokens)."""

    def to_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L, C]`` tokens -> the tokenizer's latents ``[B, C', h, w]``."""


@runtime_checkable
class NextScaleModel(Protocol):
    """Next-scale models: VAR (discrete, emits logits) and FlowAR (continuous, emits ``z`` for a flow head).

    A sample runs ``S = len(scales)`` steps, scale ``k`` having ``n_k = scales[k]^2`` tokens. The sampler
    turns step ``k``'s output into scale ``k``'s tokens and gives the model scale ``k + 1``'s input built
    from them through a family method (VAR: ``set_next_input(state, k + 1, area_down(f_hat) [B, n_{k+1},
    Cvae])``, the quantizer's accumulation staying in the sampler); the model only runs the pending input.
    Rows are ``[cond; null]`` (``R = 2B``) when ``guided``, else ``R = B``.

    Attributes:
        scales: side of each scale's token map, coarse to fine; emits: ``"logits"`` or ``"condition"``.
    """

    scales: Any
    emits: ClassVar[str]

    def start(self, cond: Condition, guided: bool = False) -> Any:
        """Static cache over all scales and the input of scale 0 pending (a :class:`StepState`); families
        may take keyword options (VAR: ``use_cache``, ``compile``)."""

    def step(self, state: Any, k: int) -> torch.Tensor:
        """Run scale ``k`` on ``state``'s pending input: ``[R, n_k, V]`` float32 logits (``emits == "logits"``)
        or ``[R, n_k, D]`` conditioning (``"condition"``)."""


@runtime_checkable
class NextXModel(Protocol):
    """Next-X models (xAR): entities (tokens, cells, subsamples, scales, the image) denoised one by one.

    Attributes:
        partition: the entity layout (``sizes``: tokens per entity, ``num_entities``).
        in_channels: ``C`` channels of a token.
    """

    partition: Any
    in_channels: int

    def start(self, cond: Condition, guided: bool = False, use_cache: bool = True) -> Any:
        """Static cache (none when ``use_cache`` is False) and labels of the ``R`` rows: a :class:`StepState`
        with ``device``, ``labels [R]`` and ``inputs`` (the last model call's input, for callbacks)."""

    def velocity(self, state: Any, x: torch.Tensor, t: float, k: int, first: bool) -> torch.Tensor:
        """Velocity ``[R, n_k, C]`` of entity ``k``'s noisy tokens ``x [B or R, n_k, C]`` (any float dtype;
        ``B`` rows are fed to both CFG halves) at flow time ``t`` (``1`` = noise; ``first``: the entity's
        first call, which also writes the previous entity into the cache)."""

    def commit(self, state: Any, k: int, x: torch.Tensor) -> None:
        """Record entity ``k``'s final tokens ``[B or R, n_k, C]`` (conditioning for later entities)."""

    def to_latents(self, seq: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` tokens in entity order -> the tokenizer's latents ``[B, C, H, W]``."""


@runtime_checkable
class CoarseToFineModel(Protocol):
    """Coarse-to-fine models (CTF): a next-token model over cluster labels, then fine labels in one pass.

    Attributes:
        coarse: a logits-emitting :class:`NextTokenModel` over the cluster ids.
        vocab_size: ``V`` fine labels (codewords); num_classes: class count (``num_classes`` = null
            class); grid_size: the token grid side (``N = grid_size**2``).
    """

    coarse: Any
    vocab_size: int
    num_classes: int
    grid_size: int

    def require_clusters(self) -> None:
        """Raise unless the codeword -> cluster map exists (sampling needs it)."""

    def fine_scores(self, coarse: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw fine-label scores of ``coarse [B, N]`` given class ids ``labels [B]`` (``num_classes`` = null),
        one auxiliary pass: ``(logits [B, N, K] float32, ids)`` where ``ids [B, N, K]`` maps a column to a
        codeword (``-1`` = padding, whose finite logits the sampler sets to ``-inf`` after guidance) or
        is ``None`` (column ``j`` is codeword ``j``, ``K = V``)."""


__all__ = ["StepState", "NextTokenModel", "TokenHead", "MaskedModel", "NextScaleModel", "NextXModel",
           "CoarseToFineModel"]
