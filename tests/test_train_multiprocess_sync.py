"""Two training processes (gloo on CPU) stay one model.

Tokenizers with rank-local training state -- the VQ's unused-step counters and dead-code restarts, the
multi-scale quantizer's code ages and restarts, the KL-VAE's running latent std -- are trained by two
processes in which restarts really happen; both ranks' full state (weights, every buffer, the trainer's
EMA, the optimizer state) must be equal bit for bit. A 2-process run killed after a checkpoint and
resumed must end bit-equal to the uninterrupted one.

The workers run in processes forked by ``accelerate.notebook_launcher``; each rank writes what it holds
at every checkpoint to ``rank{r}_step{s}.pt`` beside the checkpoints.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visar.train import checkpoint as ckpt
from visar.train.config import load_config
from visar.utils import dist as vdist
from visar.utils.config import Configurable, register_config
from visar.utils.io import load_safetensors


class RankLocalStat(Configurable):
    """A planted bug: a buffer updated from this rank's batch only (the trainer's replica check must name it)."""

    family = "test"

    @register_config
    def __init__(self):
        super().__init__()
        self.lin = nn.Conv2d(3, 3, 1)
        self.register_buffer("batch_sum", torch.zeros((), dtype=torch.float64))

    def training_loss(self, images):
        self.batch_sum.add_(images.detach().double().sum())
        return {"loss": F.mse_loss(self.lin(images), images)}


MODELS = {
    # 64 codes of dim 4 for 2 x 4 images of 8x8 latents: most codes go unused, checked every step
    "vq": {"cls": "visar.tokenizers.vq:VQTokenizer",
           "kwargs": {"codebook_size": 64, "codebook_embed_dim": 4, "ch": 32, "ch_mult": [1, 1],
                      "num_res_blocks": 1, "z_channels": 32, "dead_code_steps": 2}},
    "msvq": {"cls": "visar.tokenizers.msvq:MultiScaleVQTokenizer",
             "kwargs": {"vocab_size": 64, "token_dim": 4, "scales": [1, 2, 3, 4], "ch": 32, "ch_mult": [1, 1, 1],
                        "num_res_blocks": 1, "restart_unused": 2}},
    "kl": {"cls": "visar.tokenizers.kl:KLTokenizer",
           "kwargs": {"scale_factor": "auto", "kl_weight": 1e-3, "vae_config": {
               "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 2,
               "up_block_types": ["UpDecoderBlock2D"] * 2, "block_out_channels": [8, 8], "layers_per_block": 1,
               "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 4, "sample_size": 16,
               "mid_block_add_attention": False}}},
    "planted": {"cls": "test_train_multiprocess_sync:RankLocalStat", "kwargs": {}},
}


def _cfg(model: str, out: Path, steps: int, save_every: int, grad_accum: int = 1):
    data = {
        "task": "tokenizer",
        "model": MODELS[model],
        "data": {"kind": "shapes", "size": 16, "length": 64},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "grad_clip": 1.0},
        "train": {"steps": steps, "batch_size": 8, "grad_accum": grad_accum, "save_every": save_every,
                  "log_every": 1000, "output_dir": str(out), "progress": False, "ema_decay": 0.9, "threads": 1},
    }
    return load_config(None, [], data=data)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(worker, *args) -> None:
    from accelerate import notebook_launcher
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # another test of the session may have built an Accelerator
    notebook_launcher(worker, args=args, num_processes=2, use_port=_free_port())


def _instrument(restarts: list[int], kill_at: int | None = None):
    """In a worker: dump every rank's state at each checkpoint, count restarts, optionally die after
    optimizer step ``kill_at`` (like a killed job: after that step, before its checkpoint). Returns
    the function that undoes it."""
    import visar.train.trainer as tr
    from visar.tokenizers.msvq_quantizer import MultiScaleResidualQuantizer
    from visar.tokenizers.vq import VQTokenizer

    real_save, real_update, real_check = tr._save, tr.EMA.update, tr._check_replicas
    differ: list[str] = []

    def check(*a):
        differ[:] = real_check(*a)
        return differ

    def save(accelerator, cfg, root, step, model, ema, optimizer, identity):
        real_save(accelerator, cfg, root, step, model, ema, optimizer, identity)
        state = {"model": model.state_dict(), "buffers": dict(model.named_buffers()), "ema": ema.state_dict(),
                 "optimizer": optimizer.state_dict()["state"], "restarts": sum(restarts),
                 "trainer_check": list(differ)}
        torch.save(state, Path(root).parent / f"rank{accelerator.process_index}_step{step}.pt")

    def update(self, model, step):
        if kill_at is not None and step + 1 == kill_at:
            raise KeyboardInterrupt(f"killed during step {kill_at}")
        real_update(self, model, step)

    def counting(real):
        def f(*a, **k):
            n = real(*a, **k)
            restarts.append(int(n))
            return n
        return f

    real_vq, real_ms = VQTokenizer.restart_dead_codes, MultiScaleResidualQuantizer.restart_dead_codes
    tr._save, tr.EMA.update, tr._check_replicas = save, update, check
    VQTokenizer.restart_dead_codes = counting(real_vq)
    MultiScaleResidualQuantizer.restart_dead_codes = counting(real_ms)

    def undo():
        tr._save, tr.EMA.update, tr._check_replicas = real_save, real_update, real_check
        VQTokenizer.restart_dead_codes, MultiScaleResidualQuantizer.restart_dead_codes = real_vq, real_ms

    return undo


def _probe_collectives(path: str) -> None:
    """The helpers of visar.utils.dist under a real 2-process group; rank r writes its results."""
    r = vdist.rank()
    out = {"world": vdist.world_size(), "distributed": vdist.is_distributed()}
    out["sum"] = vdist.all_reduce_(torch.tensor([r + 1, 10 * r]), "sum").tolist()
    out["max"] = vdist.all_reduce_(torch.tensor([float(r), -float(r)]), "max").tolist()
    out["any"] = vdist.all_reduce_(torch.tensor([r == 1, False]), "max").tolist()
    out["bcast"] = vdist.broadcast_(torch.full((3,), float(r + 5)), src=1).tolist()
    out["gather"] = vdist.all_gather_cat(torch.full((2, 1), r)).flatten().tolist()
    same, swapped = torch.arange(6.0), torch.arange(6.0)
    if r == 1:
        swapped[[1, 2]] = swapped[[2, 1]]
    out["differ"] = vdist.replica_mismatches([("same", same), ("swapped", swapped), ("rank", torch.tensor([r]))])
    Path(path, f"probe{r}.json").write_text(json.dumps(out))


def _train_worker(runs, probe_dir=None):
    """``runs``: ``(model, out_dir, steps, save_every, grad_accum, kill_at)`` tuples trained in order."""
    from visar.train.trainer import train

    torch.set_num_threads(1)
    if probe_dir:
        from accelerate import Accelerator

        Accelerator(cpu=True)  # initialises the gloo group
        _probe_collectives(probe_dir)
    for model, out, steps, save_every, grad_accum, kill_at in runs:
        undo = _instrument([], kill_at)
        try:
            train(_cfg(model, Path(out), steps, save_every, grad_accum))
        except KeyboardInterrupt:
            assert kill_at is not None
        finally:
            undo()


def _rank_state(out: Path, rank: int, step: int) -> dict:
    return torch.load(out / f"rank{rank}_step{step}.pt", weights_only=True)


def _assert_equal(a, b, where: str) -> None:
    """Nested dicts / lists of tensors equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys differ"
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    else:
        assert a == b, f"{where}: {a} != {b}"


def test_two_ranks_stay_bit_identical_with_restarts(tmp_path):
    """VQ (grad_accum 2), multi-scale VQ and KL-VAE on 2 processes: equal ranks at every checkpoint;
    the trainer's replica check is quiet for them and names a planted rank-local buffer; the
    collectives behave under the real group."""
    steps = 4
    runs = [("vq", str(tmp_path / "vq"), steps, 2, 2, None), ("msvq", str(tmp_path / "msvq"), steps, 2, 1, None),
            ("kl", str(tmp_path / "kl"), steps, 2, 1, None), ("planted", str(tmp_path / "planted"), 2, 2, 1, None)]
    _launch(_train_worker, runs, str(tmp_path))
    for model, out, *_ in runs[:3]:
        out = Path(out)
        for step in (2, steps):
            s0, s1 = _rank_state(out, 0, step), _rank_state(out, 1, step)
            _assert_equal(s0, s1, f"{model} step {step}")
            assert s0["trainer_check"] == [], model  # the trainer's own replica check agrees
        if model != "kl":
            assert s0["restarts"] > 4, f"{model}: the test needs dead-code restarts ({s0['restarts']})"
    # the collectives of visar.utils.dist under the real group
    for r in (0, 1):
        p = json.loads((tmp_path / f"probe{r}.json").read_text())
        assert p["world"] == 2 and p["distributed"]
        assert p["sum"] == [3, 10] and p["max"] == [1.0, 0.0] and p["any"] == [True, False]
        assert p["bcast"] == [6.0, 6.0, 6.0] and p["gather"] == [0, 0, 1, 1]
        assert p["differ"] == ["swapped", "rank"]
    # the trainer's check names exactly the planted rank-local buffer
    assert _rank_state(tmp_path / "planted", 0, 2)["trainer_check"] == ["batch_sum"]
    # the KL-VAE's running std was really updated (every step), and is what the checkpoint holds
    kl = _rank_state(tmp_path / "kl", 0, steps)["buffers"]
    assert int(kl["latent_std_updates"]) == steps and float(kl["latent_std"]) != 1.0
    saved = load_safetensors(ckpt.find_latest(tmp_path / "kl" / "checkpoints") / "model.safetensors")
    assert torch.equal(saved["latent_std"], kl["latent_std"])


@pytest.mark.slow
def test_two_process_kill_and_resume_is_bit_exact(tmp_path):
    steps, every, kill = 8, 4, 6
    full = [(m, str(tmp_path / f"{m}_full"), steps, every, 1, None) for m in ("vq", "msvq")]
    part = [(m, str(tmp_path / f"{m}_part"), steps, every, 1, kill) for m in ("vq", "msvq")]
    _launch(_train_worker, full + part)
    for m, out, *_ in part:  # died after step 6 without saving it: the last checkpoint is step 4
        assert ckpt.find_latest(Path(out) / "checkpoints").name == ckpt.step_dir_name(every)
    _launch(_train_worker, [(m, out, steps, every, 1, None) for m, out, *_ in part])  # fresh processes resume
    for (m, a, *_), (_, b, *_) in zip(full, part):
        for rank in (0, 1):
            ra, rb = _rank_state(Path(a), rank, steps), _rank_state(Path(b), rank, steps)
            ra.pop("restarts"), rb.pop("restarts")
            _assert_equal(ra, rb, f"{m} rank {rank} resumed vs uninterrupted")
        da, db = (ckpt.find_latest(Path(x) / "checkpoints") for x in (a, b))
        for f in ("model.safetensors", "ema.safetensors"):
            _assert_equal(load_safetensors(da / f), load_safetensors(db / f), f"{m} {f}")


def test_collectives_under_two_processes_and_without_a_group(tmp_path):
    # no process group: identities (the single-process training path is untouched)
    t = torch.tensor([1.0, -0.0])
    assert vdist.all_reduce_(t, "max") is t and vdist.broadcast_(t) is t and vdist.all_gather_cat(t) is t
    assert vdist.world_size() == 1 and vdist.rank() == 0 and not vdist.is_distributed()
    assert vdist.replica_mismatches([("t", t)]) == []
    with pytest.raises(ValueError, match="op must be one of"):
        vdist.all_reduce_(t, "mean")
    with pytest.raises(TypeError, match="needs a tensor"):
        vdist.broadcast_([1.0])
    # checksums see bits and positions: -0.0 vs 0.0, a swap, a NaN payload, any dtype
    c = vdist.checksum
    assert not torch.equal(c(torch.tensor([0.0, 1.0])), c(torch.tensor([-0.0, 1.0])))
    assert not torch.equal(c(torch.tensor([1.0, 2.0, 3.0])), c(torch.tensor([1.0, 3.0, 2.0])))
    assert torch.equal(c(torch.arange(5.0)), c(torch.arange(5.0).clone()))
    for dt in (torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.uint8, torch.bool):
        assert c(torch.ones(3, dtype=dt)).dtype == torch.int64
    assert torch.equal(c(torch.empty(0)), torch.zeros(2, dtype=torch.long))


def _visar_train(cfg: Path, out: Path, log: Path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "visar.train.launch", str(cfg), "--num-processes", "2", f"train.output_dir={out}"]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_cli_two_processes_killed_and_resumed_match_the_uninterrupted_run(tmp_path):
    """``visar train --num-processes 2``: SIGKILL every process of the run (workers first, at whatever
    point they are) once a checkpoint exists, run the same command again: the resumed run ends
    bit-equal to an uninterrupted one (weights, EMA, optimizer, training buffers)."""
    import signal
    import time

    import psutil
    import yaml

    steps = 16
    cfg = _cfg("msvq", tmp_path / "unused", steps, 4).to_dict()
    cfg["train"]["output_dir"] = str(tmp_path / "unused")
    (tmp_path / "msvq.yaml").write_text(yaml.safe_dump(cfg))
    full, part = tmp_path / "full", tmp_path / "part"
    assert _visar_train(tmp_path / "msvq.yaml", full, tmp_path / "full.log").wait(timeout=600) == 0

    proc = _visar_train(tmp_path / "msvq.yaml", part, tmp_path / "part.log")
    latest = part / "checkpoints" / "latest"
    while not latest.exists():
        assert proc.poll() is None, (tmp_path / "part.log").read_text()[-3000:]
        time.sleep(0.01)
    family = psutil.Process(proc.pid).children(recursive=True)
    workers = [p for p in family if "--worker" in p.cmdline() and "accelerate.commands.launch" not in p.cmdline()]
    assert len(workers) == 2, [p.cmdline() for p in family]
    for p in [*workers, *[p for p in family if p not in workers], psutil.Process(proc.pid)]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(family, timeout=60)
    killed_at = ckpt.find_latest(part / "checkpoints")
    assert killed_at is not None and int(killed_at.name[len(ckpt.PREFIX):]) < steps  # really interrupted
    assert _visar_train(tmp_path / "msvq.yaml", part, tmp_path / "resume.log").wait(timeout=600) == 0
    assert "resumed from" in (tmp_path / "resume.log").read_text()

    a, b = ckpt.find_latest(full / "checkpoints"), ckpt.find_latest(part / "checkpoints")
    assert a.name == b.name == ckpt.step_dir_name(steps)
    for f in ("model.safetensors", "ema.safetensors"):
        _assert_equal(load_safetensors(a / f), load_safetensors(b / f), f)
    ta, tb = (torch.load(d / "trainer_state.pt", weights_only=True) for d in (a, b))
    _assert_equal(ta["buffers"], tb["buffers"], "training buffers")
    assert set(ta["buffers"]) == {"quantize.code_age"}
    _assert_equal(ta["optimizer"]["state"], tb["optimizer"]["state"], "optimizer state")


def test_training_buffers_are_saved_beside_the_weights(caplog):
    from visar.tokenizers.msvq_quantizer import MultiScaleResidualQuantizer

    model = nn.Sequential(nn.Linear(2, 2), MultiScaleResidualQuantizer(8, 2, [1, 2], restart_unused=3))
    model[1].code_age.copy_(torch.arange(8))
    assert "1.code_age" not in model.state_dict()  # official weight files have no such entry
    saved = ckpt.training_buffers(model)
    assert list(saved) == ["1.code_age"] and saved["1.code_age"].tolist() == list(range(8))
    fresh = nn.Sequential(nn.Linear(2, 2), MultiScaleResidualQuantizer(8, 2, [1, 2], restart_unused=3))
    ckpt.load_training_buffers(fresh, saved)
    assert torch.equal(fresh[1].code_age, model[1].code_age)
    with caplog.at_level("WARNING", logger="visar.train"):
        ckpt.load_training_buffers(fresh, {}, source="old/trainer_state.pt")  # written before buffers were saved
    assert "old/trainer_state.pt has no saved 1.code_age" in caplog.text
    with pytest.raises(ValueError, match="does not have"):
        ckpt.load_training_buffers(fresh, {"2.code_age": torch.zeros(8, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"has shape \(4,\)"):
        ckpt.load_training_buffers(fresh, {"1.code_age": torch.zeros(4, dtype=torch.long)})


def test_one_process_resume_restores_the_code_ages(tmp_path):
    """The multi-scale quantizer's ages are not in state_dict: without the training buffers a resumed run
    restarted other codes (single process too)."""
    from visar.train.trainer import train

    train(_cfg("msvq", tmp_path / "full", 6, 3))
    undo = _instrument([], kill_at=5)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(_cfg("msvq", tmp_path / "part", 6, 3))
    finally:
        undo()
    assert ckpt.find_latest(tmp_path / "part" / "checkpoints").name == ckpt.step_dir_name(3)
    train(_cfg("msvq", tmp_path / "part", 6, 3))
    a, b = (ckpt.find_latest(tmp_path / x / "checkpoints") for x in ("full", "part"))
    for f in ("model.safetensors", "ema.safetensors"):
        _assert_equal(load_safetensors(a / f), load_safetensors(b / f), f)
    ages = torch.load(b / "trainer_state.pt", weights_only=True)["buffers"]["quantize.code_age"]
    assert ages.shape == (64,) and int(ages.max()) > 0
