"""Sharded data parallelism for the trainer (``train.fsdp``): torch FSDP2 (``fully_shard``) over the processes
and the process group that Accelerate starts.

Why visar shards the model itself rather than through Accelerate's ``FullyShardedDataParallelPlugin``:
Accelerate (1.16) applies FSDP only to GPU-type setups; with CPU processes (``ACCELERATE_USE_CPU=1``) it
silently keeps ``DistributedType.MULTI_CPU`` and wraps the model in DDP, so an FSDP run could not be tested on
a CPU machine. ``fully_shard`` itself works on CPU over gloo (torch 2.14.1) as on GPUs over NCCL, so one code
path serves both, and the 2-process CPU tests exercise the GPU path's logic.

What gets sharded: every module held in an ``nn.ModuleList`` (the transformer blocks of every family) is its own
FSDP unit (its parameters are gathered just before it runs and freed after), and the model itself is the root
unit holding the remaining parameters (embeddings, heads, norms). The trainer calls the model through ``loss`` /
``training_loss`` rather than ``forward``, and some families call a block's own methods before running it (VAR's
``block.modulation``); such methods gather their unit's parameters too (:func:`gather_for`).

No rank holds the whole model during training: parameters, gradients, optimizer moments and the EMA copy are
all sharded the same way (``DTensor`` shards). Whole tensors are assembled only for a checkpoint in the ``full``
format (tensor by tensor, kept on rank 0 only), for sample grids and for the final export; with
``train.fsdp.state_dict: sharded`` every rank writes its own shards with ``torch.distributed.checkpoint``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("visar.train")


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded_tensor(t: Any) -> bool:
    return isinstance(t, _dtensor())


def units(model: nn.Module) -> list[nn.Module]:
    """The FSDP units below the root: the entries of every ``nn.ModuleList`` that hold parameters (the transformer
    blocks of every family), outermost lists first (a list inside a unit stays part of it)."""
    found: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or any(name == f or name.startswith(f + ".") for f, _ in found):
            continue
        for i, entry in enumerate(mod):
            if any(True for _ in entry.parameters()):
                found.append((f"{name}.{i}" if name else str(i), entry))
    return [m for _, m in found]


def entry_methods(module: nn.Module) -> list[str]:
    """The public methods ``module``'s class defines (beyond ``nn.Module``'s own), other than ``forward``: the
    ways a family may call into a block besides calling it (VAR computes every block's AdaLN modulation with
    ``block.modulation(...)`` before running the blocks)."""
    import inspect

    base = set(dir(nn.Module))
    names = []
    for name in dir(type(module)):
        if name.startswith("_") or name in base:
            continue
        if inspect.isfunction(inspect.getattr_static(type(module), name, None)):
            names.append(name)
    return names


def gather_for(module: nn.Module, methods: list[str]) -> None:
    """Make ``methods`` of the FSDP unit ``module`` gather its parameters when called from outside (FSDP's
    ``register_fsdp_forward_method``), and run as they are when called from inside its own forward or from
    another of them (there the parameters are already gathered, and a nested call would free them early)."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    depth = [0]

    def enter(*_):
        depth[0] += 1

    def leave(*_):
        depth[0] -= 1

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)
    for name in methods:
        plain = getattr(module, name)
        register_fsdp_forward_method(module, name)
        gathered = getattr(module, name)

        def call(*args, _plain=plain, _gathered=gathered, **kwargs):
            if depth[0]:
                return _plain(*args, **kwargs)
            depth[0] += 1
            try:
                return _gathered(*args, **kwargs)
            finally:
                depth[0] -= 1

        setattr(module, name, call)


def shard_model(model: nn.Module, device: torch.device, world: int, sharding: str) -> nn.Module:
    """Shard ``model`` (in place; moved to ``device`` first) over the ``world`` processes of the default process
    group. ``sharding``: ``full`` (reshard after forward), ``shard_grad_op`` (keep gathered until backward) or
    ``no_shard`` (replicate: a ``world x 1`` mesh, DDP-like)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    if sharding == "no_shard":
        mesh = init_device_mesh(device.type, (world, 1), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    reshard = sharding == "full"
    blocks = units(model)
    for unit in blocks:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    for unit in blocks:
        gather_for(unit, entry_methods(unit))
    gather_for(model, [m for m in ("loss", "training_loss") if callable(getattr(model, m, None))])
    return model


def gather_full(state: dict[str, Any], keep: bool) -> dict[str, torch.Tensor]:
    """Whole CPU tensors of a state dict whose entries may be shards (every rank must call this, in the same
    order; ``keep``: whether this rank keeps the result, else ``{}`` is returned)."""
    out = {}
    for k, v in state.items():
        if is_sharded_tensor(v):
            v = v.full_tensor()
        if keep:
            out[k] = v.detach().cpu()
    return out


def gather_optimizer(optimizer: torch.optim.Optimizer, keep: bool) -> dict:
    """``optimizer.state_dict()`` with every moment assembled into a whole CPU tensor: the same format a
    non-sharded run writes (parameters numbered in optimizer order), so any run can resume it."""
    sd = optimizer.state_dict()
    state = {i: gather_full(s, keep) for i, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]} if keep else {}


def shard_like(full: torch.Tensor, like: Any) -> Any:
    """``full`` (the whole tensor, the same on every rank) as this rank's shard of ``like``'s layout; ``like``
    not sharded: ``full`` on ``like``'s device."""
    if not is_sharded_tensor(like):
        return full.to(device=like.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)  # every rank read the same file: slice locally, no traffic


def load_full_optimizer(optimizer: torch.optim.Optimizer, full: dict) -> None:
    """Load a whole (non-sharded) optimizer state into the optimizer of a sharded model."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, s in full["state"].items():
        p = params[int(i)]
        state[i] = {k: (shard_like(v, p) if k != "step" and isinstance(v, torch.Tensor) and v.shape == p.shape
                        else v) for k, v in s.items()}
    optimizer.load_state_dict({"state": state, "param_groups": full["param_groups"]})


def load_full_ema(ema, full: dict[str, torch.Tensor]) -> None:
    """Load a whole EMA state (a checkpoint's ``ema.safetensors``) into the sharded EMA ``ema``."""
    missing = set(ema.shadow) - set(full)
    if missing:
        raise KeyError(f"EMA state lacks {sorted(missing)[:5]}")
    for k, like in list(ema.shadow.items()):
        ema.shadow[k] = shard_like(full[k].to(like.dtype), like)


# ----------------------------------------------------------------------------------------------
# sharded checkpoints (torch.distributed.checkpoint): every rank writes and reads its own shards

SHARDED_DIR = "sharded"


def _dcp_state(model: nn.Module, ema, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "ema": dict(ema.shadow),
            "optimizer": get_optimizer_state_dict(model, optimizer)}


def save_sharded(folder: Path, model: nn.Module, ema, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the model, EMA and optimizer into ``folder/sharded`` (collective)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    dcp.save(_dcp_state(model, ema, optimizer), checkpoint_id=str(Path(folder) / SHARDED_DIR),
             no_dist=not dist.is_initialized())


def load_sharded(folder: Path, model: nn.Module, ema, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint into ``model``, ``ema`` and ``optimizer`` (sharded or not: the checkpoint is
    resharded to this run's layout, any number of processes)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _dcp_state(model, ema, optimizer)
    dcp.load(state, checkpoint_id=str(Path(folder) / SHARDED_DIR), no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"])
    for k, v in state["ema"].items():
        ema.shadow[k] = v
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def is_sharded_checkpoint(folder: Path) -> bool:
    return (Path(folder) / SHARDED_DIR / ".metadata").is_file()
