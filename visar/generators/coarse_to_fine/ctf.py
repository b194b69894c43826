"""Coarse-to-fine (CTF) token prediction (Guo, Zhang & Shieh, 2025, arXiv:2503.16194).

A large VQ codebook is kept for reconstruction, but the autoregressive model only predicts a
**coarse label** per token: the k-means cluster of its codeword (codewords l2-normalised, as the VQ
uses them). An auxiliary bidirectional transformer then predicts every **fine label** (the codeword
id) in one pass, conditioned on the whole coarse sequence and the class:

    p(tokens | class) = prod_i p_AR(c_i | c_<i, class) * prod_i p_aux(t_i | c_1..N, class),  c_i = map(t_i)

Training sums the two cross-entropies (the auxiliary one with the true coarse labels); sampling
(:class:`~visar.samplers.coarse_to_fine.CoarseToFineSampler`, the default sampler) runs the coarse AR
model (``coarse``, a next-token model) with its KV cache (``temperature_coarse``, top-k/top-p, CFG), then
one auxiliary pass (:meth:`CoarseToFineGenerator.fine_scores`) and an independent draw per position
(``temperature_fine``). The fine draw is restricted to the
codewords of the position's cluster (``restrict_to_cluster``), which is what makes ``map(t_i) = c_i``
hold by construction.

The stage-1 model is :class:`~visar.generators.next_token.llamagen.NextTokenGenerator` with
``vocab_size = num_clusters``; the codeword -> cluster map and the hash of the codebook it was built on
are buffers of this module, so a saved model carries its vocabulary with it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from visar.generators.base import Condition, Generator
from visar.generators.coarse_to_fine.auxiliary import AuxiliaryModel
from visar.generators.coarse_to_fine.kmeans import build_cluster_map, codebook_hash
from visar.registry import Preset, register
from visar.utils.config import register_config
from visar.utils.validation import check_tokens


def tokenizer_codebook(tokenizer: Any) -> torch.Tensor:
    """The ``[V, D]`` codebook of a discrete tokenizer **as stored** (before l2 normalisation).

    Looks for LlamaGen's ``quantize.embedding.weight`` first (so hashing normalises exactly once),
    then a ``codebook`` tensor, property or method.
    """
    cb = None
    for path in ("quantize.embedding.weight", "quantizer.embedding.weight"):
        obj = tokenizer
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, torch.Tensor):
            cb = obj
            break
    if cb is None:
        cb = getattr(tokenizer, "codebook", None)
        if callable(cb):
            cb = cb()
    if not isinstance(cb, torch.Tensor) or cb.dim() != 2:
        raise TypeError(f"cannot find the codebook of {type(tokenizer).__name__}: CTF needs a discrete tokenizer "
                        "exposing `quantize.embedding.weight` or `codebook` ([vocab_size, dim])")
    return cb.detach()


@register("family", "ctf")
class CoarseToFineGenerator(Generator):
    """CTF: an AR model over k-means coarse labels plus a one-pass auxiliary model for the fine labels.

    Args:
        vocab_size: fine vocabulary ``V`` = the tokenizer's codebook size (16384 for LlamaGen's VQ).
        num_clusters: coarse vocabulary ``M <= V`` (512 in the paper).
        num_classes: class count (1000 for ImageNet); ``num_classes`` is the null class.
        grid_size: token grid side (16 for 256 px with a downsample-16 VQ).
        coarse: keyword arguments of the stage-1 :class:`NextTokenGenerator` (width, depth, heads, ...);
            ``vocab_size``, ``num_classes`` and the grid are filled in here.
        aux: keyword arguments of :class:`~visar.generators.coarse_to_fine.auxiliary.AuxiliaryModel`
            (``dim``, ``depth``, ``num_heads``, ``class_dropout_prob``, ...).
        restrict_to_cluster: score only the codewords of each position's cluster (loss and sampling).
        kmeans_seed, kmeans_iters: defaults of :meth:`fit_clusters`.
    """

    family = "ctf"
    token_kind = "discrete"
    default_sampler = "coarse_to_fine"

    @register_config
    def __init__(self, vocab_size: int = 16384, num_clusters: int = 512, num_classes: int = 1000,
                 grid_size: int = 16, coarse: dict | None = None, aux: dict | None = None,
                 restrict_to_cluster: bool = True, kmeans_seed: int = 0, kmeans_iters: int = 50):
        super().__init__()
        if not 1 <= num_clusters <= vocab_size:
            raise ValueError(f"num_clusters={num_clusters} must lie in [1, vocab_size={vocab_size}]: the coarse "
                             f"labels group codewords, so there cannot be more clusters than codewords")
        self.vocab_size, self.num_clusters, self.num_classes = vocab_size, num_clusters, num_classes
        self.grid_size, self.restrict_to_cluster = grid_size, restrict_to_cluster
        self.kmeans_seed, self.kmeans_iters = kmeans_seed, kmeans_iters
        self.coarse = self._build_coarse(dict(coarse or {}))
        self.aux = AuxiliaryModel(num_clusters=num_clusters, vocab_size=vocab_size, num_classes=num_classes,
                                  grid_size=grid_size, **dict(aux or {}))
        # -1 = not fitted yet; filled by fit_clusters / set_clusters and saved with the weights
        self.register_buffer("cluster_map", torch.full((vocab_size,), -1, dtype=torch.long))
        self.register_buffer("codebook_sha256", torch.zeros(32, dtype=torch.uint8))

    def _build_coarse(self, kwargs: dict) -> Generator:
        from visar.generators.next_token.llamagen import NextTokenGenerator

        for k in ("vocab_size", "num_classes", "grid_size", "caption_dim"):
            if k in kwargs:
                raise ValueError(f"do not set coarse[{k!r}]: the CTF model sets it (vocab_size = num_clusters, "
                                 "num_classes and grid_size from its own arguments, class-conditional only)")
        return NextTokenGenerator(vocab_size=self.num_clusters, num_classes=self.num_classes,
                                  grid_size=self.grid_size, **kwargs)

    # ---------------------------------------------------------------- clusters

    @property
    def has_clusters(self) -> bool:
        return bool((self.cluster_map >= 0).all())

    @property
    def codebook_hash(self) -> str:
        """sha256 (hex) of the normalised codebook the clusters were built on ('' before fitting)."""
        return bytes(self.codebook_sha256.cpu().tolist()).hex() if self.has_clusters else ""

    def fit_clusters(self, codebook_or_tokenizer: Any, seed: int | None = None,
                     iters: int | None = None) -> "CoarseToFineGenerator":
        """Build the codeword -> cluster map by k-means over the l2-normalised codebook and store it.

        Args:
            codebook_or_tokenizer: a ``[V, D]`` codebook or a discrete tokenizer holding one.
            seed, iters: k-means++ seed and Lloyd iterations (the constructor's defaults when ``None``).
        """
        cb = codebook_or_tokenizer if isinstance(codebook_or_tokenizer, torch.Tensor) else \
            tokenizer_codebook(codebook_or_tokenizer)
        if cb.shape[0] != self.vocab_size:
            raise ValueError(f"the codebook has {cb.shape[0]} codewords but this CTF model has vocab_size="
                             f"{self.vocab_size}; build the model with vocab_size={cb.shape[0]}")
        seed = self.kmeans_seed if seed is None else seed
        iters = self.kmeans_iters if iters is None else iters
        cmap, digest = build_cluster_map(cb, self.num_clusters, seed=seed, iters=iters)
        return self.set_clusters(cmap, digest)

    def set_clusters(self, cluster_map: torch.Tensor, digest: str) -> "CoarseToFineGenerator":
        """Install a precomputed map ``LongTensor [V]`` in ``[0, M)`` and the hex sha256 of its codebook."""
        cluster_map = torch.as_tensor(cluster_map)
        if cluster_map.shape != (self.vocab_size,) or cluster_map.is_floating_point():
            raise ValueError(f"cluster_map must be an integer tensor [{self.vocab_size}], got "
                             f"{cluster_map.dtype} {tuple(cluster_map.shape)}")
        check_tokens(cluster_map, self.num_clusters, name="cluster_map")
        if len(digest) != 64:
            raise ValueError("digest must be the 64-character hex sha256 from visar.generators.coarse_to_fine.kmeans.codebook_hash")
        self.cluster_map.copy_(cluster_map.to(self.cluster_map.device, torch.long))
        self.codebook_sha256.copy_(torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8))
        return self

    def require_clusters(self) -> None:
        """Raise a ``RuntimeError`` unless the codeword -> cluster map is fitted (needed to train and sample)."""
        if not self.has_clusters:
            raise RuntimeError("this CTF model has no coarse labels yet: call fit_clusters(tokenizer) (k-means over "
                               "its codebook) before training, or load a saved model that carries them")

    def check_tokenizer(self, tokenizer) -> None:
        """Kind, vocabulary size, and the codebook hash the clusters were built on must all match."""
        super().check_tokenizer(tokenizer)
        self.require_clusters()
        cb = tokenizer_codebook(tokenizer)
        if cb.shape[0] != self.vocab_size:
            raise ValueError(f"the tokenizer has {cb.shape[0]} codewords but this CTF model predicts "
                             f"{self.vocab_size}; pair it with the tokenizer it was trained with")
        digest = codebook_hash(cb)
        if digest != self.codebook_hash:
            raise ValueError(f"codebook mismatch: this CTF model's clusters were built on a codebook with sha256 "
                             f"{self.codebook_hash[:16]}..., the tokenizer's codebook hashes to {digest[:16]}...; "
                             "use the tokenizer the model was trained with (or refit the clusters and retrain)")

    def attach_tokenizer(self, tokenizer) -> "CoarseToFineGenerator":
        """Before training: fit the clusters on ``tokenizer``'s codebook if there are none yet, then
        :meth:`check_tokenizer`. Deterministic (seeded k-means on the CPU), so every DDP rank builds
        the same map. A model that already has clusters is only checked, never refitted."""
        if not self.has_clusters:
            self.fit_clusters(tokenizer)
        self.check_tokenizer(tokenizer)
        return self

    def coarse_labels(self, tokens: torch.Tensor) -> torch.Tensor:
        """Fine token ids (any shape) -> their coarse labels (same shape) in ``[0, num_clusters)``."""
        self.require_clusters()
        check_tokens(tokens, self.vocab_size)
        return self.cluster_map[tokens]

    # ---------------------------------------------------------------- stage 2

    def fine_logits(self, coarse: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None,
                    drop_prob: float = 0.0, restrict: bool | None = None) -> torch.Tensor:
        """Auxiliary logits ``[B, N|P, V]`` (float32) of the fine labels given coarse ``[B, N]`` and labels ``[B]``.

        With ``restrict`` (default: ``restrict_to_cluster``) codewords outside the position's cluster get
        ``-inf``. Fine labels are not an input: the logits depend on ``(coarse, labels)`` only.
        """
        logits = self.aux(coarse, labels, positions=positions, drop_prob=drop_prob)
        if self.restrict_to_cluster if restrict is None else restrict:
            c = coarse if positions is None else coarse[:, positions]
            logits = logits.masked_fill(self.cluster_map[None, None, :] != c[..., None], float("-inf"))
        return logits

    # ---------------------------------------------------------------- training

    def _flat_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() not in (2, 3):
            raise ValueError("tokens must be a LongTensor [B, h, w] (or [B, h*w]) of codeword ids")
        flat = tokens.reshape(tokens.shape[0], -1)
        if flat.shape[1] != self.grid_size ** 2:
            raise ValueError(f"this CTF model handles a {self.grid_size}x{self.grid_size} token grid, got "
                             f"{tuple(tokens.shape[1:])}; check the image size and the tokenizer's downsample")
        return flat

    def loss_dict(self, tokens: torch.Tensor, cond: Condition) -> dict[str, torch.Tensor]:
        """``{"loss": coarse + fine, "coarse": AR cross-entropy, "fine": auxiliary cross-entropy}`` (scalars).

        ``tokens``: ``LongTensor [B, h, w]`` codeword ids. The auxiliary model is fed the **true** coarse
        labels (teacher forcing), with class dropout ``aux.class_dropout_prob`` in training mode.
        """
        self.check_condition(cond)
        flat = self._flat_tokens(tokens)
        coarse = self.coarse_labels(flat)  # [B, N]
        coarse_loss = self.coarse.loss(coarse.reshape(tokens.shape), cond)
        drop = self.aux.class_dropout_prob if self.training else 0.0
        logits = self.aux(coarse, cond.labels, drop_prob=drop)  # [B, N, V]
        if self.restrict_to_cluster:
            # cross-entropy over the cluster's members only: gather them (padding at -inf) instead of
            # masking the full vocabulary, the same value without a [B, N, V] mask and masked copy
            table, rank = self.member_table(return_rank=True)
            idx = table[coarse]  # [B, N, K_max]
            logits = logits.gather(-1, idx.clamp_min(0)).masked_fill(idx < 0, float("-inf"))
            target = rank[flat]
        else:
            target = flat
        fine_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        return {"loss": coarse_loss + fine_loss, "coarse": coarse_loss, "fine": fine_loss}

    def loss(self, tokens: torch.Tensor, cond: Condition, return_dict: bool = False):
        """Sum of the coarse (AR) and fine (auxiliary) cross-entropies (scalar); with ``return_dict``
        the :meth:`loss_dict` (``loss``, ``coarse``, ``fine``), which the trainer logs entry by entry."""
        d = self.loss_dict(tokens, cond)
        return d if return_dict else d["loss"]

    # ---------------------------------------------------------------- sampling

    def member_table(self, return_rank: bool = False):
        """``LongTensor [num_clusters, K_max]``: each cluster's codeword ids (ascending), padded with -1.

        With ``return_rank`` also ``LongTensor [V]``: each codeword's column in its cluster's row.
        """
        self.require_clusters()
        cmap = self.cluster_map
        order = torch.argsort(cmap, stable=True)  # codewords grouped by cluster, ascending id inside
        counts = torch.bincount(cmap, minlength=self.num_clusters)
        starts = counts.cumsum(0) - counts
        rank_sorted = torch.arange(self.vocab_size, device=cmap.device) - starts[cmap[order]]
        table = torch.full((self.num_clusters, int(counts.max())), -1, dtype=torch.long, device=cmap.device)
        table[cmap[order], rank_sorted] = order
        if not return_rank:
            return table
        rank = torch.empty_like(rank_sorted)
        rank[order] = rank_sorted
        return table, rank

    def fine_scores(self, coarse: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw auxiliary scores of the fine-label candidates of ``coarse [B, N]`` given labels ``[B]`` (the
        null class ``num_classes`` allowed): ``(logits [B, N, K] float32, ids)``.

        With ``restrict_to_cluster`` the candidates are the codewords of each position's cluster:
        ``ids [B, N, K_max]`` (ascending, ``-1`` = padding; the logits there are finite filler that the
        sampler masks with ``-inf`` *after* guidance). Otherwise ``ids`` is ``None`` and column ``j`` is
        codeword ``j`` (``K = V``). One auxiliary pass, no drawing: sampling is
        :class:`~visar.samplers.coarse_to_fine.CoarseToFineSampler`'s job.
        """
        logits = self.aux(coarse, labels)  # [B, N, V]
        if not self.restrict_to_cluster:
            return logits, None
        ids = self.member_table()[coarse]  # [B, N, K_max] codeword ids, -1 = padding
        return logits.gather(-1, ids.clamp_min(0)), ids

    def check_condition(self, cond: Condition) -> None:
        """Class ids in ``[0, num_classes)`` (CTF models are class-conditional)."""
        if cond.labels is None:
            raise ValueError("CTF models are class-conditional: give class labels")
        super().check_condition(cond)


_C = "visar.generators.coarse_to_fine.ctf:CoarseToFineGenerator"
_PAPER = ("Guo, Zhang & Shieh 2025, Improving Autoregressive Image Generation through Coarse-to-Fine Token "
          "Prediction (arXiv 2503.16194): AR model on 512 k-means clusters of LlamaGen's 16384-codeword VQ, "
          "auxiliary model of ~343M parameters (LlamaGen-L shape)")
#: the auxiliary model: LlamaGen-L's width and depth (24 blocks, 1024 wide, 16 heads), bidirectional
_AUX_L = dict(dim=1024, depth=24, num_heads=16, class_dropout_prob=0.1)
_OFFICIAL = dict(vocab_size=16384, num_clusters=512, num_classes=1000, grid_size=16, aux=_AUX_L)


def _eval(size: str, llamagen_cfg: float) -> dict:
    """ImageNet 256x256 protocol of the CTF paper (LlamaGen's evaluation: 50k samples, ADM evaluator)."""
    return {
        "dataset": "imagenet-1k", "image_size": 256, "num_samples": 50000, "labels": "50 per class",
        "evaluator": "ADM TF evaluator (FID, IS, precision, recall) against VIRTUAL_imagenet256_labeled.npz",
        "tokenizer": "llamagen-vq-16 (vq_ds16_c2i.pt), clusters: k-means (512) over its l2-normalised codebook",
        "baseline": f"llamagen-gpt-{size} (same AR architecture over the 16384 codewords)",
        "cfg_scale": llamagen_cfg, "temperature_coarse": 1.0, "temperature_fine": 1.0, "top_k": 0, "top_p": 1.0,
        "settings_source": ("cfg_scale is LlamaGen's value for this size (its GETTING_STARTED protocol); the CTF "
                            "paper's own tuned cfg, temperatures and top-k could not be read offline (only the "
                            "abstract was available) - check arXiv 2503.16194 Sec. 4 before reporting numbers"),
        "fid_reported": None, "weights": "none released (code announced at github.com/GzyAftermath/CTF)",
    }


PRESETS = {
    "ctf-llamagen-b": Preset(_C, dict(_OFFICIAL, coarse=dict(dim=768, depth=12, num_heads=12)), "generator",
                             _PAPER + "; AR stage = LlamaGen GPT-B (12 x 768)", _eval("b", 2.0)),
    "ctf-llamagen-l": Preset(_C, dict(_OFFICIAL, coarse=dict(dim=1024, depth=24, num_heads=16)), "generator",
                             _PAPER + "; AR stage = LlamaGen GPT-L (24 x 1024)", _eval("l", 2.0)),
    "ctf-llamagen-xl": Preset(_C, dict(_OFFICIAL, coarse=dict(dim=1280, depth=36, num_heads=20)), "generator",
                              _PAPER + "; AR stage = LlamaGen GPT-XL (36 x 1280)", _eval("xl", 1.75)),
    "ctf-tiny": Preset(_C, dict(vocab_size=256, num_clusters=16, num_classes=10, grid_size=4,
                                coarse=dict(dim=64, depth=2, num_heads=2),
                                aux=dict(dim=64, depth=2, num_heads=2, ffn_hidden=128)), "generator",
                       "visar test twin of CTF: pairs with the LlamaGen tiny VQ (256 codewords, 4x4 tokens)", {}),
}
