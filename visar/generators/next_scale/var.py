"""Next-scale prediction (VAR; Tian et al. 2024, "Visual Autoregressive Modeling: Scalable Image
Generation via Next-Scale Prediction", arXiv 2404.02905).

The transformer predicts all tokens of scale ``k`` at once from the class condition and the
continuous features of scales ``< k``. Sequence layout (``L = sum pn_k^2``): the ``pn_0^2`` start
tokens (class embedding + ``pos_start``), then for each scale ``k >= 1`` the linear map
``word_embed`` of ``area_down(f_hat_{<k}, pn_k)`` (built by the tokenizer,
:meth:`MultiScaleResidualQuantizer.teacher_forcing_inputs`); every token also gets the scale embedding
``lvl_embed`` and the absolute position ``pos_1LC``. A block-causal mask lets a token see its own
scale and all coarser ones (Sec. 3.2).

Blocks (Sec. 4, official code): AdaLN-zero-style modulation from the class embedding with chunks
``gamma1, gamma2, scale1, scale2, shift1, shift2`` (in that order), ``x += gamma1 * attn(LN(x)(1+scale1)+shift1)``,
``x += gamma2 * ffn(LN(x)(1+scale2)+shift2)``; LN has no affine parameters (eps 1e-6); attention is
l2-normalised with a learned clamped per-head temperature; FFN is GELU(tanh). ``shared_adaln=True``
(the 512 px d36 release) computes one ``[B, 6, C]`` modulation shared by all blocks plus a learned
per-block offset ``ada_gss``. The head is ``Linear(LN(x)(1+scale)+shift)`` with its own AdaLN.

The model needs the tokenizer's quantizer (codebook + residual convs) to build its inputs from ids;
pairing it with a tokenizer (:meth:`check_tokenizer`, called by :class:`~visar.pipeline.Pipeline`)
or :meth:`bind_tokenizer` keeps a non-module reference, as the official code does.

Sampling: the model exposes the :class:`~visar.generators.protocol.NextScaleModel` step protocol
(:meth:`~NextScaleGenerator.start`, :meth:`~NextScaleGenerator.step`,
:meth:`~NextScaleGenerator.set_next_input`); the loop (guidance ramp, filters, draws, ``more_smooth``,
editing, the quantizer's ``f_hat`` accumulation) is :class:`visar.samplers.next_scale.NextScaleSampler`,
the ``default_sampler`` that ``sample`` delegates to.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from visar.generators.base import Condition, Generator
from visar.generators.components.draws import check_draw
from visar.generators.protocol import StepState
from visar.nn.attention import Attention
from visar.nn.embeddings import LabelEmbedding
from visar.nn.kv_cache import CacheState
from visar.nn.mlp import GeluMlp
from visar.nn.norms import layer_norm_no_affine
from visar.utils.config import register_config
from visar.registry import Preset, register

SCHEDULE_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
SCHEDULE_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


def scale_index(scales: Sequence[int]) -> torch.Tensor:
    """``[L]`` scale id of every token (0 for the first ``pn_0^2`` tokens, ...)."""
    return torch.cat([torch.full((pn * pn,), k, dtype=torch.long) for k, pn in enumerate(scales)])


def block_causal_mask(scales: Sequence[int]) -> torch.Tensor:
    """``[L, L]`` bool, True where the key's scale <= the query's scale (may attend)."""
    lvl = scale_index(scales)
    return lvl[None, :] <= lvl[:, None]


class DropPath(nn.Module):
    """Stochastic depth on the residual branch (training only): ``x * (keep / (1 - p))`` with one
    ``keep ~ Bernoulli(1 - p)`` per sample (VAR's ``drop_path``: the mask is divided first)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """``x [B, ...]``; ``keep [B]`` (0/1) replaces the draw from ``generator`` (torch's global RNG if ``None``)."""
        if self.p == 0.0 or not self.training:
            return x
        shape = (x.shape[0], *([1] * (x.dim() - 1)))
        if keep is None:
            keep = x.new_empty(shape).bernoulli_(1 - self.p, generator=generator)
        else:
            keep = keep.to(x.dtype).reshape(shape)
        return x * keep.div(1 - self.p)


class NextScaleBlock(nn.Module):
    """One VAR block: AdaLN + l2-normalised self-attention + GELU(tanh) FFN.

    ``mods [B, 6, C]`` (gamma1, gamma2, scale1, scale2, shift1, shift2) come from :meth:`modulation`.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, norm_eps: float, shared_adaln: bool,
                 attn_l2_norm: bool, drop_path: float = 0.0, attn_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__()
        self.dim, self.norm_eps = dim, norm_eps
        # VAR without l2-norm attention uses 0.25 / sqrt(head_dim), not 1 / sqrt(head_dim)
        scale = None if attn_l2_norm else 0.25 / math.sqrt(dim // num_heads)
        self.attn = Attention(dim, num_heads, qkv_bias="qv", proj_bias=True, qk_norm="l2" if attn_l2_norm else None,
                              scale=scale, attn_dropout=attn_dropout, proj_dropout=dropout)
        self.ffn = GeluMlp(dim, round(dim * mlp_ratio), approximate="tanh", dropout=dropout)
        self.drop_path = DropPath(drop_path)
        if shared_adaln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, dim) / dim ** 0.5)  # [1, 1, 6, C]
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def modulation(self, cond_or_shared: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` condition (separate AdaLN) or ``[B, 6, C]`` shared modulation -> ``[B, 6, C]``."""
        if hasattr(self, "ada_gss"):
            return self.ada_gss[0] + cond_or_shared
        return self.ada_lin(cond_or_shared).view(-1, 6, self.dim)

    def forward(self, x: torch.Tensor, mods: torch.Tensor, mask: torch.Tensor | None = None,
                cache=None, cache_pos: int | None = None, attend_len: int | None = None,
                drop_keep: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x [B, N, C]``, ``mods [B, 6, C]`` -> ``[B, N, C]``; ``drop_keep [2, B]``: the DropPath keep masks of
        the attention and FFN branches (training; drawn from ``generator`` when ``None``)."""
        ka, kf = (None, None) if drop_keep is None else drop_keep.unbind(0)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods[:, :, None].unbind(1)  # each [B, 1, C]
        h = layer_norm_no_affine(x, self.norm_eps) * (scale1 + 1) + shift1
        a = self.attn(h, mask=mask, cache=cache, cache_pos=cache_pos, attend_len=attend_len)
        x = x + self.drop_path(a * gamma1, ka, generator)
        h = layer_norm_no_affine(x, self.norm_eps) * (scale2 + 1) + shift2
        return x + self.drop_path(self.ffn(h) * gamma2, kf, generator)


@dataclass
class NextScaleState(StepState):
    """Decoding state of one VAR sample (:class:`~visar.generators.protocol.NextScaleModel` protocol).

    Rows are ``[cond; null]`` (``R = 2B``) when ``guided``, else ``R = B``; ``C`` is the width.

    Attributes:
        labels: class ids ``[B]`` of the conditional rows.
        cond_emb: class embeddings ``[R, C]`` (the null class on the unconditional rows).
        mods: per-block AdaLN modulation, ``depth`` tensors ``[R, 6, C]``.
        lvl_pos: scale + position embeddings ``[1, L, C]``.
        x: embedded input of the pending scale, ``[R, pn_k^2, C]``.
        scale: index ``k`` of the pending scale (``None`` once it has run, until the next input is set).
        pos: sequence position of ``x``'s first token (``begin_ends[k][0]``).
        cache: static KV cache over the ``L`` positions; ``None`` in naive mode, where ``prefix`` holds
            every embedded input so far and each step re-runs all of it (block-causal mask).
        forward: the cached per-scale function (:meth:`NextScaleGenerator.forward_scale`; the sampler puts its
            compiled version here with ``compile=True``, :mod:`visar.samplers.compiled`).
    """

    labels: torch.Tensor
    cond_emb: torch.Tensor
    mods: list
    lvl_pos: torch.Tensor
    x: torch.Tensor
    scale: int | None = 0
    pos: int = 0
    cache: CacheState | None = None
    prefix: list = field(default_factory=list)
    forward: Callable | None = None


@register("family", "var")
class NextScaleGenerator(Generator):
    """VAR transformer over a multi-scale schedule.

    Args:
        num_classes: class count; class ``num_classes`` is the CFG null class.
        vocab_size: codebook size ``V`` of the tokenizer.
        token_dim: codebook dimension ``Cvae``.
        scales: token-map sides ``pn_k`` (increasing; the last is the latent side).
        depth, width, num_heads, mlp_ratio: transformer size (VAR: ``width = 64 * depth``, ``heads = depth``).
        norm_eps: LayerNorm epsilon (1e-6).
        shared_adaln: one AdaLN projection shared by all blocks (512 px d36 release).
        attn_l2_norm: l2-normalised attention (every released checkpoint).
        class_dropout: label dropout probability for CFG training (0.1 in VAR).
        drop_path: maximum stochastic-depth rate (linear over depth, as in VAR).
        attn_dropout, dropout: attention / residual dropout (0 in VAR).
    """

    family = "var"
    token_kind = "multiscale"
    #: the step protocol emits logits over the codebook (:class:`~visar.generators.protocol.NextScaleModel`)
    emits: ClassVar[str] = "logits"
    #: VAR's sampler (CFG ramp, top-k, ascending top-p, ``more_smooth``, editing): ``visar.samplers.next_scale``
    default_sampler = "next_scale"

    @register_config
    def __init__(self, num_classes: int = 1000, vocab_size: int = 4096, token_dim: int = 32,
                 scales: Sequence[int] = SCHEDULE_256, depth: int = 16, width: int = 1024, num_heads: int = 16,
                 mlp_ratio: float = 4.0, norm_eps: float = 1e-6, shared_adaln: bool = False,
                 attn_l2_norm: bool = True, class_dropout: float = 0.1, drop_path: float = 0.0,
                 attn_dropout: float = 0.0, dropout: float = 0.0):
        super().__init__()
        scales = [int(s) for s in scales]
        if not scales or any(s < 1 for s in scales) or any(a >= b for a, b in zip(scales, scales[1:])):
            raise ValueError(f"scales must be strictly increasing positive sides, got {scales}")
        if not 0 <= class_dropout < 1:
            raise ValueError(f"class_dropout must be in [0, 1), got {class_dropout}")
        self.num_classes, self.vocab_size, self.token_dim = num_classes, vocab_size, token_dim
        self.scales, self.width, self.num_heads, self.depth = scales, width, num_heads, depth
        self.norm_eps, self.class_dropout, self.shared_adaln = norm_eps, class_dropout, shared_adaln
        self.first_len = scales[0] ** 2
        self.seq_len = sum(s * s for s in scales)
        self.begin_ends = []
        cur = 0
        for s in scales:
            self.begin_ends.append((cur, cur + s * s))
            cur += s * s

        C = width
        self.class_emb = LabelEmbedding(num_classes, C)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_len, C))  # [1, pn0^2, C]
        self.pos_1LC = nn.Parameter(torch.empty(1, self.seq_len, C))  # [1, L, C]
        self.lvl_embed = nn.Embedding(len(scales), C)
        self.word_embed = nn.Linear(token_dim, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C)) if shared_adaln else None
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linear over depth
        self.blocks = nn.ModuleList(
            NextScaleBlock(C, num_heads, mlp_ratio, norm_eps, shared_adaln, attn_l2_norm, rates[i],
                           attn_dropout, dropout) for i in range(depth))
        self.head_nm = nn.Module()
        self.head_nm.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))
        self.head = nn.Linear(C, vocab_size)
        self.register_buffer("lvl_1L", scale_index(scales)[None], persistent=False)  # [1, L]
        self.register_buffer("attn_mask", block_causal_mask(scales), persistent=False)  # [L, L] bool
        self._quantizer: list = []  # non-module reference to the tokenizer's quantizer
        self.reset_parameters()

    # ---- initialisation (VAR's init_weights: trunc-normal sqrt(1/3C), small AdaLN, tiny gammas) ----------
    @torch.no_grad()
    def reset_parameters(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02) -> None:
        C = self.width
        std = math.sqrt(1 / C / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        self.head.weight.mul_(init_head)
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        for b in self.blocks:
            b.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            b.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
            if hasattr(b, "ada_lin"):
                b.ada_lin[-1].weight[2 * C:].mul_(init_adaln)
                b.ada_lin[-1].weight[:2 * C].mul_(init_adaln_gamma)
            else:
                b.ada_gss[:, :, 2:].mul_(init_adaln)
                b.ada_gss[:, :, :2].mul_(init_adaln_gamma)

    # ---- tokenizer pairing ----------------------------------------------------------------------------
    def check_tokenizer(self, tokenizer) -> None:
        """Check kind, vocabulary, code dimension and schedule, then bind the tokenizer's quantizer."""
        super().check_tokenizer(tokenizer)
        self.bind_tokenizer(tokenizer)

    def bind_tokenizer(self, tokenizer) -> None:
        """Keep a (non-module) reference to ``tokenizer.quantize`` for building inputs and sampling."""
        q = tokenizer.quantize if isinstance(getattr(tokenizer, "quantize", None), nn.Module) else tokenizer
        for name, mine, theirs in (("vocabulary", self.vocab_size, q.vocab_size), ("code dim", self.token_dim, q.dim),
                                   ("schedule", self.scales, list(q.scales))):
            if mine != theirs:
                raise ValueError(f"tokenizer {name} {theirs} does not match the generator's {mine}; build the "
                                 f"tokenizer with scales={self.scales} (load_tokenizer(path, scales=...))")
        self._quantizer[:] = [q]

    @property
    def quantizer(self):
        if not self._quantizer:
            raise RuntimeError("this VAR generator has no tokenizer bound: call generator.bind_tokenizer(tokenizer) "
                               "(a Pipeline does it) before sampling or passing token ids")
        return self._quantizer[0]

    def tokens_to_list(self, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Validate per-scale ids (a list, or one ``[B, L]`` tensor of concatenated scales) -> ``[B, pn_k^2]`` each."""
        if isinstance(tokens, torch.Tensor) and not tokens.is_floating_point() and tokens.dim() == 2 \
                and tokens.shape[1] == self.seq_len:
            tokens = list(tokens.split([s * s for s in self.scales], dim=1))
        if not isinstance(tokens, (list, tuple)) or len(tokens) != len(self.scales):
            raise ValueError(f"tokens must be a list of {len(self.scales)} LongTensors for scales {self.scales}")
        out = []
        for k, (t, pn) in enumerate(zip(tokens, self.scales)):
            if t.is_floating_point() or t[0].numel() != pn * pn:
                raise ValueError(f"tokens[{k}] must be integer ids [B, {pn}, {pn}], got {t.dtype} {tuple(t.shape)}")
            out.append(t.reshape(t.shape[0], pn * pn))
        flat = torch.cat(out, 1)
        if int(flat.min()) < 0 or int(flat.max()) >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got [{int(flat.min())}, {int(flat.max())}]")
        return out

    # ---- forward ------------------------------------------------------------------------------------------
    def labels_of(self, cond: Condition | torch.Tensor | Sequence[int], allow_null: bool = True) -> torch.Tensor:
        """Class ids ``[B]`` from a Condition / tensor / list, validated (the null class allowed if asked)."""
        labels = cond.labels if isinstance(cond, Condition) else torch.as_tensor(cond, device=self.pos_1LC.device)
        if labels is None:
            raise ValueError("VAR is class-conditional: give class ids (Condition(labels=...))")
        labels = labels.reshape(-1).long()
        hi = self.num_classes + (1 if allow_null else 0)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= hi):
            raise ValueError(f"class ids must lie in [0, {self.num_classes})"
                             + (f" (or {self.num_classes} = null class)" if allow_null else "")
                             + f", got min {int(labels.min())}, max {int(labels.max())}")
        return labels.to(self.pos_1LC.device)

    def condition_mods(self, cond_emb: torch.Tensor) -> list[torch.Tensor]:
        """Per-block modulation ``[B, 6, C]`` from the class embedding ``[B, C]``."""
        src = self.shared_ada_lin(cond_emb).view(-1, 6, self.width) if self.shared_ada_lin is not None else cond_emb
        return [b.modulation(src) for b in self.blocks]

    def head_logits(self, x: torch.Tensor, cond_emb: torch.Tensor) -> torch.Tensor:
        """``x [B, N, C]`` -> logits ``[B, N, V]`` in float32 (AdaLN before the head)."""
        scale, shift = self.head_nm.ada_lin(cond_emb).view(-1, 2, 1, self.width).unbind(1)
        h = layer_norm_no_affine(x, self.norm_eps) * (scale + 1) + shift
        return self.head(h).float()

    def embed_inputs(self, inputs: torch.Tensor, cond_emb: torch.Tensor) -> torch.Tensor:
        """Sum of all embeddings ``[B, L, C]`` for teacher-forcing ``inputs [B, L - pn0^2, Cvae]``."""
        B = cond_emb.shape[0]
        sos = cond_emb[:, None].expand(B, self.first_len, -1) + self.pos_start
        x = torch.cat([sos, self.word_embed(inputs.to(self.word_embed.weight.dtype))], dim=1)
        return x + self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def forward_hidden(self, inputs: torch.Tensor, labels: torch.Tensor, drop_path: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Teacher-forced hidden states: ([embeddings, block 0 out, ...], class embedding ``[B, C]``).

        ``drop_path [depth, 2, B]``: DropPath keep masks (training; see :meth:`loss`), else drawn from ``generator``.
        """
        if inputs.dim() != 3 or inputs.shape[1:] != (self.seq_len - self.first_len, self.token_dim):
            raise ValueError(f"teacher-forcing inputs must be [B, {self.seq_len - self.first_len}, {self.token_dim}], "
                             f"got {tuple(inputs.shape)}; build them with tokenizer.teacher_forcing_inputs(tokens)")
        cond_emb = self.class_emb(labels)
        x = self.embed_inputs(inputs, cond_emb)
        mask = self.attn_mask
        hidden = [x]
        for i, (b, mods) in enumerate(zip(self.blocks, self.condition_mods(cond_emb))):
            x = b(x, mods, mask=mask, drop_keep=None if drop_path is None else drop_path[i], generator=generator)
            hidden.append(x)
        return hidden, cond_emb

    def forward(self, tokens: Sequence[torch.Tensor] | torch.Tensor, cond: Condition | torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``[B, L, V]`` over all scales (float32).

        Args:
            tokens: per-scale ids (list of ``[B, pn_k, pn_k]`` or one ``[B, L]`` LongTensor; needs a bound
                tokenizer) or the float teacher-forcing inputs ``[B, L - pn0^2, Cvae]`` directly.
            cond: class ids (the null class ``num_classes`` gives unconditional logits). No label
                dropout here (the official forward drops labels even in eval mode; visar does not).
        """
        labels = self.labels_of(cond)
        if isinstance(tokens, torch.Tensor) and tokens.is_floating_point():
            inputs = tokens
        else:
            inputs = self.quantizer.teacher_forcing_inputs(self.tokens_to_list(tokens))
        hidden, cond_emb = self.forward_hidden(inputs, labels)
        return self.head_logits(hidden[-1], cond_emb)

    #: ``optim.ema: official``: VAR's trainer keeps no EMA (the trained weights are the released ones)
    official_ema_decay = 0.0
    #: substrings of parameter names VAR's ``train.py`` exempts from weight decay (its ``nowd_keys``)
    NO_WEIGHT_DECAY_KEYS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC",
                            "pos_start", "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias",
                            "scale_mul")

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay besides 1-D tensors and biases (timm's convention): VAR's rule,
        every name containing one of :attr:`NO_WEIGHT_DECAY_KEYS` (``pos_start``, ``pos_1LC``, ``lvl_embed``,
        the attention ``scale_mul`` and the shared-AdaLN ``ada_gss``); ``word_embed`` and the class table decay."""
        return {n for n, _ in self.named_parameters() if any(k in n for k in self.NO_WEIGHT_DECAY_KEYS)}

    def loss(self, tokens: Sequence[torch.Tensor], cond: Condition | torch.Tensor,
             generator: torch.Generator | None = None, *, drop: torch.Tensor | None = None,
             drop_path: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy over all ``L`` tokens as VAR's trainer computes it: per-token CE weighted by ``1 / L``,
        summed over tokens, averaged over images (every scale weighted by its token count).

        In training mode labels are dropped to the null class with probability ``class_dropout`` and the
        residual branches of blocks with a DropPath rate ``> 0`` are dropped per sample, drawn from
        ``generator`` in that order (DropPath: block by block, attention then FFN branch). Explicit draws:

        Args:
            drop: ``[B]`` bool, True = label replaced by the null class (applied in any mode).
            drop_path: ``[depth, 2, B]`` keep masks (1 = keep) of the attention and FFN branches of every
                block; the rows of blocks without DropPath must be all ones. Kept rows are scaled by
                ``1 / (1 - rate)`` as usual.
        """
        ids = self.tokens_to_list(tokens)
        labels = self.labels_of(cond, allow_null=False)
        B = labels.shape[0]
        if drop is not None:
            drop = check_draw("drop", drop, (B,), "mask", labels.device)
        elif self.training and self.class_dropout > 0:
            drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.class_dropout
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        if drop_path is not None:
            drop_path = check_draw("drop_path", drop_path, (self.depth, 2, B), "mask", labels.device)
            off = [i for i, b in enumerate(self.blocks) if b.drop_path.p == 0.0 and not bool(drop_path[i].all())]
            if off:
                raise ValueError(f"drop_path drops rows of blocks {off}, which have no DropPath (rate 0)")
        with torch.no_grad():
            inputs = self.quantizer.teacher_forcing_inputs(ids)
        hidden, cond_emb = self.forward_hidden(inputs, labels, drop_path, generator)
        logits = self.head_logits(hidden[-1], cond_emb)
        target = torch.cat(ids, 1)
        ce = F.cross_entropy(logits.reshape(-1, self.vocab_size), target.reshape(-1), reduction="none")
        weight = torch.full((1, self.seq_len), 1.0 / self.seq_len, device=ce.device)
        return ce.view(B, -1).mul(weight).sum(-1).mean()

    # ---- step protocol (NextScaleModel; the loop is visar.samplers.next_scale) ------------------------------
    def start(self, cond: Condition | torch.Tensor | Sequence[int], guided: bool = False, *,
              use_cache: bool = True) -> NextScaleState:
        """State of a sample of class ids ``cond`` (``[B]``, validated) with scale 0's input pending.

        Args:
            guided: add the null-class rows (``R = 2B``) for classifier-free guidance.
            use_cache: preallocate a static KV cache over ``L`` positions; ``False`` is the naive mode that
                re-runs the whole prefix at every scale (same logits up to float error; tests, benchmarks).
        """
        labels = self.labels_of(cond, allow_null=False)
        all_labels = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if guided else labels
        cond_emb = self.class_emb(all_labels)  # [R, C]
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC  # [1, L, C]
        x = cond_emb[:, None] + self.pos_start + lvl_pos[:, :self.first_len]  # [R, pn0^2, C]
        rows = all_labels.shape[0]
        cache = None
        if use_cache:
            cache = CacheState(self.depth, rows, self.seq_len, self.num_heads, self.width // self.num_heads,
                               dtype=x.dtype, device=x.device)
        return NextScaleState(batch=labels.shape[0], guided=guided, labels=labels, cond_emb=cond_emb,
                              mods=self.condition_mods(cond_emb), lvl_pos=lvl_pos, x=x, cache=cache,
                              forward=self.forward_scale)

    def step(self, state: NextScaleState, k: int) -> torch.Tensor:
        """Run scale ``k``'s pending input: logits ``[R, pn_k^2, V]`` (float32) for every row."""
        if state.scale != k:
            raise ValueError(f"the state's pending input is for scale {state.scale}, not {k}; after step(state, "
                             f"{k - 1}) give scale {k}'s input with set_next_input(state, {k}, inputs)")
        state.scale = None
        if state.cache is None:
            state.prefix.append(state.x)
            return self.forward_prefix(torch.cat(state.prefix, 1), state.mods, state.cond_emb, state.pos)
        return state.forward(state.cache, state.x, state.mods, state.cond_emb, state.pos)

    def set_next_input(self, state: NextScaleState, k: int, inputs: torch.Tensor) -> None:
        """Make scale ``k``'s input pending: ``inputs [B, pn_k^2, Cvae]`` is ``area_down(f_hat, pn_k)`` of the
        codes so far (:meth:`MultiScaleResidualQuantizer.accumulate`), fed to both CFG halves."""
        if not 1 <= k < len(self.scales) or state.scale is not None:
            raise ValueError(f"set_next_input(state, {k}, ...): the next input goes to scale 1..{len(self.scales) - 1} "
                             f"after the previous scale has run (pending: scale {state.scale})")
        begin, end = self.begin_ends[k]
        if inputs.shape[1:] != (end - begin, self.token_dim):
            raise ValueError(f"scale {k} input must be [B, {end - begin}, {self.token_dim}], got {tuple(inputs.shape)}")
        x = self.word_embed(inputs.to(state.x.dtype)) + state.lvl_pos[:, begin:end]
        state.x = x.repeat(2, 1, 1) if state.guided else x
        state.scale, state.pos = k, begin

    def forward_scale(self, cache: CacheState, x: torch.Tensor, mods: list[torch.Tensor], cond_emb: torch.Tensor,
                      pos: int) -> torch.Tensor:
        """One cached scale: ``x [R, n, C]`` embedded tokens at positions ``pos:pos+n`` -> logits ``[R, n, V]``.

        Keys/values are written into the static cache; queries attend to everything up to ``pos+n``
        (all coarser scales and their own), so no mask is needed.
        """
        n = x.shape[1]
        for b, m, layer in zip(self.blocks, mods, cache.layers):
            x = b(x, m, cache=layer, cache_pos=pos, attend_len=pos + n)
        return self.head_logits(x, cond_emb)

    def forward_prefix(self, h: torch.Tensor, mods: list[torch.Tensor], cond_emb: torch.Tensor,
                       pos: int) -> torch.Tensor:
        """One naive scale: the whole embedded prefix ``h [R, pos+n, C]`` through every block (block-causal
        mask) -> logits ``[R, n, V]`` of positions ``pos:``."""
        end = h.shape[1]
        mask = self.attn_mask[:end, :end]
        for b, m in zip(self.blocks, mods):
            h = b(h, m, mask=mask)
        return self.head_logits(h[:, pos:], cond_emb)


def _var(depth: int, scales=SCHEDULE_256, shared_adaln: bool = False) -> dict:
    return dict(num_classes=1000, vocab_size=4096, token_dim=32, scales=list(scales), depth=depth,
                width=64 * depth, num_heads=depth, shared_adaln=shared_adaln, drop_path=0.1 * depth / 24)


_PAPER = "Tian et al. 2024, VAR, arXiv 2404.02905 (github.com/FoundationVision/VAR)"
# Evaluation protocol, VAR README ("Sampling & Zero-shot Inference" and the FID table) and paper Sec. 5:
# FID-50K on ImageNet 256x256 with cfg=1.5 (d16-d24; d30: 1.5 without rejection sampling), top_p=0.96, top_k=900,
# more_smooth=False; the README quotes "cfg=1.5, top_p=0.96, top_k=900, more_smooth=False" for FID evaluation and
# the 512 px d36 model uses the same sampler on the 512 schedule. VAR's cfg=c is cfg_scale=1+c in visar (guidance
# u + s (c - u), 1 = none; VAR ramps t = cfg k/(S-1) and mixes (1+t) c - t u), so official cfg 1.5 is cfg_scale 2.5.
_EVAL = dict(cfg_scale=2.5, top_k=900, top_p=0.96, more_smooth=False, num_images=50000, labels="50 per class",
             notes="official cfg 1.5 (VAR's cfg=c is cfg_scale=1+c in visar)",
             source="VAR README, 'Sampling & Zero-shot Inference': cfg=1.5, top_p=0.96, top_k=900, more_smooth=False")

PRESETS = {
    "var-d16": Preset("visar.generators.next_scale.var:NextScaleGenerator", _var(16), paper=_PAPER,
                      eval={**_EVAL, "image_size": 256, "reported_fid": 3.55}),
    "var-d20": Preset("visar.generators.next_scale.var:NextScaleGenerator", _var(20), paper=_PAPER,
                      eval={**_EVAL, "image_size": 256, "reported_fid": 2.95}),
    "var-d24": Preset("visar.generators.next_scale.var:NextScaleGenerator", _var(24), paper=_PAPER,
                      eval={**_EVAL, "image_size": 256, "reported_fid": 2.33}),
    "var-d30": Preset("visar.generators.next_scale.var:NextScaleGenerator", _var(30), paper=_PAPER,
                      eval={**_EVAL, "image_size": 256, "reported_fid": 1.97}),
    "var-d36": Preset("visar.generators.next_scale.var:NextScaleGenerator", _var(36, SCHEDULE_512, shared_adaln=True),
                      paper=_PAPER, eval={**_EVAL, "image_size": 512, "reported_fid": 2.63}),
    "var-tiny": Preset("visar.generators.next_scale.var:NextScaleGenerator",
                       dict(num_classes=10, vocab_size=64, token_dim=16, scales=[1, 2, 3, 4], depth=2, width=64,
                            num_heads=2), paper="visar test twin of VAR (64 px, 4 scales)",
                       eval={"cfg_scale": 2.5, "top_k": 0, "top_p": 1.0, "more_smooth": False, "image_size": 64,
                             "notes": "official cfg 1.5 (VAR's cfg=c is cfg_scale=1+c in visar)"}),
}
