"""VAR generator / quantizer / converter unit tests on tiny random models (CPU, float32)."""
from __future__ import annotations

import json

import pytest
import torch

from visar import zoo
from visar.convert.common import CheckpointError
from visar.convert.var import generator_to_official, load_generator
from visar.generators.next_scale.var import NextScaleGenerator, block_causal_mask
from visar.samplers.next_scale import edit, sample
from visar.tokenizers.msvq_quantizer import MultiScaleResidualQuantizer, phi_index_table

SCALES = [1, 2, 3, 4]


def _randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Non-trivial weights (the VAR init makes the residual branches ~1e-5, hiding bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _pair(shared_adaln: bool = False, l2: bool = True, scales=SCALES, seed: int = 0):
    gen = NextScaleGenerator(num_classes=10, vocab_size=64, token_dim=16, scales=scales, depth=2, width=64,
                             num_heads=2, shared_adaln=shared_adaln, attn_l2_norm=l2).eval()
    q = MultiScaleResidualQuantizer(64, 16, scales)
    _randomize(gen, seed)
    _randomize(q, seed + 1)
    gen.bind_tokenizer(q)
    return gen, q


def _random_tokens(scales, batch=2, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, s, s), generator=g) for s in scales]


def test_var_phi_index_reproduces_official_float_ties():
    assert phi_index_table(10) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert phi_index_table(4) == [0, 1, 2, 3]
    assert phi_index_table(1) == [0]


def test_var_presets_match_official_manifest(fixtures):
    from visar.convert.var import tokenizer_to_official

    manifest = json.loads((fixtures("var") / "manifest_official.json").read_text())
    for depth in (16, 20, 24, 30, 36):
        with torch.device("meta"):
            gen = zoo.create(f"var-d{depth}")
        ours = {k: tuple(v.shape) for k, v in generator_to_official(gen).items()}
        entry = manifest[f"var_d{depth}.pth"]
        assert ours == {t["name"]: tuple(t["shape"]) for t in entry["tensors"]}, depth
        assert sum(p.numel() for p in gen.parameters()) == entry["num_parameters"]
        assert gen.scales == entry["constructor"]["patch_nums"]
        assert gen.shared_adaln == entry["constructor"]["shared_aln"]
    with torch.device("meta"):
        tok = zoo.create("var-vqvae")
    ours = {k: tuple(v.shape) for k, v in tokenizer_to_official(tok).items()}
    entry = manifest["vae_ch160v4096z32.pth"]
    want = {t["name"]: tuple(t["shape"]) for t in entry["tensors"] if t["name"] != "quantize.ema_vocab_hit_SV"}
    assert ours == want
    assert sum(p.numel() for p in tok.parameters()) == entry["num_parameters"]


def test_var_presets_record_eval_protocol():
    for name in ("var-d16", "var-d20", "var-d24", "var-d30", "var-d36"):
        ev = zoo.get_preset(name).eval
        # visar's cfg_scale is 1 + VAR's cfg
        assert (ev["cfg_scale"] - 1, ev["top_k"], ev["top_p"], ev["more_smooth"]) == (1.5, 900, 0.96, False)
        assert ev["image_size"] == (512 if name == "var-d36" else 256)
        assert "README" in ev["source"]
    assert "var-tiny" in zoo.list_models("var-*")


def test_var_block_causal_mask():
    m = block_causal_mask([1, 2])
    assert m.shape == (5, 5)
    assert m[0].tolist() == [True, False, False, False, False]
    assert m[1].tolist() == [True] * 5 and m[4].tolist() == [True] * 5


@pytest.mark.parametrize("shared", [False, True])
def test_var_cache_matches_no_cache_and_teacher_forcing(shared):
    gen, q = _pair(shared_adaln=shared)
    labels = torch.tensor([3, 7])
    rec_c, rec_n = {}, {}
    a = sample(gen, labels, generator=torch.Generator().manual_seed(1), cfg_scale=3.0, top_k=20, top_p=0.9,
               record=rec_c)
    b = sample(gen, labels, generator=torch.Generator().manual_seed(1), cfg_scale=3.0, top_k=20, top_p=0.9,
               record=rec_n, use_cache=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for x, y in zip(rec_c["raw_logits"], rec_n["raw_logits"]):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
    # the cached step logits equal the teacher-forced logits of the drawn tokens (both halves)
    with torch.no_grad():
        tf_c = gen(a, labels)
        tf_u = gen(a, torch.full_like(labels, 10))
    torch.testing.assert_close(torch.cat(rec_c["raw_logits"], 1), torch.cat([tf_c, tf_u]), atol=1e-4, rtol=1e-4)


def test_var_sampler_seeded_and_no_cfg_shortcut():
    gen, _ = _pair()
    a = gen.sample(torch.tensor([1, 2]), generator=torch.Generator().manual_seed(3), cfg_scale=1.0)
    b = gen.sample(torch.tensor([1, 2]), generator=torch.Generator().manual_seed(3), cfg_scale=1.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert [t.shape for t in a] == [(2, s, s) for s in SCALES]
    c = gen.sample(None, generator=torch.Generator().manual_seed(3), batch=3, top_k=1)
    assert c[0].shape[0] == 3


def test_var_sampler_rejects_bad_inputs():
    gen, _ = _pair()
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        gen.sample(torch.tensor([10]))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        gen.sample(torch.tensor([-1]))
    with pytest.raises(ValueError, match="batch"):
        gen.sample(None)
    with pytest.raises(ValueError, match="top_p"):
        gen.sample(torch.tensor([1]), top_p=1.5)
    with pytest.raises(ValueError, match="cfg_scale"):
        gen.sample(torch.tensor([1]), cfg_scale=-1)
    with pytest.raises(ValueError, match="class ids"):
        gen(torch.zeros(1, 29, 16), torch.tensor([11]))
    with pytest.raises(ValueError, match="teacher-forcing inputs"):
        gen(torch.zeros(1, 28, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="list of 4"):
        gen.loss(_random_tokens(SCALES)[:3], torch.tensor([1, 2]))
    unbound = NextScaleGenerator(num_classes=10, vocab_size=64, token_dim=16, scales=SCALES, depth=1, width=32,
                                 num_heads=2)
    with pytest.raises(RuntimeError, match="bind_tokenizer"):
        unbound.sample(torch.tensor([1]))
    with pytest.raises(ValueError, match="schedule"):
        unbound.bind_tokenizer(MultiScaleResidualQuantizer(64, 16, [1, 2, 4]))


def test_var_editing_keeps_given_tokens_and_checks_mask():
    gen, q = _pair()
    src = _random_tokens(SCALES, batch=2, seed=5)
    labels = torch.tensor([2, 2])
    keep_all = edit(gen, src, torch.ones(4, 4), labels, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(keep_all, src))
    mask = torch.ones(4, 4)
    mask[1:3, 1:3] = 0  # in-paint the centre
    out = edit(gen, src, mask, labels, generator=torch.Generator().manual_seed(0), cfg_scale=2.0, top_k=0)
    assert torch.equal(out[-1][:, mask.bool()], src[-1][:, mask.bool()])
    assert torch.equal(out[0], src[0])  # the first scales (<= 3 tokens) are always kept
    with pytest.raises(ValueError, match=r"edit_mask must be \[4, 4\]"):
        edit(gen, src, torch.ones(64, 64), labels)
    with pytest.raises(ValueError, match="list of 4"):
        edit(gen, src[:2], torch.ones(4, 4), labels)
    one_class = edit(gen, src, mask, 7, generator=torch.Generator().manual_seed(0))  # int class: every image
    assert one_class[-1].shape == (2, 4, 4)
    with pytest.raises(ValueError, match="2 images for 1 labels"):
        edit(gen, src, torch.ones(4, 4), torch.tensor([1]))


def test_var_loss_trains():
    gen, q = _pair()
    gen.reset_parameters()
    gen.train()
    tokens = _random_tokens(SCALES, batch=4, seed=1)
    labels = torch.tensor([0, 1, 2, 3])
    opt = torch.optim.AdamW(gen.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        loss = gen.loss(tokens, labels, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first - 0.5
    with pytest.raises(ValueError, match="class ids"):
        gen.loss(tokens, torch.tensor([0, 1, 2, 10]))  # the null class is not a training label


def test_var_quantizer_rejects_wrong_latent_and_tokens():
    q = MultiScaleResidualQuantizer(64, 16, SCALES)
    with pytest.raises(ValueError, match="ends at 4x4"):
        q.quantize(torch.zeros(1, 16, 5, 5))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        q.tokens_to_fhat([torch.full((1, s, s), 64) for s in SCALES])
    with pytest.raises(ValueError, match="increasing"):
        MultiScaleResidualQuantizer(64, 16, [1, 3, 2])


def test_var_quantizer_training_gradients():
    q = MultiScaleResidualQuantizer(64, 16, SCALES)
    f = torch.randn(2, 16, 4, 4, requires_grad=True)
    f_st, loss, ids = q(f)
    (f_st.square().mean() + loss).backward()
    assert f.grad is not None and q.embedding.weight.grad.abs().sum() > 0
    assert q.quant_resi.qresi_ls[0].weight.grad.abs().sum() > 0
    ids2, fh = q.quantize(f.detach())
    assert all(torch.equal(a, b) for a, b in zip(ids, ids2))
    torch.testing.assert_close(f_st, fh[-1])


# ---- converter --------------------------------------------------------------------------------------------
def _logits(gen, labels=torch.tensor([1, 2])):
    with torch.no_grad():
        return gen(torch.randn(2, 29, 16, generator=torch.Generator().manual_seed(0)), labels)


@pytest.mark.parametrize("shared,l2", [(False, True), (True, True), (False, False)])
def test_var_official_roundtrip_detects_variant(tmp_path, shared, l2):
    gen, _ = _pair(shared_adaln=shared, l2=l2)
    state = {k: v.half() if v.is_floating_point() else v for k, v in generator_to_official(gen).items()}
    torch.save(state, tmp_path / "var.pth")
    back = load_generator(tmp_path / "var.pth", scales=SCALES)
    assert back.shared_adaln == shared and back.config["attn_l2_norm"] == l2 and back.config["num_heads"] == 2
    assert back.pos_1LC.dtype == torch.float32
    torch.testing.assert_close(_logits(back), _logits(gen), atol=0.05, rtol=0.05)  # float16 storage
    exact = load_generator(_save(tmp_path / "f32.pth", generator_to_official(gen)))  # schedule read from lvl_1L
    torch.testing.assert_close(_logits(exact), _logits(gen), atol=0, rtol=0)


def _save(path, obj):
    torch.save(obj, path)
    return path


def test_var_l2_and_old_checkpoints_explain_themselves(tmp_path):
    new, _ = _pair(l2=True)
    old, _ = _pair(l2=False)
    p_new = _save(tmp_path / "new.pth", generator_to_official(new))
    p_old = _save(tmp_path / "old.pth", generator_to_official(old))
    with pytest.raises(CheckpointError, match="before the l2-norm attention release"):
        load_generator(p_old, attn_l2_norm=True)
    with pytest.raises(CheckpointError, match="with l2-normalised attention"):
        load_generator(p_new, attn_l2_norm=False)


def test_var_trainer_checkpoint_and_buffer_checks(tmp_path):
    gen, _ = _pair()
    state = generator_to_official(gen)
    ckpt = {"epoch": 3, "iter": 10, "args": {"depth": 2, "pn": "1_2_3_4"},
            "trainer": {"var_wo_ddp": state, "var_opt": {"optimizer": {"state": {}, "param_groups": []}}}}
    back = load_generator(_save(tmp_path / "ar-ckpt-last.pth", ckpt))
    torch.testing.assert_close(_logits(back), _logits(gen), atol=0, rtol=0)
    bad = dict(state, lvl_1L=torch.zeros_like(state["lvl_1L"]))
    with pytest.raises(CheckpointError, match="lvl_1L"):
        load_generator(_save(tmp_path / "bad.pth", bad), scales=SCALES)
    bad = dict(state, attn_bias_for_masking=torch.zeros_like(state["attn_bias_for_masking"]))
    with pytest.raises(CheckpointError, match="attn_bias_for_masking"):
        load_generator(_save(tmp_path / "bad2.pth", bad))
    with pytest.raises(CheckpointError, match="schedule"):
        load_generator(_save(tmp_path / "s.pth", {k: v for k, v in state.items() if k != "lvl_1L"}), scales=[1, 2, 5])


def test_var_converter_rejects_truncated_and_foreign_files(tmp_path):
    gen, _ = _pair()
    p = _save(tmp_path / "var.pth", generator_to_official(gen))
    data = p.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_generator(tmp_path / "trunc.pth")
    foreign = {"tok_embeddings.weight": torch.zeros(4, 4), "layers.0.attention.wqkv.weight": torch.zeros(12, 4)}
    with pytest.raises(CheckpointError, match="not a VAR checkpoint"):
        load_generator(_save(tmp_path / "llamagen.pth", foreign))
    state = generator_to_official(gen)
    state.pop("head.bias")
    with pytest.raises(CheckpointError, match="missing"):
        load_generator(_save(tmp_path / "nohead.pth", state))


def test_var_save_load_roundtrip(tmp_path):
    gen, q = _pair(shared_adaln=True)
    gen.save_pretrained(tmp_path, "generator")
    back = NextScaleGenerator.from_pretrained(tmp_path, "generator")
    back.bind_tokenizer(q)
    torch.testing.assert_close(_logits(back), _logits(gen), atol=0, rtol=0)
    a = gen.sample(torch.tensor([4]), generator=torch.Generator().manual_seed(2), top_k=8)
    b = back.sample(torch.tensor([4]), generator=torch.Generator().manual_seed(2), top_k=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.slow
def test_var_compiled_step_matches_eager():
    """torch.compile of the cached per-scale step (slow: one cold compile per scale, ~20 s each on CPU)."""
    gen, _ = _pair(scales=[1, 2])
    a = sample(gen, torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0), top_k=8)
    b = sample(gen, torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0), top_k=8, compile=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_var_bfloat16_generator_runs_with_float32_quantizer():
    gen, q = _pair()
    gen.to(torch.bfloat16)
    toks = gen.sample(torch.tensor([1]), generator=torch.Generator().manual_seed(0), top_k=4, more_smooth=True)
    assert [t.shape for t in toks] == [(1, s, s) for s in SCALES]
    assert gen(toks, torch.tensor([1])).dtype == torch.float32


def test_var_accepts_concatenated_ids():
    gen, q = _pair()
    toks = _random_tokens(SCALES, batch=2, seed=3)
    flat = torch.cat([t.flatten(1) for t in toks], 1)  # [B, L], as token caches store them
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(gen(flat, labels), gen(toks, labels), atol=0, rtol=0)
    assert torch.isfinite(gen.loss(flat, labels))


def test_var_loader_reads_visar_safetensors(tmp_path):
    gen, _ = _pair(shared_adaln=True)
    gen.save_pretrained(tmp_path, "generator")
    back = load_generator(tmp_path / "generator.safetensors", scales=SCALES)
    assert back.shared_adaln
    torch.testing.assert_close(_logits(back), _logits(gen), atol=0, rtol=0)


def test_var_quantizer_dead_code_restart():
    q = MultiScaleResidualQuantizer(64, 16, SCALES, restart_unused=2).train()
    with torch.no_grad():
        q.embedding.weight.mul_(100)  # far from every latent: almost all codes are dead
    f = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    before = q.embedding.weight.clone()
    q(f)
    assert torch.equal(q.embedding.weight, before)  # age 1 < 2: nothing yet
    q(f)
    changed = (q.embedding.weight != before).any(1)
    assert changed.sum() > 32 and (q.code_age[changed] == 0).all()
    q.eval()
    q(f)  # no restarts outside training
    assert "code_age" not in q.state_dict()


def _restart_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different candidates on each rank
    q = MultiScaleResidualQuantizer(64, 16, SCALES, restart_unused=1).train()
    with torch.no_grad():
        q.embedding.weight.copy_(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)) * 100)
    f = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(10 + rank))  # different data per rank
    q(f)
    torch.save({"w": q.embedding.weight.detach().clone(), "age": q.code_age.clone()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_var_dead_code_restart_keeps_ddp_replicas_identical(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_restart_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["w"], r1["w"]) and torch.equal(r0["age"], r1["age"])
    assert (r0["w"].abs() < 50).any(1).sum() > 32  # restarted rows hold residual vectors, not the x100 init
