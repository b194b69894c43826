"""The trainer: any Tokenizer, Generator or classifier, through their interfaces, on Hugging Face Accelerate.

``train(cfg)`` runs one process of a (possibly distributed) run; ``visar train`` (:mod:`visar.train.launch`)
starts the processes. What it does each optimizer step:

1. sets the learning rate (linear warmup, cosine decay; a pure function of the step);
2. for each of ``grad_accum`` micro-batches: takes this rank's slice of the global batch (the data
   order is a pure function of ``(seed, step)``), computes the task loss under autocast and
   back-propagates ``loss / grad_accum`` (gradient all-reduce only on the last micro-batch);
3. averages the loss over processes; a NaN/inf loss stops the run (:class:`NonFiniteLoss`, with the
   step) before the weights are touched, leaving the last good checkpoint as it is;
4. clips the gradient norm, steps AdamW, updates the EMA weights;
5. logs, saves an atomic checkpoint every ``save_every`` steps, writes a sample grid every
   ``sample_every`` steps (generators: EMA ``sample`` + tokenizer ``decode``; tokenizers: EMA
   reconstructions).

Resume is bit-exact: the checkpoint holds model, EMA, optimizer (and grad scaler), the step, and every
rank's torch / numpy / python RNG states; the data order is recomputed from the step. The final export
is a ``Pipeline.save_pretrained`` folder (generator task), or a ``save_pretrained`` folder of the
tokenizer / classifier with EMA weights.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from visar.train.checkpoint import (begin_checkpoint, find_latest, finish_checkpoint, load_checkpoint,
                                    load_training_buffers, save_checkpoint, training_buffers)
from visar.train.config import DataConfig, TrainConfig
from visar.train.fsdp import (gather_full, gather_optimizer, is_sharded_tensor, load_full_ema, load_full_optimizer,
                              load_sharded, save_sharded, shard_model)
from visar.train.optim import EMA, ema_rule, lr_at, param_groups
from visar.train.tasks import make_task

log = logging.getLogger("visar.train")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stopped without updating the weights."""


class CheckpointMismatch(ValueError):
    """A checkpoint was written by a different model (class or constructor config)."""


# ----------------------------------------------------------------------------------------------
# building blocks

def build_model(cfg: TrainConfig) -> nn.Module:
    """The model named by ``cfg.model`` (``cls: "module:Class"`` + kwargs, or a zoo ``preset`` + overrides)."""
    m = cfg.model
    if m.preset is not None:
        from visar import zoo

        return zoo.create(m.preset, **m.kwargs)
    module, _, name = m.cls.partition(":")
    try:
        klass = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"config key model.cls={m.cls!r} cannot be imported: {e}") from e
    try:
        return klass(**m.kwargs)
    except TypeError as e:
        raise ValueError(f"model.kwargs do not fit {m.cls}: {e}") from e


def exclude_prefixes(model: nn.Module, state: dict, prefixes: list) -> dict:
    """``state`` without the tensors under ``prefixes``, completed with ``model``'s own tensors there
    (``model.init_exclude``). Raises ``ValueError`` for a prefix that names nothing in either."""
    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    own = model.state_dict()
    for pre in prefixes:
        if not any(under(n, pre) for n in list(own) + list(state)):
            tops = sorted({n.split(".")[0] for n in own})
            raise ValueError(f"model.init_exclude prefix {pre!r} names no tensor of {type(model).__name__} or of "
                             f"model.init_from; its top-level groups are: {', '.join(tops)}")
    kept = {k: v for k, v in state.items() if not any(under(k, pre) for pre in prefixes)}
    kept.update({k: v for k, v in own.items() if any(under(k, pre) for pre in prefixes)})
    return kept


def init_and_freeze(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Apply ``model.init_from`` (strict load of a ``.safetensors`` file; with ``model.init_deepen``,
    of a shallower model grown by :func:`visar.train.grow.deepen_state`) and ``model.trainable``
    (parameter-name prefixes that train; the rest gets ``requires_grad=False``); ``model.init_exclude``
    prefixes keep this model's own initialisation."""
    m = cfg.model
    if m.init_from:
        from visar.convert.common import load_state_strict
        from visar.utils.io import load_safetensors

        state = load_safetensors(m.init_from)
        if m.init_deepen:
            from visar.train.grow import block_depth, deepen_state

            blocks = m.init_deepen["blocks"]
            depth = block_depth(model.state_dict(), blocks)
            state = deepen_state(state, depth, blocks, list(m.init_deepen["zero"]))
        if m.init_exclude:
            state = exclude_prefixes(model, state, m.init_exclude)
        load_state_strict(model, state, source=f"model.init_from={m.init_from}")
    if m.trainable:
        def under(name: str, prefix: str) -> bool:
            return name == prefix or name.startswith(prefix + ".")

        names = [n for n, _ in model.named_parameters()]
        for pre in m.trainable:
            if not any(under(n, pre) for n in names):
                tops = sorted({n.split(".")[0] for n in names})
                raise ValueError(f"model.trainable prefix {pre!r} names no parameter of {type(model).__name__}; "
                                 f"its top-level parameter groups are: {', '.join(tops)}")
        for n, p in model.named_parameters():
            p.requires_grad_(any(under(n, pre) for pre in m.trainable))
    return model


def build_dataset(d: DataConfig) -> torch.utils.data.Dataset:
    """The dataset a ``data:`` section describes (also used by ``visar tokenize``), with the classes of
    ``data.label_repeat`` listed several times."""
    ds = _base_dataset(d)
    if d.label_repeat:
        from visar.data.label_repeat import LabelRepeat

        ds = LabelRepeat(ds, d.label_repeat)
        log.info("data.label_repeat %s: %d items listed (%d without repeats)", ds.repeats, len(ds), len(ds.dataset))
    return ds


def _base_dataset(d: DataConfig) -> torch.utils.data.Dataset:
    if d.kind == "shapes":
        from visar.data.shapes import ShapesDataset

        ds = ShapesDataset(size=d.size, length=d.length, split=d.split, seed=d.seed, cache=d.cache or None)
        ds.pixels()  # render/open the cache now (main process first), not inside the loop
        return ds
    if d.kind == "folder":
        from visar.data.folder import ImageFolderDataset

        return ImageFolderDataset(d.path, size=d.size, flip=d.flip)
    if d.kind == "token_cache":
        from visar.data.token_cache import TokenCacheDataset

        return TokenCacheDataset(d.path, flip=d.flip)
    if d.kind == "distill_shards":
        from visar.data.distill_shards import DistillShards

        return DistillShards(d.path)
    raise ValueError(f"unknown data.kind {d.kind!r}")


def load_frozen_tokenizer(cfg: TrainConfig) -> nn.Module:
    from visar.tokenizers.base import Tokenizer

    return Tokenizer.from_pretrained(cfg.tokenizer.path, cfg.tokenizer.name)


class StepBatches(torch.utils.data.Sampler):
    """Index lists of one rank, micro-batch after micro-batch, from optimizer step ``start``.

    Global sample position ``q = step * batch_size + j`` maps to ``perm_e[q % N]`` with epoch
    ``e = q // N`` and ``perm_e = randperm(N, seed)``; micro-batch ``a`` of the step holds rows
    ``[a * B / A, (a + 1) * B / A)`` and rank ``r`` takes its ``1 / P`` share of them. The order thus
    depends only on ``(seed, batch_size)``, not on the number of processes or on interruptions.
    """

    def __init__(self, n: int, batch_size: int, grad_accum: int, rank: int, world: int, seed: int,
                 start: int, steps: int):
        if batch_size % (grad_accum * world):
            raise ValueError(f"train.batch_size={batch_size} must be divisible by grad_accum x processes = "
                             f"{grad_accum} x {world}")
        self.n, self.B, self.A, self.rank, self.P = n, batch_size, grad_accum, rank, world
        self.seed, self.start, self.steps = seed, start, steps
        self._perm: dict[int, torch.Tensor] = {}

    def _epoch(self, e: int) -> torch.Tensor:
        if e not in self._perm:
            self._perm = {e: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + e))}
        return self._perm[e]

    def rows(self, step: int, micro: int) -> list[int]:
        b = self.B // (self.A * self.P)
        lo = step * self.B + micro * (self.B // self.A) + self.rank * b
        out = []
        for q in range(lo, lo + b):
            out.append(int(self._epoch(q // self.n)[q % self.n]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            for a in range(self.A):
                yield self.rows(step, a)

    def __len__(self) -> int:
        return (self.steps - self.start) * self.A


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over ``[decay, no decay]`` groups split by ``optim.weight_decay_groups`` (:func:`param_groups`)."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, o.weight_decay_groups)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def resume_decay_rule(cfg: TrainConfig, meta: dict, path: Path) -> str:
    """The weight-decay grouping a checkpoint's optimizer state was built with: its config's
    ``optim.weight_decay_groups``, or ``legacy`` for checkpoints written before that key existed (resumed with
    it, logged). A recorded rule other than this run's raises :class:`CheckpointMismatch`."""
    saved = (meta.get("config") or {}).get("optim", {})
    want = cfg.optim.weight_decay_groups
    if "weight_decay_groups" not in saved:
        if want != "legacy":
            log.info("%s predates optim.weight_decay_groups: resuming with its legacy weight-decay groups", path)
        return "legacy"
    if saved["weight_decay_groups"] != want:
        raise CheckpointMismatch(f"cannot resume from {path}: its optimizer state was grouped with "
                                 f"optim.weight_decay_groups={saved['weight_decay_groups']}, this run asks for "
                                 f"{want}; resume with optim.weight_decay_groups={saved['weight_decay_groups']} or "
                                 "start a new run (another train.output_dir or train.resume=never)")
    return want


def _model_identity(model: nn.Module) -> dict:
    cls = f"{type(model).__module__}.{type(model).__qualname__}"
    return {"model_class": cls, "model_config": getattr(model, "config", None)}


# ----------------------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> Path:
    """Run training (this process's part of it); returns the export folder."""
    from accelerate import Accelerator

    t = cfg.train
    out_dir = Path(t.output_dir)
    export_dir = Path(cfg.export_dir) if cfg.export_dir else out_dir / "export"
    acc_kwargs: dict[str, Any] = {"mixed_precision": t.mixed_precision, "cpu": not torch.cuda.is_available()}
    if t.tensorboard:
        acc_kwargs.update(log_with="tensorboard", project_dir=str(out_dir / "logs"))
    accelerator = Accelerator(**acc_kwargs)
    try:
        return _train(cfg, accelerator, out_dir, export_dir)
    finally:
        if t.tensorboard:
            accelerator.end_training()
        _reset_accelerate_state(accelerator)


def _reset_accelerate_state(accelerator) -> None:
    """Forget the Accelerate singletons so that another run can start in this process (tests, notebooks)."""
    from accelerate.state import AcceleratorState, GradientState

    if accelerator.num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _train(cfg: TrainConfig, accelerator, out_dir: Path, export_dir: Path) -> Path:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    t, o = cfg.train, cfg.optim
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    ckpt_root = out_dir / "checkpoints"

    if t.threads > 0:
        torch.set_num_threads(t.threads)
    set_seed(t.seed)  # same init on every rank
    model = init_and_freeze(build_model(cfg), cfg)
    tokenizer = load_frozen_tokenizer(cfg) if cfg.task == "generator" else None
    if tokenizer is not None:
        tokenizer.to(accelerator.device)
        if hasattr(model, "attach_tokenizer"):  # e.g. CTF builds its coarse clusters from the codebook (deterministic)
            model.attach_tokenizer(tokenizer)
    task = make_task(cfg.task, model, tokenizer)
    with accelerator.main_process_first():  # rank 0 renders a data cache, the others then read it
        dataset = build_dataset(cfg.data)
    if tokenizer is not None and hasattr(dataset, "check_tokenizer"):
        dataset.check_tokenizer(tokenizer)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if main:
        log.info("task %s: %s with %.2fM trainable parameters, %d processes, global batch %d, %d steps",
                 cfg.task, type(model).__name__, n_params / 1e6, world, t.batch_size, t.steps)

    sharded = _fsdp_active(cfg, accelerator, model)
    if t.mixed_precision == "bf16" and accelerator.device.type == "cpu" and main:
        log.warning("train.mixed_precision=bf16 on a CPU: bf16 matmuls are 7-70x slower than float32 there; use "
                    "train.mixed_precision=no on CPUs and bf16 on GPUs")
    # sharded (FSDP): the optimizer and the EMA are built on the shards, after sharding (below)
    optimizer = None if sharded else build_optimizer(model, cfg)
    ema = None if sharded else EMA(model, **ema_rule(model, o.ema, t.ema_decay))
    identity = _model_identity(model)

    # ---- resume
    start = 0
    resume_path: Path | None = None
    if t.resume == "auto":
        resume_path = find_latest(ckpt_root)
    elif t.resume not in ("never", ""):
        resume_path = Path(t.resume)
    rng_to_restore = None
    if resume_path is not None:
        meta, m_state, e_state, tr_state = load_checkpoint(resume_path)
        if (meta.get("model_class"), meta.get("model_config")) != (identity["model_class"], identity["model_config"]):
            raise CheckpointMismatch(
                f"cannot resume from {resume_path}: it holds a {meta.get('model_class')} with config "
                f"{meta.get('model_config')}, but this run builds a {identity['model_class']} with config "
                f"{identity['model_config']}; use another train.output_dir or train.resume=never")
        from visar.convert.common import load_state_strict

        if m_state is not None:  # a sharded checkpoint's weights are read below, shard by shard
            load_state_strict(model, m_state, source=str(resume_path / "model.safetensors"))
        load_training_buffers(model, tr_state.get("buffers"), source=str(resume_path / "trainer_state.pt"))
        if resume_decay_rule(cfg, meta, resume_path) != o.weight_decay_groups:
            o.weight_decay_groups = "legacy"  # also what later checkpoints of this run record
            optimizer = None if sharded else build_optimizer(model, cfg)
        if not sharded:
            if e_state is None:
                load_sharded(resume_path, model, ema, optimizer)
            else:
                ema.load_state_dict(e_state)
                optimizer.load_state_dict(tr_state["optimizer"])
        start = int(meta["step"])
        rngs = tr_state["rng"]
        rng_to_restore = rngs[rank] if rank < len(rngs) else None
        if len(rngs) != world and main:
            log.warning("checkpoint was written by %d processes, resuming on %d: RNG streams differ, "
                        "the run is no longer bit-exact", len(rngs), world)
        if main:
            log.info("resumed from %s at step %d", resume_path, start)
        if start >= t.steps and main:
            log.info("checkpoint step %d >= train.steps %d: nothing left to train", start, t.steps)

    template = None
    if sharded:
        template = copy.deepcopy(model) if main else None  # rank 0's CPU template for sample grids and the export
        shard_model(model, accelerator.device, world, t.fsdp.sharding)
        optimizer = build_optimizer(model, cfg)
        ema = EMA(model, **ema_rule(model, o.ema, t.ema_decay))
        if resume_path is not None:
            if e_state is None:
                load_sharded(resume_path, model, ema, optimizer)
            else:
                load_full_ema(ema, e_state)
                load_full_optimizer(optimizer, tr_state["optimizer"])
        if main:
            log.info("FSDP: %s sharding over %d processes, %s checkpoints", t.fsdp.sharding, world, t.fsdp.state_dict)
    else:
        task, optimizer = accelerator.prepare(task, optimizer)
    if resume_path is not None and accelerator.scaler is not None and tr_state.get("scaler"):
        accelerator.scaler.load_state_dict(tr_state["scaler"])
    set_seed(t.seed + 1 + rank)  # per-rank stream for the model's own randomness (dropout, masking, ...)
    if rng_to_restore is not None:
        set_rng_state(rng_to_restore)

    sampler = StepBatches(len(dataset), t.batch_size, t.grad_accum, rank, world, t.seed, start, t.steps)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                         generator=torch.Generator().manual_seed(t.seed),
                                         collate_fn=_collate, persistent_workers=False)
    if t.tensorboard:
        accelerator.init_trackers("visar", config=_flat(cfg.to_dict()))

    unwrapped = model if sharded else accelerator.unwrap_model(task).model
    batches = iter(loader)
    bar = tqdm(total=t.steps, initial=start, disable=not (main and t.progress), desc=f"train {cfg.task}",
               dynamic_ncols=True)
    t0 = time.perf_counter()
    for step in range(start, t.steps):
        lr = lr_at(step, o.lr, o.warmup_steps, t.steps, o.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = lr
        task.train()
        parts: dict[str, list[torch.Tensor]] = {}
        for micro in range(t.grad_accum):
            batch = _to_device(next(batches), accelerator.device)
            sync = micro == t.grad_accum - 1
            if sharded:  # FSDP: gradients reduce-scattered on the last micro-batch only
                model.set_requires_gradient_sync(sync)
            ctx = contextlib.nullcontext() if sync or sharded else accelerator.no_sync(task)
            with ctx:
                with accelerator.autocast():
                    out = task(batch)
                accelerator.backward(out["loss"] / t.grad_accum)
            for k, v in out.items():
                if isinstance(v, torch.Tensor) and v.dim() == 0:
                    parts.setdefault(k, []).append(v.detach().float())
        logs = {k: accelerator.reduce(torch.stack(v).mean(), "mean").item() for k, v in parts.items()}
        if not math.isfinite(logs["loss"]):
            last = find_latest(ckpt_root)
            raise NonFiniteLoss(f"loss is {logs['loss']} at step {step + 1}; the weights were not updated. "
                                f"Last good checkpoint: {last if last else 'none (no checkpoint saved yet)'}. "
                                "Lower optim.lr, enable clipping (optim.grad_clip) or check the data.")
        if o.grad_clip > 0:
            if sharded:
                gn = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
                gn = gn.full_tensor() if is_sharded_tensor(gn) else gn
            else:
                gn = accelerator.clip_grad_norm_(task.parameters(), o.grad_clip)
            logs["grad_norm"] = float(gn)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        hook = getattr(unwrapped, "after_optimizer_step", None)
        if callable(hook):  # e.g. VQ dead-code restarts; gets the step and a cross-process gather
            logs.update(hook(step=done, gather=accelerator.gather) or {})
        ema.update(unwrapped, step)
        logs["lr"] = lr
        bar.update(1)
        if main and t.progress:
            bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{lr:.2e}")
        if t.tensorboard:
            accelerator.log(logs, step=done)
        if main and (done % t.log_every == 0 or done == t.steps):
            log.info("step %d/%d %s (%.2f s/step)", done, t.steps,
                     " ".join(f"{k}={v:.4g}" for k, v in logs.items()), (time.perf_counter() - t0) / (done - start))
        if t.sample_every and done % t.sample_every == 0:
            m, e = _whole(accelerator, unwrapped, ema, template)  # FSDP: every rank helps assemble the EMA
            if main:
                write_samples(cfg, m, e, tokenizer, dataset, out_dir / "samples" / f"step_{done:08d}.png")
        out_of_time = _out_of_time(accelerator, t.max_minutes, t0) and done < t.steps
        if (t.save_every and done % t.save_every == 0) or done == t.steps or out_of_time:
            _save(accelerator, cfg, ckpt_root, done, unwrapped, ema, optimizer, identity)
        if out_of_time:
            if main:
                log.warning("train.max_minutes=%g spent: stopping at step %d of %d (checkpoint saved; "
                            "the export holds this step's EMA weights)", t.max_minutes, done, t.steps)
            break
    bar.close()
    accelerator.wait_for_everyone()
    whole, whole_ema = _whole(accelerator, unwrapped, ema, template)
    if main:
        from visar.text import text_encoder_of  # a caption cache names its encoder: saved with the pipeline

        export(cfg, whole, whole_ema, tokenizer, export_dir, text_encoder=text_encoder_of(dataset))
        if t.sample_every:
            write_samples(cfg, whole, whole_ema, tokenizer, dataset, out_dir / "samples" / "final.png")
    accelerator.wait_for_everyone()
    return export_dir


def _fsdp_active(cfg: TrainConfig, accelerator, model: nn.Module) -> bool:
    """Whether this run shards the model (``train.fsdp.enabled`` with several processes); refuses setups that
    sharding would break."""
    f = cfg.train.fsdp
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED") and f.enabled:
        raise ValueError(f"train.fsdp.enabled=true with an accelerate config that already sets "
                         f"{accelerator.distributed_type.name}: visar shards the model itself (visar.train.fsdp); "
                         "use a plain multi-GPU accelerate config (distributed_type: MULTI_GPU)")
    if accelerator.distributed_type.name == "FSDP":
        raise ValueError("an accelerate config with distributed_type FSDP is not supported by visar train (its EMA, "
                         "checkpoints and export need visar's own sharding): use a MULTI_GPU accelerate config and "
                         "train.fsdp.enabled=true")
    if not f.enabled:
        return False
    if accelerator.num_processes == 1:
        log.warning("train.fsdp.enabled=true with one process: nothing to shard, training unsharded")
        return False
    if callable(getattr(model, "after_optimizer_step", None)):
        raise ValueError(f"{type(model).__name__} changes its parameters after the optimizer step "
                         "(after_optimizer_step), which sharded parameters cannot take: train it with "
                         "train.fsdp.enabled=false")
    return True


def _whole(accelerator, model: nn.Module, ema: EMA, template: nn.Module | None) -> tuple[nn.Module | None, EMA | None]:
    """The model and EMA to sample from and export: themselves, or (FSDP) rank 0's template with the EMA
    assembled from every rank's shards (a collective: every rank calls it; the others get ``None``)."""
    if template is None and not any(is_sharded_tensor(v) for v in ema.shadow.values()):
        return model, ema
    full = gather_full(ema.shadow, keep=accelerator.is_main_process)
    return (template, ema.with_shadow(full)) if accelerator.is_main_process else (None, None)


def _out_of_time(accelerator, max_minutes: float, t0: float) -> bool:
    """Whether the wall-clock budget is spent; rank 0's clock decides for every process."""
    if max_minutes <= 0:
        return False
    spent = time.perf_counter() - t0 > 60.0 * max_minutes
    if accelerator.num_processes == 1:  # host clock only: no device tensor, no sync per step
        return spent
    from accelerate.utils import broadcast

    return bool(broadcast(torch.tensor([float(spent)], device=accelerator.device), 0).item())


def _save(accelerator, cfg, root, step, model, ema, optimizer, identity) -> None:
    """Gather every rank's RNG state to rank 0, which writes the checkpoint atomically (with the
    model's training buffers, see :func:`visar.train.checkpoint.training_buffers`).

    FSDP (the model's parameters are shards): with ``train.fsdp.state_dict: full`` the model, EMA and optimizer
    are assembled tensor by tensor on rank 0 into the same files a non-sharded run writes; with ``sharded`` every rank writes its own
    shards into the checkpoint's ``sharded/`` folder and rank 0 adds the rest."""
    from accelerate.utils import gather_object

    rngs = gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]
    _check_replicas(accelerator, model, step)
    main = accelerator.is_main_process
    sharded = any(is_sharded_tensor(p) for p in model.parameters())
    meta = {**identity, "task": cfg.task, "num_processes": accelerator.num_processes, "config": cfg.to_dict()}
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else {}
    keep = cfg.train.keep_checkpoints
    if sharded and cfg.train.fsdp.state_dict == "sharded":
        tmp = begin_checkpoint(root, step, shared=True) if main else None
        tmp = Path(gather_object([str(tmp)])[0])  # rank 0's folder, once it exists
        save_sharded(tmp, model, ema, optimizer)
        if main:
            state = {"rng": rngs, "buffers": training_buffers(model), "scaler": scaler}
            log.info("saved checkpoint %s", finish_checkpoint(root, tmp, step, state, meta, keep))
    elif sharded:
        m_state, e_state = gather_full(model.state_dict(), main), gather_full(ema.shadow, main)
        opt_state = gather_optimizer(optimizer, main)
        if main:
            state = {"optimizer": opt_state, "rng": rngs, "buffers": training_buffers(model), "scaler": scaler}
            log.info("saved checkpoint %s", save_checkpoint(root, step, m_state, e_state, state, meta, keep=keep))
    elif main:
        state = {"optimizer": optimizer.state_dict(), "rng": rngs, "buffers": training_buffers(model),
                 "scaler": scaler}
        path = save_checkpoint(root, step, model.state_dict(), ema.state_dict(), state, meta, keep=keep)
        log.info("saved checkpoint %s", path)
    accelerator.wait_for_everyone()


def _check_replicas(accelerator, model: nn.Module, step: int) -> list[str]:
    """Data parallelism (DDP) with several processes: the names of the parameters and buffers whose
    copies differ between ranks (compared through bit checksums), logged as an error on rank 0.

    Checkpoints hold rank 0's copy, so a divergent replica makes a resumed run differ from the
    uninterrupted one. Sharded setups (FSDP, DeepSpeed), where ranks hold different shards, are skipped.
    """
    if accelerator.num_processes == 1 or not accelerator.distributed_type.name.startswith("MULTI_"):
        return []
    from visar.utils.dist import replica_mismatches

    # visar's FSDP: shards differ by design; what every rank holds whole (buffers) is still compared
    differ = replica_mismatches([(n, v) for n, v in [*model.named_parameters(), *model.named_buffers()]
                                 if not is_sharded_tensor(v)])
    if differ and accelerator.is_main_process:
        log.error("step %d: the %d processes hold different copies of %s; checkpoints save rank 0's, so a "
                  "resumed run will not match this one. State updated from one rank's batch (usage counts, "
                  "running statistics, restarts) must be reduced over processes (visar.utils.dist).",
                  step, accelerator.num_processes, ", ".join(differ[:8]) + (" ..." if len(differ) > 8 else ""))
    return differ


def ema_copy(model: nn.Module, ema: EMA) -> nn.Module:
    m = copy.deepcopy(model)
    ema.copy_to(m)
    return m.eval()


def export(cfg: TrainConfig, model: nn.Module, ema: EMA, tokenizer: nn.Module | None, export_dir: Path,
           text_encoder: nn.Module | None = None) -> Path:
    """Write the EMA model: a Pipeline folder (generator, with ``text_encoder`` for text-to-image), or a
    ``save_pretrained`` folder named after the task."""
    write_export(cfg, ema_copy(model, ema), tokenizer, export_dir, text_encoder)
    log.info("exported EMA weights to %s", export_dir)
    return export_dir


def write_export(cfg: TrainConfig, model: nn.Module, tokenizer: nn.Module | None, export_dir: Path,
                 text_encoder: nn.Module | None = None) -> Path:
    """Save ``model`` as the training task's export: for ``task: generator`` a Pipeline folder (with the
    frozen ``tokenizer``, ``text_encoder`` for text-to-image, and ``cfg.sample.options`` as its sampling
    defaults), else the model's ``save_pretrained`` folder named after the task."""
    if cfg.task == "generator":
        from visar.pipeline import Pipeline

        # the sampling options of the training-time grids become the pipeline's defaults
        Pipeline(tokenizer, model, text_encoder=text_encoder,
                 sampling_defaults=dict(cfg.sample.options)).save_pretrained(export_dir)
    elif hasattr(model, "save_pretrained"):
        model.save_pretrained(export_dir, cfg.task)
    else:
        raise TypeError(f"{type(model).__name__} has no save_pretrained; derive it from "
                        "visar.utils.config.Configurable")
    return export_dir


@torch.no_grad()
def write_samples(cfg: TrainConfig, model: nn.Module, ema: EMA, tokenizer, dataset, path: Path) -> None:
    """A PNG grid: generator samples (EMA, fixed seed), tokenizer reconstructions, nothing for classifiers."""
    from visar.utils.images import save_grid

    m = ema_copy(model, ema)
    if tokenizer is not None:  # the FSDP template lives on the CPU
        m.to(next(iter(tokenizer.parameters()), torch.empty(0)).device)
    device = next(m.parameters()).device
    s = cfg.sample
    if cfg.task == "generator":
        from visar.conditions import Condition

        labels = torch.tensor([c for c in s.labels for _ in range(s.per_label)], device=device)
        cond = Condition(labels=labels)
        if getattr(m, "text_conditional", False):  # the first captions of the cache
            from visar.train.tasks import batch_condition

            cond = batch_condition(_collate([dataset[i] for i in range(min(len(labels), len(dataset)))])).to(device)
        g = torch.Generator(device).manual_seed(s.seed)
        tokens = m.sample(cond, generator=g, **s.options)
        images = tokenizer.decode(tokens).clamp(-1, 1)
        nrow = s.per_label
    elif cfg.task == "tokenizer":
        n = min(8, len(dataset))
        batch = _collate([dataset[i] for i in range(n)])
        x = batch["image"].to(device)
        rec = m.decode(m.encode(x)).clamp(-1, 1)
        images = torch.stack([x, rec], 1).flatten(0, 1)
        nrow = 2
    else:
        return
    save_grid(images.float().cpu(), path, nrow=nrow)


def _collate(items: list[dict]) -> dict:
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        if isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)
        elif isinstance(vals[0], (int, np.integer)):
            out[k] = torch.tensor(vals, dtype=torch.long)
        elif isinstance(vals[0], float):
            out[k] = torch.tensor(vals)
        elif isinstance(vals[0], list) and vals[0] and isinstance(vals[0][0], torch.Tensor):
            out[k] = [torch.stack(scale) for scale in zip(*vals)]  # multi-scale tokens
        else:
            out[k] = vals
    return out


def _to_device(batch: dict, device) -> dict:
    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device, non_blocking=True)
        if isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            return [t.to(device, non_blocking=True) for t in v]
        return v

    return {k: move(v) for k, v in batch.items()}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = str(v)
    return out
