"""``visar distill-data``: (noise, teacher tokens) pairs for Distilled Decoding, made with the teacher map.

Distilled Decoding (Liu et al. 2024, arXiv 2412.17153) trains a student on pairs ``(eps, q)`` where ``q`` is
what the teacher's flow map makes of the noise sequence ``eps [L, C]`` (guidance and filters baked in, Heun with
16 steps by default). No training images are needed: one teacher generation per pair. The teacher map follows
the teacher's kind:

* next-token (LlamaGen): :class:`~visar.samplers.flow_map.FlowMapSampler`, ``L`` tokens in raster order;
* next-scale (VAR): :class:`~visar.samplers.flow_map.NextScaleFlowMapSampler`, ``L = sum pn^2`` tokens of all
  scales concatenated (scale 0 first), the noise in the same order.

The protocol follows :mod:`visar.eval.sampling` (its seed and label helpers are reused):

* **Seed rule** (:data:`SEED_RULE`): pair ``i``'s label and noise are pure functions of ``(seed, i)``, so the
  data do not depend on the batch size, the shard size or the number of processes.
* **Shards** of ``shard_size`` pairs, named by index (:func:`visar.data.distill_shards.shard_name`), written
  atomically; shard ``k`` goes to process ``k % P`` of the shards still missing.
* **Resume.** A re-run skips the shards on disk. The manifest records the settings (teacher weights hash, the
  teacher-map options, ``num``, ``shard_size``, ``seed``, label rule, shapes); a folder made with other
  settings is refused instead of mixed.
* Runs under Accelerate: one process as is; launched by ``accelerate launch`` / ``torchrun`` it shards over
  the processes; :func:`launch` with ``num_processes > 1`` starts them itself (``notebook_launcher``; CPU:
  gloo).

The on-disk format is documented in :mod:`visar.data.distill_shards` and ``docs/distillation.md``.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from visar.conditions import Condition
from visar.data.distill_shards import (CODEBOOK_NAME, FORMAT, MANIFEST_NAME, VERSION, num_shards, read_manifest,
                                       shard_name)
from visar.eval.io import remove_stale_temporaries
from visar.eval.sampling import LABEL_MODES, _hash63, _make_accelerator, _resolve_pipeline, labels_range, \
    weights_state_sha256
from visar.generators.protocol import NextScaleModel
from visar.samplers.flow_map import FlowMapSampler, NextScaleFlowMapSampler, codebook_of
from visar.utils.io import atomic_write_bytes, save_safetensors

log = logging.getLogger("visar.train")

#: the teacher-map options recorded in the manifest (the flow-map sampler's; the rest it sets itself), per kind
TEACHER_OPTIONS = ("cfg_scale", "cfg_interval", "temperature", "top_k", "top_p", "num_flow_steps", "solver")
#: VAR's teacher map (:class:`NextScaleFlowMapSampler`): VAR's guidance ramp and filters, no temperature
NEXT_SCALE_TEACHER_OPTIONS = ("cfg_scale", "top_k", "top_p", "num_flow_steps", "solver")

SEED_RULE = ("pair i: label = visar.eval.sampling.labels_range(labels, i, i + 1, num_classes, seed)[0] "
             "(balanced: i % num_classes; random: a hash of (seed, i)); noise = torch.randn(L, C, "
             "generator=torch.Generator('cpu').manual_seed(s_i)) in float32 with s_i = int.from_bytes("
             "sha256(f'visar-distill:{seed}:{i}')[:8], 'little') >> 1; tokens = FlowMapSampler(options) of that "
             "noise for that label with the teacher (codebook: the tokenizer's codebook(), stored in "
             "codebook.safetensors)")
#: the seed rule of next-scale (VAR) teachers: the same labels and noise, over all scales' tokens
NEXT_SCALE_SEED_RULE = (SEED_RULE.replace("FlowMapSampler(options)", "NextScaleFlowMapSampler(options)")
                        .replace("the tokenizer's codebook()", "the quantizer's embedding.weight")
                        + "; L = sum of pn^2 over the scales, the noise and tokens of the scales concatenated coarse "
                        "to fine (scale 0 first, row-major within a scale)")


def pair_seed(seed: int, index: int) -> int:
    """The 63-bit seed of pair ``index``'s noise (see :data:`SEED_RULE`)."""
    return _hash63(f"visar-distill:{seed}:{index}")


def pair_noise(seed: int, start: int, stop: int, num_tokens: int, codebook_dim: int) -> torch.Tensor:
    """Noise of pairs ``start .. stop-1``: ``[stop - start, L, C]`` float32 on the CPU (see :data:`SEED_RULE`)."""
    g = torch.Generator("cpu")
    out = torch.empty(stop - start, num_tokens, codebook_dim)
    for j, i in enumerate(range(start, stop)):
        g.manual_seed(pair_seed(seed, i))
        out[j] = torch.randn(num_tokens, codebook_dim, generator=g)
    return out


def _sha256_tensor(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def _check_args(num: Any, seed: Any, shard_size: Any, batch_size: Any, labels: Any) -> None:
    for name, v, low in (("num", num, 1), ("seed", seed, 0), ("shard_size", shard_size, 1),
                         ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")


def teacher_kind(generator: Any) -> str:
    """``"next_scale"`` for a VAR-like teacher (the :class:`NextScaleModel` protocol, emitting logits), else
    ``"next_token"``."""
    if isinstance(generator, NextScaleModel) and getattr(generator, "emits", None) == "logits":
        return "next_scale"
    return "next_token"


def teacher_sampler(generator: Any) -> FlowMapSampler | NextScaleFlowMapSampler:
    """The teacher-map sampler of ``generator``'s kind, checked against it."""
    sampler = NextScaleFlowMapSampler() if teacher_kind(generator) == "next_scale" else FlowMapSampler()
    sampler.check_model(generator)
    return sampler


def teacher_options(pipe: Any, sampler: FlowMapSampler | NextScaleFlowMapSampler, codebook: torch.Tensor,
                    options: dict) -> dict:
    """The teacher-map options really used: the call's over the pipeline's stored defaults (e.g. the bundled
    model's cfg) over the flow-map sampler's; validated. Only :data:`TEACHER_OPTIONS` (next-token) or
    :data:`NEXT_SCALE_TEACHER_OPTIONS` (VAR) may be given."""
    scale = isinstance(sampler, NextScaleFlowMapSampler)
    allowed = NEXT_SCALE_TEACHER_OPTIONS if scale else TEACHER_OPTIONS
    other = sorted(set(options) - set(allowed))
    if other:
        raise ValueError(f"distill-data takes the teacher-map options {', '.join(allowed)} for this "
                         f"{'next-scale' if scale else 'next-token'} teacher; it sets {', '.join(other)} itself or "
                         "does not use them")
    extra = {} if scale else {"codebook": codebook}  # the VAR map reads the bound quantizer's codebook
    resolved = sampler.resolve({**pipe.options_for(sampler, options), **extra})
    return {k: resolved[k] for k in allowed}


def flat_tokens(tokens: Any, batch: int, num_tokens: int) -> torch.Tensor:
    """A teacher sampler's tokens (``[B, h, w]``, or VAR's list of ``[B, pn, pn]``) -> ``LongTensor [B, L]`` on
    the CPU, scales concatenated coarse to fine."""
    if isinstance(tokens, (list, tuple)):
        tokens = torch.cat([t.reshape(batch, -1) for t in tokens], 1)
    return tokens.reshape(batch, num_tokens).long().cpu()


def make_distill_data(teacher: Any, out_dir: str | os.PathLike, num: int, *, seed: int = 0, shard_size: int = 1024,
                      batch_size: int = 64, labels: str = "balanced", progress: bool = True, accelerator: Any = None,
                      **options: Any) -> dict:
    """Write ``num`` teacher pairs into ``out_dir`` (see the module docstring); returns the manifest.

    Args:
        teacher: a :class:`visar.Pipeline` of a class-conditional next-token model (LlamaGen) with its VQ
            tokenizer or of a VAR model with its multi-scale tokenizer, a bundled model name
            (``shapes-llamagen``) or a pipeline folder.
        out_dir: output folder; re-using it resumes (same settings) or is refused (other settings).
        num: number of pairs.
        seed: seed of the set (see :data:`SEED_RULE`).
        shard_size: pairs per shard file (part of the settings).
        batch_size: pairs per teacher call (speed only, not recorded as a setting).
        labels: ``"balanced"`` (pair ``i`` has class ``i % num_classes``) or ``"random"``.
        progress: a tqdm bar of the pairs this process makes.
        accelerator: an ``accelerate.Accelerator``; ``None``: one is made when launched distributed
            (``WORLD_SIZE > 1``), else this process does everything.
        **options: teacher-map options (:data:`TEACHER_OPTIONS`: ``cfg_scale``, ``cfg_interval``,
            ``temperature``, ``top_k``, ``top_p``, ``num_flow_steps``, ``solver``; VAR:
            :data:`NEXT_SCALE_TEACHER_OPTIONS`); unset ones come from the pipeline's stored defaults, then the
            sampler's.
    """
    _check_args(num, seed, shard_size, batch_size, labels)
    from visar.utils.io import check_writable_dir, inside_package

    out = check_writable_dir(out_dir, "--out")
    if inside_package(out):
        raise ValueError(f"--out {out} lies inside the installed visar package; write the pairs elsewhere (runs/...)")
    acc = accelerator if accelerator is not None else _make_accelerator(teacher)
    rank, world = acc.process_index, acc.num_processes
    pipe, name, folder, file_hashes = _resolve_pipeline(teacher, acc.device)
    gen = pipe.generator
    sampler = teacher_sampler(gen)
    kind = teacher_kind(gen)
    if getattr(gen, "text_conditional", False) or not getattr(gen, "num_classes", 0):
        raise ValueError(f"distill-data needs a class-conditional teacher; {name} is not")
    codebook = codebook_of(pipe.tokenizer).float().cpu()
    V, C = codebook.shape
    scales = [int(pn) for pn in gen.scales] if kind == "next_scale" else None
    L = sum(pn * pn for pn in scales) if scales else int(gen.num_tokens)
    K = int(gen.num_classes)
    opts = teacher_options(pipe, sampler, codebook, options)

    import visar

    settings = {"teacher_sha256": weights_state_sha256(pipe), "teacher_generator": gen.config_dict(),
                "teacher_tokenizer": pipe.tokenizer.config_dict(), "options": opts, "num": num,
                "shard_size": shard_size, "seed": seed, "labels": labels, "num_classes": K,
                "seed_rule": NEXT_SCALE_SEED_RULE if scales else SEED_RULE, "kind": kind, "num_tokens": L,
                "grid_size": scales[-1] if scales else int(getattr(gen, "grid_size", 0)), "scales": scales,
                "vocab_size": int(V),
                "codebook_dim": int(C), "codebook_sha256": _sha256_tensor(codebook)}
    settings = json.loads(json.dumps(settings))  # as it reads back from disk (tuples -> lists)
    n_shards = num_shards(num, shard_size)
    manifest = {"format": FORMAT, "version": VERSION, "settings": settings, "num_shards": n_shards,
                "complete": False, "teacher": name, "teacher_path": folder, "teacher_files": file_hashes,
                "batch_size": batch_size, "num_processes": world, "visar_version": visar.__version__,
                "torch_version": torch.__version__}

    # every process reads the same state before anyone writes, so all agree on errors and on the work
    if (out / MANIFEST_NAME).is_file():
        old = read_manifest(out)["settings"]
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise ValueError(f"{out} holds distill data made with other settings ({', '.join(diff)} differ); use a "
                             "new --out folder (or delete this one) instead of mixing pairs")
    elif any(out.glob("shard_*.safetensors")):
        raise ValueError(f"{out} holds shards but no {MANIFEST_NAME}: refusing to mix them with new pairs; use an "
                         "empty --out folder")
    todo = [k for k in range(n_shards) if not (out / shard_name(k)).is_file()]
    acc.wait_for_everyone()
    if acc.is_main_process:
        if removed := remove_stale_temporaries(out):
            log.info("removed %d partial files left by an interrupted run", removed)
        save_safetensors({"codebook": codebook}, out / CODEBOOK_NAME)
        atomic_write_bytes(out / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
        log.info("distill data: %d pairs in %d shards (%d to make) with %d process(es) into %s",
                 num, n_shards, len(todo), world, out)
    acc.wait_for_everyone()

    mine = todo[rank::world]
    from tqdm.auto import tqdm

    def count(k: int) -> int:
        return min(num, (k + 1) * shard_size) - k * shard_size

    bar = tqdm(total=sum(count(k) for k in mine), disable=not (progress and acc.is_local_main_process),
               desc=f"teacher pairs (rank {rank})", unit="pair")
    device = next(gen.parameters()).device
    for k in mine:
        a, b = k * shard_size, k * shard_size + count(k)
        noise = pair_noise(seed, a, b, L, C)
        classes = labels_range(labels, a, b, K, seed)
        tokens = []
        for s in range(0, b - a, batch_size):
            e = min(b - a, s + batch_size)
            cond = Condition(labels=classes[s:e].to(device))
            extra = {} if kind == "next_scale" else {"codebook": codebook.to(device)}
            q = sampler(gen, cond, None, noise=noise[s:e].to(device), **extra, **opts)
            tokens.append(flat_tokens(q, e - s, L))
            bar.update(e - s)
        save_safetensors({"noise": noise, "tokens": torch.cat(tokens), "labels": classes.long()},
                         out / shard_name(k), metadata={"format": FORMAT, "index": str(k), "start": str(a)})
    bar.close()
    acc.wait_for_everyone()
    if acc.is_main_process:
        missing = [k for k in range(n_shards) if not (out / shard_name(k)).is_file()]
        if missing:
            raise RuntimeError(f"{len(missing)} shards missing after the run (first: {missing[:5]}); re-run the same "
                               "command to resume")
        manifest["complete"] = True
        atomic_write_bytes(out / MANIFEST_NAME, json.dumps(manifest, indent=1).encode())
    acc.wait_for_everyone()
    return read_manifest(out)


def _worker(kwargs: dict, threads: int) -> None:
    from accelerate import Accelerator

    if threads:
        torch.set_num_threads(threads)
    make_distill_data(accelerator=Accelerator(cpu=not torch.cuda.is_available()), **kwargs)


def launch(num_processes: int = 1, threads: int = 0, **kwargs: Any) -> dict:
    """:func:`make_distill_data` over ``num_processes`` processes (Accelerate's ``notebook_launcher``; on CPU
    they use gloo). In a process already launched distributed, or with one process, it runs here.
    ``threads``: torch CPU threads per process (0: torch's default). Returns the manifest."""
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be an int >= 1, got {num_processes!r}")
    if num_processes == 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if threads:
            torch.set_num_threads(threads)
        return make_distill_data(**kwargs)
    from accelerate import notebook_launcher

    from visar.train.launch import _free_port

    _check_args(kwargs.get("num"), kwargs.get("seed", 0), kwargs.get("shard_size", 1024),
                kwargs.get("batch_size", 64), kwargs.get("labels", "balanced"))
    notebook_launcher(_worker, args=(kwargs, threads), num_processes=num_processes, use_port=str(_free_port()))
    return read_manifest(Path(kwargs["out_dir"]))


__all__ = ["SEED_RULE", "NEXT_SCALE_SEED_RULE", "TEACHER_OPTIONS", "NEXT_SCALE_TEACHER_OPTIONS", "pair_seed",
           "pair_noise", "teacher_kind", "teacher_sampler", "teacher_options", "flat_tokens", "make_distill_data",
           "launch"]
