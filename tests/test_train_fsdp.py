"""Sharded training (``train.fsdp``): two CPU processes (gloo) shard a generator with torch FSDP2.

One launch of two processes trains a tiny LlamaGen generator several times (6 steps, gradient accumulation 2):
uninterrupted and killed-then-resumed, with full and with sharded checkpoints, and with each sharding mode.
The resumed runs must end bit-equal to the uninterrupted ones; every sharding mode must compute the same
optimisation as one unsharded process (to float32 rounding); a checkpoint written by the sharded run must
resume in one unsharded process.
"""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from visar.train import checkpoint as ckpt
from visar.train.config import ConfigError, load_config
from visar.utils.io import load_safetensors

VQ = {"cls": "visar.tokenizers.vq:VQTokenizer",
      "kwargs": {"codebook_size": 16, "codebook_embed_dim": 4, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                 "z_channels": 32}}
GPT = {"cls": "visar.generators.next_token.llamagen:NextTokenGenerator",
       "kwargs": {"vocab_size": 16, "dim": 32, "depth": 2, "num_heads": 2, "grid_size": 4, "num_classes": 10,
                  "class_dropout": 0.0, "token_dropout": 0.0, "resid_dropout": 0.0, "ffn_dropout": 0.0}}
# (no dropout: no per-rank random draws, so 2 processes must compute what 1 computes)
STEPS, EVERY, KILL = 6, 2, 5


def _cfg(out: str, tokenizer: str, fsdp: dict | None, steps: int = STEPS, grad_accum: int = 2):
    return load_config(None, [], data={
        "task": "generator", "model": GPT, "tokenizer": {"path": tokenizer},
        "data": {"kind": "shapes", "size": 8, "length": 64},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "grad_clip": 0.5},
        "train": {"steps": steps, "batch_size": 8, "grad_accum": grad_accum, "save_every": EVERY, "log_every": 1000,
                  "output_dir": out, "progress": False, "ema_decay": 0.9, "threads": 1,
                  "fsdp": fsdp or {"enabled": False}},
        "sample": {"labels": [0, 1], "per_label": 1}})


#: every family's tiny preset -> (its tokenizer preset, generator overrides)
FAMILIES = {"llamagen-gpt-tiny": ("llamagen-vq-tiny", {}), "var-tiny": ("var-vqvae-tiny", {}),
            "mar-tiny": ("kl-tiny", {"vae_stride": 4, "img_size": 32}), "mar-ar-tiny": ("kl-tiny", {}),
            "flowar-tiny": ("kl-tiny", {}), "xar-tiny": ("kl-tiny", {}), "ctf-tiny": ("llamagen-vq-tiny", {})}


def _families(out: str) -> None:
    """In each process: every family's loss and gradient norm, unsharded and sharded over the two processes, on
    the same batch and draws (the sharded gradients are averaged over two identical batches)."""
    import copy
    import json

    import torch.distributed as dist

    from visar import zoo
    from visar.conditions import Condition
    from visar.train.fsdp import is_sharded_tensor, shard_model
    from visar.train.preflight import latent_side

    results = {}
    for preset, (tok_name, overrides) in FAMILIES.items():
        torch.manual_seed(0)
        tok = zoo.create(tok_name).eval()
        gen = zoo.create(preset, **overrides).eval()  # eval: no nn.Dropout draws (the loss's own draws are seeded)
        if preset.startswith("ctf"):
            gen.fit_clusters(tok, seed=0, iters=3)
        if hasattr(gen, "check_tokenizer"):
            gen.check_tokenizer(tok)  # VAR binds its quantizer
        side = latent_side(gen) * tok.downsample
        images = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(1)) * 2 - 1
        with torch.no_grad():
            tokens = tok.encode(images)
        cond = Condition(labels=torch.tensor([1, 2]))
        sharded = copy.deepcopy(gen)

        def run(model):
            torch.manual_seed(3)
            kw = {} if preset.startswith("ctf") else {"generator": torch.Generator().manual_seed(2)}
            loss = model.loss(tokens, cond, **kw)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], float("inf"))
            return float(loss), float(norm.full_tensor() if is_sharded_tensor(norm) else norm)

        ref = run(gen)
        shard_model(sharded, torch.device("cpu"), 2, "full")
        results[preset] = [*ref, *run(sharded)]
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))


def _worker(runs, tokenizer, families_out=None):
    """``runs``: ``(out_dir, fsdp, kill_at)`` trained in order in each of the two processes."""
    import visar.train.trainer as tr

    torch.set_num_threads(1)
    if families_out:
        from accelerate import Accelerator

        Accelerator(cpu=True)  # the gloo group
        _families(families_out)
    real = tr.EMA.update
    for out, fsdp, kill_at in runs:
        def update(self, model, step, kill_at=kill_at):
            if kill_at is not None and step + 1 == kill_at:
                raise KeyboardInterrupt(f"killed during step {kill_at}")  # after step 4's checkpoint
            real(self, model, step)

        tr.EMA.update = update
        try:
            tr.train(_cfg(out, tokenizer, fsdp))
        except KeyboardInterrupt:
            assert kill_at is not None
        finally:
            tr.EMA.update = real


def _launch(*args) -> None:
    from accelerate import notebook_launcher
    from accelerate.state import AcceleratorState

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    AcceleratorState._reset_state(True)
    notebook_launcher(_worker, args=args, num_processes=2, use_port=port)


def _equal(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), where
    for k in a:
        if isinstance(a[k], dict):
            _equal(a[k], b[k], f"{where}.{k}")
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{where}.{k} differs"
        else:
            assert a[k] == b[k], f"{where}.{k}"


def _close(a: dict, b: dict, where: str, atol: float = 2e-6) -> None:
    assert a.keys() == b.keys(), where
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=atol), f"{where}.{k}: {(a[k] - b[k]).abs().max()}"


def _final(out: Path, step: int = STEPS) -> Path:
    return Path(out) / "checkpoints" / ckpt.step_dir_name(step)


def _dcp(path: Path) -> dict:
    """A sharded checkpoint's shards read back as whole tensors (in this process, no process group)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(str(path / ckpt.SHARDED_DIR), str(target))
    return torch.load(target, weights_only=False)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    from visar.train.trainer import train

    out = tmp_path_factory.mktemp("vq")
    cfg = load_config(None, [], data={"task": "tokenizer", "model": VQ, "data": {"kind": "shapes", "size": 8},
                                      "train": {"steps": 1, "batch_size": 4, "progress": False, "threads": 1,
                                                "output_dir": str(out)}})
    return str(train(cfg))


def test_fsdp_two_processes_resume_bit_exact(tokenizer, tmp_path):
    full = {"enabled": True, "sharding": "full", "state_dict": "full"}
    shard = {**full, "state_dict": "sharded"}
    d = {k: str(tmp_path / k) for k in ("full", "full_k", "sharded", "sharded_k", "grad_op", "no_shard")}
    runs = [(d["full"], full, None), (d["full_k"], full, KILL), (d["full_k"], full, None),
            (d["sharded"], shard, None), (d["sharded_k"], shard, KILL), (d["sharded_k"], shard, None),
            (d["grad_op"], {**full, "sharding": "shard_grad_op"}, None),
            (d["no_shard"], {**full, "sharding": "no_shard"}, None)]
    # the killed runs' step-4 checkpoints, resumed later by one unsharded process
    _launch(runs, tokenizer, str(tmp_path / "families.json"))

    # every family: the sharded loss and gradient are the unsharded ones
    import json

    fam = json.loads((tmp_path / "families.json").read_text())
    assert sorted(fam) == sorted(FAMILIES)
    for preset, (loss, norm, loss_sh, norm_sh) in fam.items():
        assert loss == pytest.approx(loss_sh, rel=1e-5) and norm == pytest.approx(norm_sh, rel=1e-4), preset

    # full state dicts: the usual single-file format, resumed run bit-equal to the uninterrupted one
    a, b = _final(d["full"]), _final(d["full_k"])
    for f in ("model.safetensors", "ema.safetensors"):
        _equal(load_safetensors(a / f), load_safetensors(b / f), f"full {f}")
    sa = torch.load(a / "trainer_state.pt", weights_only=True)
    sb = torch.load(b / "trainer_state.pt", weights_only=True)
    _equal(sa["optimizer"], sb["optimizer"], "full optimizer")
    # whole moments, numbered in optimizer order as a non-sharded run numbers them
    from visar.train.optim import param_groups
    from visar.train.trainer import build_model

    model = build_model(_cfg(d["full"], tokenizer, None))
    params = [p for g in param_groups(model, 0.05) for p in g["params"]]
    assert sorted(sa["optimizer"]["state"]) == list(range(len(params)))
    for i, p in enumerate(params):
        assert sa["optimizer"]["state"][i]["exp_avg"].shape == p.shape

    # sharded state dicts: shards only, no whole weights file; resumed run bit-equal, and the same weights as
    # the run with full state dicts (the checkpoint format does not change the training)
    sh, shk = _final(d["sharded"]), _final(d["sharded_k"])
    assert ckpt.is_sharded(sh) and not (sh / "model.safetensors").exists() and ckpt.is_complete(sh)
    x, y = _dcp(sh), _dcp(shk)
    _equal(x["model"], y["model"], "sharded model")
    _equal(x["ema"], y["ema"], "sharded ema")
    _equal(x["model"], load_safetensors(a / "model.safetensors"), "sharded vs full model")
    _equal(x["ema"], load_safetensors(a / "ema.safetensors"), "sharded vs full ema")

    # the exports (assembled EMA) of both formats are the same pipeline
    from visar.pipeline import Pipeline

    ga = Pipeline.from_pretrained(Path(d["full"]) / "export").generator.state_dict()
    gb = Pipeline.from_pretrained(Path(d["sharded_k"]) / "export").generator.state_dict()
    _equal(dict(ga), dict(gb), "exports")

    # every sharding mode computes what one unsharded process computes (float32 rounding)
    from visar.train.trainer import train

    ref = tmp_path / "one"
    train(_cfg(str(ref), tokenizer, None))
    one = load_safetensors(_final(ref) / "model.safetensors")
    for k in ("full", "grad_op", "no_shard"):
        _close(load_safetensors(_final(d[k]) / "model.safetensors"), one, f"{k} vs one process")

    # a killed sharded run's checkpoints resume in one unsharded process (full and sharded formats)
    for k in ("full_k", "sharded_k"):
        resumed = tmp_path / f"{k}_on_one"
        (resumed / "checkpoints").mkdir(parents=True)
        src = _final(d[k], 4)
        import shutil

        shutil.copytree(src, resumed / "checkpoints" / src.name)
        train(_cfg(str(resumed), tokenizer, None))
        _close(load_safetensors(_final(resumed) / "model.safetensors"), one, f"{k} resumed on one process")


def test_fsdp_config_checks():
    base = {"task": "tokenizer", "model": VQ, "train": {"fsdp": {"enabled": True}}}
    with pytest.raises(ConfigError, match="does not apply to task=tokenizer"):
        load_config(None, [], data=base)
    gen = {**base, "task": "classifier", "model": {"cls": "visar.eval.classifier:ShapesClassifier"}}
    with pytest.raises(ConfigError, match="use train.mixed_precision=bf16"):
        load_config(None, ["train.mixed_precision=fp16"], data=gen)
    with pytest.raises(ConfigError, match="train.fsdp.sharding must be one of full, shard_grad_op, no_shard"):
        load_config(None, ["train.fsdp.sharding=zero3"], data=gen)
    with pytest.raises(ConfigError, match="train.fsdp.state_dict must be one of full, sharded"):
        load_config(None, ["train.fsdp.state_dict=local"], data=gen)
    with pytest.raises(ConfigError, match="unknown config key train.fsdp.enable;"):
        load_config(None, ["train.fsdp.enable=true"], data=gen)
    assert load_config(None, [], data=gen).train.fsdp.enabled


def test_fsdp_units_are_the_blocks():
    from visar import zoo
    from visar.train.fsdp import units

    from visar.train.fsdp import entry_methods

    m = zoo.create("llamagen-gpt-tiny")
    assert units(m) == list(m.trunk.blocks)
    v = zoo.create("var-tiny")
    assert units(v) == list(v.blocks) and "modulation" in entry_methods(v.blocks[0])  # VAR calls it before the block
    assert "forward" not in entry_methods(v.blocks[0]) and "parameters" not in entry_methods(v.blocks[0])


@pytest.mark.slow
@pytest.mark.parametrize("state_dict", ["full", "sharded"])
def test_cli_fsdp_sigkilled_and_resumed_matches_the_uninterrupted_run(tokenizer, tmp_path, state_dict):
    """``visar train CONFIG --num-processes 2 train.fsdp.enabled=true``: every process SIGKILLed once a checkpoint
    exists, the same command run again ends bit-equal to an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    import psutil
    import yaml

    steps = 12
    cfg = _cfg(str(tmp_path / "unused"), tokenizer, None, steps=steps).to_dict()
    (tmp_path / "gpt.yaml").write_text(yaml.safe_dump(cfg))

    def visar_train(out: Path, log: str):
        cmd = [sys.executable, "-m", "visar.train.launch", str(tmp_path / "gpt.yaml"), "--num-processes", "2",
               f"train.output_dir={out}", "train.fsdp.enabled=true", f"train.fsdp.state_dict={state_dict}"]
        return subprocess.Popen(cmd, stdout=(tmp_path / log).open("w"), stderr=subprocess.STDOUT)

    full, part = tmp_path / "full", tmp_path / "part"
    assert visar_train(full, "full.log").wait(timeout=600) == 0, (tmp_path / "full.log").read_text()[-3000:]
    proc = visar_train(part, "part.log")
    while not (part / "checkpoints" / "latest").exists():
        assert proc.poll() is None, (tmp_path / "part.log").read_text()[-3000:]
        time.sleep(0.01)
    family = psutil.Process(proc.pid).children(recursive=True)
    for p in [*family, psutil.Process(proc.pid)]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(family, timeout=60)
    killed_at = ckpt.find_latest(part / "checkpoints")
    assert killed_at is not None and int(killed_at.name[len(ckpt.PREFIX):]) < steps
    assert visar_train(part, "resume.log").wait(timeout=600) == 0
    assert "resumed from" in (tmp_path / "resume.log").read_text()
    a, b = _final(full, steps), _final(part, steps)
    if state_dict == "full":
        for f in ("model.safetensors", "ema.safetensors"):
            _equal(load_safetensors(a / f), load_safetensors(b / f), f)
    else:
        x, y = _dcp(a), _dcp(b)
        for k in ("model", "ema", "optimizer"):
            _equal(x[k], y[k], k)


def test_accelerate_configs_with_their_own_sharding_are_refused_and_multi_node_keeps_its_port(tmp_path, caplog):
    import yaml

    from visar.train.launch import launcher_command, main

    cfg = tmp_path / "cls.yaml"
    cfg.write_text(yaml.safe_dump({"task": "classifier", "model": {"cls": "visar.eval.classifier:ShapesClassifier"},
                                   "train": {"output_dir": str(tmp_path / "run")}}))
    acc = tmp_path / "fsdp.yaml"
    acc.write_text(yaml.safe_dump({"distributed_type": "FSDP", "num_processes": 2}))
    assert main([str(cfg), "--accelerate-config", str(acc)]) == 2
    assert "sets distributed_type: FSDP; visar shards the model itself" in caplog.records[-1].getMessage()
    # several machines: the config's port is kept (a free local port would differ between machines)
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text(yaml.safe_dump({"distributed_type": "MULTI_GPU", "num_machines": 2, "main_process_port": 29555}))
    cmd, _ = launcher_command(["-m", "x"], None, str(nodes))
    assert "--main_process_port" not in cmd
    cmd, _ = launcher_command(["-m", "x"], None, str(nodes), port=29600)
    assert cmd[cmd.index("--main_process_port") + 1] == "29600"
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump({"distributed_type": "MULTI_GPU", "num_machines": 1}))
    assert "--main_process_port" in launcher_command(["-m", "x"], 2, str(one))[0]


def test_bf16_on_a_cpu_trains_with_a_warning(tokenizer, tmp_path, caplog):
    from visar.train.trainer import train

    cfg = _cfg(str(tmp_path / "bf16"), tokenizer, {"enabled": True}, steps=1, grad_accum=1)  # 1 process: unsharded
    cfg.train.mixed_precision = "bf16"
    with caplog.at_level("WARNING", logger="visar.train"):
        train(cfg)
    text = caplog.text
    assert "train.mixed_precision=bf16 on a CPU: bf16 matmuls are 7-70x slower" in text
    assert "train.fsdp.enabled=true with one process: nothing to shard, training unsharded" in text
