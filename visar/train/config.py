"""Training configuration: YAML files parsed into typed dataclasses, with ``key=value`` overrides.

Every key is checked before training starts: an unknown key or a value of the wrong type raises a
:class:`ConfigError` naming the dotted key (``optim.lr``), and a dataset path that does not exist says
so. Overrides use dotted keys and YAML values: ``train.steps=200 optim.betas=[0.9,0.95]``.

Example (``configs/shapes_vq.yaml``)::

    task: tokenizer
    model: {cls: "visar.tokenizers.vq:VQTokenizer", kwargs: {...}}
    data: {kind: shapes, size: 32}
    optim: {lr: 2.0e-4, warmup_steps: 100}
    train: {steps: 1500, batch_size: 32, output_dir: runs/shapes_vq}
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence


def task_names() -> list[str]:
    """The training tasks registered in :mod:`visar.train.tasks` (the one list config and trainer share)."""
    from visar.registry import names

    return names("task")


DATA_KINDS = ("shapes", "folder", "token_cache", "distill_shards")


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ConfigError(ValueError):
    """A configuration problem found before training starts."""


@dataclass
class ModelConfig:
    """The model being trained: a class path (``"module:Class"``) or a zoo preset, plus constructor kwargs."""

    cls: Optional[str] = None
    preset: Optional[str] = None
    kwargs: dict = field(default_factory=dict)
    #: fine-tuning: a ``.safetensors`` file of this model's weights (e.g. an export's
    #: ``tokenizer.safetensors`` or ``generator/model.safetensors``; the flat and the component-folder path of the
    #: same export are interchangeable) loaded strictly after the model is built; empty: random init
    init_from: str = ""
    #: parameter-name prefixes that train (e.g. ``[decoder, post_quant_conv]``: decoder-only fine-tuning
    #: of a VQ, which keeps its tokens); every other parameter is frozen. Empty: everything trains.
    trainable: list = field(default_factory=list)
    #: grow a trained model deeper (:mod:`visar.train.grow`): ``{blocks: trunk.blocks, zero:
    #: [attn.proj.weight, mlp.w2.weight]}`` loads ``init_from`` (fewer blocks) into this model with
    #: function-preserving new blocks; empty: ``init_from`` must match the model exactly
    init_deepen: dict = field(default_factory=dict)
    #: parameter-name prefixes that ``init_from`` does not provide (e.g. ``[cond_embed]``: start a
    #: text-conditioned model from a class-conditioned one): weights under them are dropped from the file and
    #: this model keeps its own initialisation there; every other parameter still loads strictly
    init_exclude: list = field(default_factory=list)


@dataclass
class DataConfig:
    """Training data.

    ``kind``: ``shapes`` (procedural, :mod:`visar.data.shapes`), ``folder`` (an ImageFolder tree at
    ``path``, ADM centre crop to ``size``), ``token_cache`` (shards written by
    :mod:`visar.data.token_cache` at ``path``; generator task only) or ``distill_shards`` (teacher pairs
    written by ``visar distill-data`` at ``path``, :mod:`visar.data.distill_shards`; distill task only).

    ``cache`` (shapes only): a ``.npy`` file that memoises the rendered images as 8-bit RGB (written
    once, atomically, by a pool of processes; later runs memory-map it). Speed only: rendering costs
    ~1 ms per 32 px image on one core, too slow to feed a GPU.

    ``label_repeat``: ``{class index or name: whole factor >= 1}`` lists every item of those classes that many
    times (oversampling; :mod:`visar.data.label_repeat`), e.g. ``{diamond: 2, hexagon: 2, heart: 2}`` on
    shapes. Names need a dataset with class names (shapes, folder); a token cache takes class indices.
    """

    kind: str = "shapes"
    size: int = 32
    length: int = 50_000
    split: str = "train"
    seed: int = 0
    path: Optional[str] = None
    flip: bool = False
    num_workers: int = 0
    cache: str = ""
    label_repeat: dict = field(default_factory=dict)


@dataclass
class TokenizerRef:
    """Frozen tokenizer of the generator task: a folder holding ``{name}.json`` + ``{name}.safetensors``."""

    path: Optional[str] = None
    name: str = "tokenizer"


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay; weight decay and EMA follow a selectable recipe."""

    lr: float = 3e-4
    weight_decay: float = 0.05
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    #: parameters without weight decay: ``official`` (the model's ``no_weight_decay()`` plus 1-D tensors and
    #: biases, each family's official rule) or ``legacy`` (visar's first name-based rule; a run whose checkpoints
    #: predate this key resumes with it automatically). See :mod:`visar.train.optim`.
    weight_decay_groups: str = "official"
    #: EMA recipe: ``warmup`` (``min(train.ema_decay, (1+t)/(10+t))``, float buffers averaged), ``constant``
    #: (``train.ema_decay`` from the first step, parameters only) or ``official`` (the family's rule and decay)
    ema: str = "warmup"


@dataclass
class SampleConfig:
    """Periodic sample grids: generator ``sample`` options (``cfg_scale``, ``temperature``, ...)."""

    labels: list = field(default_factory=lambda: list(range(10)))
    per_label: int = 2
    seed: int = 0
    options: dict = field(default_factory=dict)


#: values of ``train.fsdp.sharding`` and ``train.fsdp.state_dict``
FSDP_SHARDING = ("full", "shard_grad_op", "no_shard")
FSDP_STATE_DICTS = ("full", "sharded")


@dataclass
class FSDPConfig:
    """Sharded data parallelism (torch FSDP2 ``fully_shard`` over the processes Accelerate starts; see
    :mod:`visar.train.fsdp`). Off by default (plain DDP).

    ``sharding``: ``full`` (parameters, gradients and optimizer state sharded; parameters gathered for each
    block's forward and again for its backward, ZeRO-3), ``shard_grad_op`` (kept gathered between forward and
    backward, ZeRO-2-like: more memory, less communication) or ``no_shard`` (replicated, DDP-like).
    ``state_dict``: ``full`` (checkpoints gathered into the usual single-file format, rank 0 writes them; any
    number of processes, with or without FSDP, can resume them) or ``sharded`` (every rank writes its own
    shards with ``torch.distributed.checkpoint``; no rank ever holds the whole model; resumable on another
    number of processes). Exports are always whole models.
    """

    enabled: bool = False
    sharding: str = "full"
    state_dict: str = "full"


@dataclass
class LoopConfig:
    """The loop. ``batch_size`` is the global batch of one optimizer step (all processes, all
    accumulation micro-steps); it must be divisible by ``num_processes * grad_accum``."""

    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    mixed_precision: str = "no"
    seed: int = 0
    ema_decay: float = 0.999
    log_every: int = 50
    save_every: int = 500
    sample_every: int = 0
    keep_checkpoints: int = 2
    output_dir: str = "runs/default"
    resume: str = "auto"
    tensorboard: bool = False
    progress: bool = True
    #: torch CPU threads for this process (0: leave torch's default)
    threads: int = 0
    #: wall-clock budget in minutes (0: none); when spent, the run checkpoints, exports and stops early
    max_minutes: float = 0.0
    #: sharded training (FSDP2); off: DDP as before
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)


@dataclass
class TrainConfig:
    task: str = "generator"
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerRef = field(default_factory=TokenizerRef)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    #: where the final export goes (``Pipeline.save_pretrained`` folder for generators); empty (the default):
    #: ``<train.output_dir>/export``, so ``train.output_dir=runs/try`` moves the export with the run
    export_dir: str = ""
    #: maintainers only: allow ``export_dir`` (or ``train.output_dir``) inside the installed ``visar`` package,
    #: to refresh a bundled asset on purpose (``export_dir=visar/assets/classifier export_to_package=true``)
    export_to_package: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def export_path(self) -> Path:
        """Where the final export goes: ``export_dir``, else ``<train.output_dir>/export``."""
        return Path(self.export_dir) if self.export_dir else Path(self.train.output_dir) / "export"


# ----------------------------------------------------------------------------------------------

def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check ``value`` against a dataclass field type; ints are accepted (and converted) for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return True, None
        for a in args:
            if a is type(None):
                continue
            ok, v = _type_ok(value, a)
            if ok:
                return True, v
        return False, value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):  # YAML 1.1 reads "1e-3" as a string
            return True, float(value)
        return False, value
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    if tp in (list, dict):
        return isinstance(value, tp), value
    return True, value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, naming the dotted key of any unknown key or bad type."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got "
                          f"{type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]!s}; valid keys in "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in data.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = from_dict(tp, v if v is not None else {}, f"{prefix}{k}.")
            continue
        ok, conv = _type_ok(v, tp)
        if not ok:
            raise ConfigError(f"config key {prefix}{k} must be {_type_name(tp)}, got {v!r} "
                              f"({type(v).__name__})")
        kwargs[k] = conv
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested dict, in place."""
    import yaml

    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key=value (dotted keys, e.g. train.steps=100)")
        key, _, raw = ov.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override key {key!r} is not a dotted key like optim.lr")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {ov!r}: value is not valid YAML ({e})") from e
        node = data
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {ov!r}: {p} is not a section")
            node = node[p]
        node[parts[-1]] = value
    return data


def exists_or_pending(path: str | os.PathLike, pending: Sequence[str | os.PathLike], file: bool = False) -> bool:
    """Whether ``path`` exists (a file if ``file``), or lies in (or is) a folder of ``pending``: the outputs of
    earlier stages of a recipe, checked before those stages have run."""
    p = Path(path)
    if p.is_file() if file else p.exists():
        return True
    here = Path(os.path.normpath(p.absolute()))
    for q in pending:
        q = Path(os.path.normpath(Path(q).absolute()))
        if here == q or q in here.parents:
            return True
    return False


def validate(cfg: TrainConfig, will_exist: Sequence[str | os.PathLike] = ()) -> TrainConfig:
    """Semantic checks that need more than types (choices, ranges, paths). ``will_exist``: folders that do
    not exist yet but will when the run starts (a recipe's earlier stages); paths inside them pass."""
    t, d, o = cfg.train, cfg.data, cfg.optim
    tasks = task_names()
    if cfg.task not in tasks:
        raise ConfigError(f"config key task must be one of {', '.join(tasks)}, got {cfg.task!r}")
    if (cfg.model.cls is None) == (cfg.model.preset is None):
        raise ConfigError("config section model needs exactly one of model.cls ('module:Class') or model.preset")
    if cfg.model.cls is not None and ":" not in cfg.model.cls:
        raise ConfigError(f"config key model.cls must look like 'visar.tokenizers.vq:VQTokenizer', got "
                          f"{cfg.model.cls!r}")
    if cfg.model.init_from:
        if not cfg.model.init_from.endswith(".safetensors"):
            raise ConfigError(f"config key model.init_from must name a .safetensors file (e.g. an export's "
                              f"tokenizer.safetensors), got {cfg.model.init_from!r}")
        if not exists_or_pending(cfg.model.init_from, will_exist, file=True):
            other = other_layout_weights(cfg.model.init_from)
            if other is None:
                raise ConfigError(f"model.init_from={cfg.model.init_from} does not exist (run the training that "
                                  "writes it first, or pass model.init_from=path/to/weights.safetensors; a generator "
                                  "export holds its weights in export/generator/model.safetensors, older ones in "
                                  "export/generator.safetensors)")
            import logging

            logging.getLogger("visar.train").info("model.init_from: %s is not there; reading the same export's "
                                                  "weights at %s", cfg.model.init_from, other)
            cfg.model.init_from = str(other)  # the same export in the other layout (the trainer reads this file)
    if cfg.model.init_exclude and not cfg.model.init_from:
        raise ConfigError("config key model.init_exclude needs model.init_from (the weights it filters)")
    if not all(isinstance(x, str) and x for x in cfg.model.init_exclude):
        raise ConfigError(f"config key model.init_exclude must be a list of parameter-name prefixes, "
                          f"got {cfg.model.init_exclude!r}")
    deepen = cfg.model.init_deepen
    if deepen:
        if not cfg.model.init_from:
            raise ConfigError("config key model.init_deepen needs model.init_from (the shallower model's weights)")
        if set(deepen) != {"blocks", "zero"} or not isinstance(deepen["blocks"], str) or not (
                isinstance(deepen["zero"], list) and deepen["zero"] and all(isinstance(z, str) for z in deepen["zero"])):
            raise ConfigError("config key model.init_deepen must be {blocks: <dotted block list, e.g. trunk.blocks>, "
                              f"zero: [<block parameter suffixes, e.g. attn.proj.weight>]}}, got {deepen!r}")
    if not all(isinstance(x, str) and x for x in cfg.model.trainable):
        raise ConfigError(f"config key model.trainable must be a list of parameter-name prefixes such as "
                          f"[decoder, post_quant_conv], got {cfg.model.trainable!r}")
    if d.kind not in DATA_KINDS:
        raise ConfigError(f"config key data.kind must be one of {', '.join(DATA_KINDS)}, got {d.kind!r}")
    if d.kind in ("folder", "token_cache", "distill_shards"):
        if not d.path:
            raise ConfigError(f"config key data.path is required for data.kind={d.kind}")
        if not exists_or_pending(d.path, will_exist):
            hint = {"token_cache": " (write it with visar.data.token_cache.build_token_cache)",
                    "distill_shards": " (write it with `visar distill-data --teacher PIPELINE_DIR --num N --out DIR`)"}
            raise ConfigError(f"dataset path data.path={d.path} does not exist" + hint.get(d.kind, ""))
    if d.kind == "token_cache" and cfg.task != "generator":
        raise ConfigError("data.kind=token_cache holds tokens: it only feeds task=generator")
    if (d.kind == "distill_shards") != (cfg.task == "distill"):
        raise ConfigError("task=distill trains on teacher pairs, data.kind=distill_shards (made by `visar "
                          f"distill-data`), and those pairs feed only task=distill; got task={cfg.task}, "
                          f"data.kind={d.kind}")
    if cfg.task == "generator":
        _check_tokenizer_path(cfg, will_exist)
    if d.label_repeat:
        if d.kind == "distill_shards":
            raise ConfigError("config key data.label_repeat does not apply to data.kind=distill_shards (teacher "
                              "pairs carry no class to oversample)")
        from visar.data.label_repeat import resolve_repeats
        from visar.data.shapes import CLASSES

        names = CLASSES if d.kind == "shapes" else None
        # a folder's class names are known only once it is scanned: those keys are checked when it is built
        keys = {k: v for k, v in d.label_repeat.items() if names is not None or not isinstance(k, str)}
        try:
            resolve_repeats(keys, names)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    if d.cache and d.kind != "shapes":
        raise ConfigError(f"config key data.cache only applies to data.kind=shapes (got data.kind={d.kind})")
    if t.max_minutes < 0:
        raise ConfigError(f"config key train.max_minutes must be >= 0 (0: no limit), got {t.max_minutes}")
    if d.size < 8 or d.length < 1 or d.num_workers < 0:
        raise ConfigError("data.size must be >= 8, data.length >= 1 and data.num_workers >= 0")
    if t.steps < 1 or t.batch_size < 1 or t.grad_accum < 1:
        raise ConfigError("train.steps, train.batch_size and train.grad_accum must be >= 1")
    if t.mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"config key train.mixed_precision must be no, bf16 or fp16, got {t.mixed_precision!r}")
    _check_fsdp(cfg)
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"config key train.ema_decay must be in [0, 1), got {t.ema_decay}")
    if t.keep_checkpoints < 1:
        raise ConfigError("train.keep_checkpoints must be >= 1 (the previous checkpoint is kept until the "
                          "new one is complete)")
    if o.lr <= 0 or o.weight_decay < 0 or o.warmup_steps < 0 or not 0 <= o.min_lr_ratio <= 1 or o.grad_clip < 0:
        raise ConfigError("optim: lr > 0, weight_decay >= 0, warmup_steps >= 0, 0 <= min_lr_ratio <= 1, "
                          "grad_clip >= 0 (0 disables clipping)")
    if len(o.betas) != 2:
        raise ConfigError(f"config key optim.betas must be a list of two floats, got {o.betas!r}")
    from visar.train.optim import DECAY_RULES, EMA_RULES

    if o.weight_decay_groups not in DECAY_RULES:
        raise ConfigError(f"config key optim.weight_decay_groups must be one of {', '.join(DECAY_RULES)}, got "
                          f"{o.weight_decay_groups!r}")
    if o.ema not in EMA_RULES:
        raise ConfigError(f"config key optim.ema must be one of {', '.join(EMA_RULES)}, got {o.ema!r}")
    _check_outside_package(cfg)
    return cfg


def _check_tokenizer_path(cfg: TrainConfig, will_exist: Sequence[str | os.PathLike]) -> None:
    """``tokenizer.path`` (task ``generator``) holds the frozen tokenizer in either save layout: a flat export
    (``<name>.json`` + ``<name>.safetensors``, what ``visar train`` writes for task ``tokenizer``), a pipeline
    folder (its ``<name>/`` component folder, e.g. a generator export) or the component folder itself; or it
    lies in a folder an earlier recipe stage will write."""
    from visar.utils.config import describe_missing, find_saved

    t = cfg.tokenizer
    if not t.path:
        raise ConfigError("task=generator needs tokenizer.path: a folder with the frozen tokenizer (a tokenizer "
                          "export: tokenizer.json + tokenizer.safetensors, or a pipeline folder / component folder "
                          "holding tokenizer/config.json)")
    if find_saved(t.path, t.name) is None and not exists_or_pending(Path(t.path) / f"{t.name}.json", will_exist,
                                                                    file=True):
        raise ConfigError(f"tokenizer.path={t.path} holds {describe_missing(t.path, t.name)}, and is not itself a "
                          "component folder (config.json); train the tokenizer first and give its export folder, or "
                          "a pipeline folder (tokenizer.name: the component to use)")


def other_layout_weights(path: str | os.PathLike) -> Path | None:
    """The weights a missing ``model.init_from`` file names, in the other save layout, when they exist there:
    ``<dir>/<name>.safetensors`` (a flat export, e.g. ``export/generator.safetensors``) <->
    ``<dir>/<name>/model.safetensors`` (a component folder, e.g. ``export/generator/model.safetensors`` of a
    pipeline saved in format version 3). Only files holding the module's own state dict count (a KL tokenizer's
    diffusers folder does not); ``None`` otherwise."""
    from visar.utils.config import CONFIG_NAME, WEIGHTS_NAME, read_json

    p = Path(path)
    if p.suffix != ".safetensors":
        return None
    if p.name == WEIGHTS_NAME:  # component-folder path given, flat files there
        flat = p.parent.with_suffix(".safetensors")
        return flat if flat.is_file() and flat.with_suffix(".json").is_file() else None
    folder = p.with_suffix("")
    weights = folder / WEIGHTS_NAME
    if not (weights.is_file() and (folder / CONFIG_NAME).is_file()):
        return None
    try:
        meta = read_json(folder / CONFIG_NAME).get("_visar") or {}
    except (ValueError, OSError, AttributeError):
        return None
    return weights if meta.get("weights", WEIGHTS_NAME) == WEIGHTS_NAME else None


def _check_fsdp(cfg: TrainConfig) -> None:
    f = cfg.train.fsdp
    if f.sharding not in FSDP_SHARDING:
        raise ConfigError(f"config key train.fsdp.sharding must be one of {', '.join(FSDP_SHARDING)}, got "
                          f"{f.sharding!r}")
    if f.state_dict not in FSDP_STATE_DICTS:
        raise ConfigError(f"config key train.fsdp.state_dict must be one of {', '.join(FSDP_STATE_DICTS)}, got "
                          f"{f.state_dict!r}")
    if not f.enabled:
        return
    if cfg.task == "tokenizer":
        raise ConfigError("train.fsdp.enabled=true does not apply to task=tokenizer: tokenizers change their own "
                          "parameters outside the optimizer (VQ dead-code restarts), which sharded parameters would "
                          "lose; train tokenizers with DDP (train.fsdp.enabled=false)")
    if cfg.train.mixed_precision == "fp16":
        raise ConfigError("train.fsdp.enabled=true with train.mixed_precision=fp16 is not supported (fp16 needs a "
                          "gradient scaler over sharded gradients); use train.mixed_precision=bf16")


def _check_outside_package(cfg: TrainConfig) -> None:
    """Nothing a user runs writes inside the installed package (a run would silently replace a shipped asset)."""
    from visar.utils.io import inside_package, package_root

    if cfg.export_to_package:
        return
    for key, path in (("train.output_dir", Path(cfg.train.output_dir)), ("export_dir", cfg.export_path())):
        if inside_package(path):
            raise ConfigError(f"{key}={path} lies inside the installed visar package ({package_root()}); a run "
                              "must not overwrite shipped files. Use a folder under runs/ (the default export is "
                              "<train.output_dir>/export); maintainers refreshing a bundled asset add "
                              "export_to_package=true")


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None,
                data: dict | None = None, will_exist: Sequence[str | os.PathLike] = ()) -> TrainConfig:
    """Read a YAML config (or take ``data``), apply ``key=value`` overrides, type-check and validate
    (``will_exist``: see :func:`validate`)."""
    import yaml

    if data is None:
        if path is None:
            raise ConfigError("give a YAML config path")
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from e
    data = apply_overrides(copy.deepcopy(data), list(overrides or []))
    return validate(from_dict(TrainConfig, data), will_exist)
