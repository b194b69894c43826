"""CTF generator: cluster map stored with the model, codebook pairing, loss, sampling, save/load, pipeline."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visar.generators.base import Condition
from visar.generators.coarse_to_fine.ctf import CoarseToFineGenerator, tokenizer_codebook
from visar.generators.coarse_to_fine.kmeans import codebook_hash
from visar.samplers.coarse_to_fine import sample_fine
from visar.tokenizers.base import Tokenizer

V, M, K, G = 64, 8, 4, 4  # codewords, clusters, classes, grid side

needs_ar_sampler = pytest.mark.skipif(importlib.util.find_spec("visar.samplers.autoregressive") is None,
                                      reason="the coarse stage samples with visar.samplers.autoregressive, "
                                             "which is not in this checkout")


class ToyVQ(Tokenizer):
    """A discrete tokenizer with a LlamaGen-style ``quantize.embedding`` codebook (no conv nets)."""

    kind, downsample = "discrete", 4

    def __init__(self, vocab: int = V, dim: int = 8, seed: int = 0):
        super().__init__()
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(vocab, dim)
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            self.quantize.embedding.weight.copy_(torch.randn(vocab, dim, generator=g) * 3)

    @property
    def vocab_size(self) -> int:
        return self.quantize.embedding.num_embeddings

    def encode(self, images):
        z = F.avg_pool2d(images, self.downsample).permute(0, 2, 3, 1)  # [B, h, w, 3]
        e = F.normalize(self.quantize.embedding.weight, dim=-1)[:, :3]
        return torch.cdist(z.reshape(-1, 3), e).argmin(-1).reshape(z.shape[:3])

    def decode(self, ids):
        e = F.normalize(self.quantize.embedding.weight, dim=-1)[:, :3]
        x = F.embedding(ids, e).permute(0, 3, 1, 2)
        return F.interpolate(x, scale_factor=self.downsample).tanh()


def make(seed: int = 0, fit: bool = True, **kw) -> CoarseToFineGenerator:
    torch.manual_seed(seed)
    g = CoarseToFineGenerator(vocab_size=V, num_clusters=M, num_classes=K, grid_size=G,
                              coarse=dict(dim=32, depth=1, num_heads=2),
                              aux=dict(dim=32, depth=2, num_heads=2, ffn_hidden=64), **kw)
    for p in g.parameters():  # zero-initialised heads would make every test trivial
        if p.dim() > 1:
            nn.init.normal_(p, std=0.3)
    if fit:
        g.fit_clusters(ToyVQ(), seed=0, iters=10)
    return g.eval()


def _tokens(b=3, seed=0):
    return torch.randint(V, (b, G, G), generator=torch.Generator().manual_seed(seed))


def test_clusters_are_buffers_and_the_hash_is_the_tokenizers():
    g, tok = make(), ToyVQ()
    assert g.has_clusters and (g.cluster_map >= 0).all()
    assert (torch.bincount(g.cluster_map, minlength=M) > 0).all()
    assert {"cluster_map", "codebook_sha256"} <= set(g.state_dict())
    assert g.codebook_hash == codebook_hash(tok.quantize.embedding.weight)
    g.check_tokenizer(tok)  # same codebook: accepted


def test_codebook_mismatch_is_a_clear_error():
    g = make()
    with pytest.raises(ValueError, match="codebook mismatch"):
        g.check_tokenizer(ToyVQ(seed=1))
    with pytest.raises(ValueError, match="codewords"):
        g.check_tokenizer(ToyVQ(vocab=2 * V))
    with pytest.raises(ValueError, match="codebook mismatch"):
        from visar.pipeline import Pipeline
        Pipeline(ToyVQ(seed=1), g)


def test_unfitted_model_and_too_many_clusters_are_clear_errors():
    g = make(fit=False)
    with pytest.raises(RuntimeError, match="fit_clusters"):
        g.check_tokenizer(ToyVQ())
    with pytest.raises(RuntimeError, match="fit_clusters"):
        g.loss(_tokens(), Condition.of([0, 1, 2]))
    with pytest.raises(ValueError, match="cannot be more clusters than codewords"):
        CoarseToFineGenerator(vocab_size=V, num_clusters=V + 1, num_classes=K, grid_size=G,
                              coarse=dict(dim=32, depth=1, num_heads=2), aux=dict(dim=32, depth=1, num_heads=2))
    with pytest.raises(ValueError, match="vocab_size"):
        g.fit_clusters(torch.randn(V - 1, 8))


def test_fine_labels_are_not_inputs_of_the_auxiliary_model():
    g, cond = make(), Condition.of([0, 1, 3])
    tokens = _tokens()
    # swap every token for another codeword of the same cluster: same coarse labels, other fine labels
    other = tokens.clone()
    for v in tokens.unique().tolist():
        members = (g.cluster_map == g.cluster_map[v]).nonzero()[:, 0]
        other[tokens == v] = members[(members != v).nonzero()[0, 0]] if members.numel() > 1 else v
    assert (other != tokens).any()
    seen = []
    hook = g.aux.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    try:
        out_a, out_b = g.loss_dict(tokens, cond), g.loss_dict(other, cond)
    finally:
        hook.remove()
    torch.testing.assert_close(out_a["coarse"], out_b["coarse"], rtol=0, atol=0)
    assert torch.equal(seen[0], seen[1]), "the auxiliary logits must depend on coarse labels and class only"
    assert not torch.equal(out_a["fine"], out_b["fine"])  # the targets differ, so the fine loss does


def test_fine_logits_are_restricted_to_the_cluster_and_loss_adds_up():
    g, cond, tokens = make(), Condition.of([0, 1, 3]), _tokens()
    coarse = g.coarse_labels(tokens.reshape(3, -1))
    logits = g.fine_logits(coarse, cond.labels)  # [B, N, V]
    inside = g.cluster_map[None, None, :] == coarse[..., None]
    assert torch.isfinite(logits[inside]).all() and torch.isneginf(logits[~inside]).all()
    d = g.loss_dict(tokens, cond)
    torch.testing.assert_close(d["loss"], d["coarse"] + d["fine"])
    torch.testing.assert_close(g.loss(tokens, cond), d["loss"])
    want = F.cross_entropy(logits.reshape(-1, V), tokens.reshape(-1))
    torch.testing.assert_close(d["fine"], want)
    # the unrestricted variant scores all codewords, so its loss is larger for the same logits
    free = make(restrict_to_cluster=False)
    free.load_state_dict(g.state_dict())
    assert free.loss_dict(tokens, cond)["fine"] > d["fine"]


def test_fine_stage_greedy_and_cfg():
    g, labels = make(), torch.tensor([0, 2])
    coarse = torch.randint(M, (2, G * G), generator=torch.Generator().manual_seed(3))
    greedy = sample_fine(g, coarse, labels, top_k=1)
    assert torch.equal(greedy, g.fine_logits(coarse, labels).argmax(-1))
    assert torch.equal(g.cluster_map[greedy], coarse)
    cfg = sample_fine(g, coarse, labels, top_k=1, cfg_scale=3.0)
    cond = g.fine_logits(coarse, labels, restrict=False)
    null = g.fine_logits(coarse, torch.full_like(labels, K), restrict=False)
    mixed = (null + 3.0 * (cond - null)).masked_fill(g.cluster_map[None, None] != coarse[..., None], float("-inf"))
    assert torch.equal(cfg, mixed.argmax(-1))
    draws = sample_fine(g, coarse, labels, torch.Generator().manual_seed(0), temperature=2.0)
    assert torch.equal(g.cluster_map[draws], coarse)


def test_sample_rejects_a_single_temperature_and_bad_values():
    g, cond = make(), Condition.of([0])
    with pytest.raises(TypeError, match="temperature_coarse"):
        g.sample(cond, temperature=0.5)
    with pytest.raises(ValueError, match="temperature"):
        g.sample(cond, temperature_fine=0.0)
    with pytest.raises(ValueError, match="class ids"):
        g.sample(Condition.of([K]))


@needs_ar_sampler
def test_sampling_shapes_determinism_and_cluster_consistency():
    g, cond = make(), Condition.of([0, 1, 3])
    kw = dict(cfg_scale=2.0, temperature_coarse=1.0, temperature_fine=0.9, top_k=5)
    a = g.sample(cond, generator=torch.Generator().manual_seed(0), **kw)
    b = g.sample(cond, generator=torch.Generator().manual_seed(0), **kw)
    c = g.sample(cond, generator=torch.Generator().manual_seed(1), **kw)
    assert a.shape == (3, G, G) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < V
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the fine stage only picks codewords of the coarse labels the AR stage drew (same generator stream)
    coarse = g.coarse.sample(cond, generator=torch.Generator().manual_seed(0), cfg_scale=2.0, temperature=1.0, top_k=5)
    assert torch.equal(g.cluster_map[a], coarse.reshape(3, G, G))


def test_save_load_round_trip(tmp_path):
    g, cond, tokens = make(), Condition.of([0, 1, 3]), _tokens()
    g.save_pretrained(tmp_path, "generator")
    h = CoarseToFineGenerator.from_pretrained(tmp_path, "generator").eval()
    assert torch.equal(h.cluster_map, g.cluster_map) and h.codebook_hash == g.codebook_hash
    h.check_tokenizer(ToyVQ())
    with pytest.raises(ValueError, match="codebook mismatch"):
        h.check_tokenizer(ToyVQ(seed=2))
    torch.testing.assert_close(h.loss(tokens, cond), g.loss(tokens, cond), rtol=0, atol=0)
    if importlib.util.find_spec("visar.samplers.autoregressive") is not None:
        s1 = g.sample(cond, generator=torch.Generator().manual_seed(5), cfg_scale=1.5)
        s2 = h.sample(cond, generator=torch.Generator().manual_seed(5), cfg_scale=1.5)
        assert torch.equal(s1, s2)


@needs_ar_sampler
def test_pipeline_runs_unchanged():
    from visar.pipeline import Pipeline

    pipe = Pipeline(ToyVQ(), make())
    images = pipe([0, 3], seed=0, cfg_scale=2.0, temperature_fine=0.5)
    assert len(images) == 2 and images[0].size == (G * 4, G * 4)
    again = pipe.generate([0, 3], seed=0, cfg_scale=2.0, temperature_fine=0.5)
    assert torch.equal(again, pipe.generate([0, 3], seed=0, cfg_scale=2.0, temperature_fine=0.5))


@pytest.mark.skipif(importlib.util.find_spec("visar.tokenizers.vq") is None, reason="visar.tokenizers.vq absent")
def test_pairs_with_the_llamagen_vq_tokenizer(tmp_path):
    from visar import zoo
    from visar.pipeline import Pipeline

    torch.manual_seed(0)
    vq = zoo.create("llamagen-vq-tiny")
    g = zoo.create("ctf-tiny").fit_clusters(vq, seed=0, iters=5)
    assert torch.equal(tokenizer_codebook(vq), vq.quantize.embedding.weight.detach())
    g.check_tokenizer(vq)
    if importlib.util.find_spec("visar.samplers.autoregressive") is not None:
        pipe = Pipeline(vq, g)
        pipe.save_pretrained(tmp_path)
        loaded = Pipeline.from_pretrained(tmp_path)  # re-checks the codebook hash on load
        assert isinstance(loaded.generator, CoarseToFineGenerator)
        a = pipe.generate([1, 2], seed=3, cfg_scale=2.0)
        assert a.shape == (2, 3, 64, 64)
        assert torch.equal(a, loaded.generate([1, 2], seed=3, cfg_scale=2.0))
    with torch.no_grad():
        vq.quantize.embedding.weight[0] += 1.0
    with pytest.raises(ValueError, match="codebook mismatch"):
        g.check_tokenizer(vq)


def test_member_table_and_fine_draw_distribution():
    g = make()
    table = g.member_table()  # [M, K_max]
    ids = table[table >= 0]
    assert torch.equal(ids.sort().values, torch.arange(V))  # every codeword exactly once
    for c in range(M):
        row = table[c][table[c] >= 0]
        assert torch.equal(row, (g.cluster_map == c).nonzero()[:, 0])
    table2, rank = g.member_table(return_rank=True)
    assert torch.equal(table2, table) and torch.equal(table[g.cluster_map, rank], torch.arange(V))
    # the gathered draw follows the masked softmax: 800 identical rows, empirical vs exact frequencies
    coarse = torch.randint(M, (1, G * G), generator=torch.Generator().manual_seed(4)).expand(800, -1)
    labels = torch.full((800,), 2)
    draws = sample_fine(g, coarse, labels, torch.Generator().manual_seed(0), temperature=1.5)
    probs = (g.fine_logits(coarse[:1], labels[:1]) / 1.5).softmax(-1)[0]  # [N, V]
    freq = F.one_hot(draws, V).float().mean(0)  # [N, V]
    assert (freq - probs).abs().max() < 0.07


def test_attach_tokenizer_fits_once_then_only_checks():
    g = make(fit=False)
    g.attach_tokenizer(ToyVQ())
    assert g.has_clusters and g.codebook_hash == codebook_hash(ToyVQ().quantize.embedding.weight)
    before = g.cluster_map.clone()
    g.attach_tokenizer(ToyVQ())  # already fitted: unchanged
    assert torch.equal(g.cluster_map, before)
    with pytest.raises(ValueError, match="codebook mismatch"):
        g.attach_tokenizer(ToyVQ(seed=3))  # never silently refitted
    d = g.loss(_tokens(), Condition.of([0, 1, 2]), return_dict=True)
    assert set(d) == {"loss", "coarse", "fine"}


def test_trains_through_the_generator_task():
    from visar.train.tasks import make_task

    tok = ToyVQ()
    g = make(fit=False).attach_tokenizer(tok)
    task = make_task("generator", g, tok)
    out = task({"tokens": _tokens(), "label": torch.tensor([0, 1, 2])})
    assert out["loss"].dim() == 0 and out["loss"].requires_grad
