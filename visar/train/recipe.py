"""Multi-stage training recipes: ``visar train recipes/NAME.yaml`` runs stages in order, each resumable.

A recipe is one YAML file::

    name: shapes-llamagen                  # default: the file name; outputs go to runs/<name> (--out)
    description: ...                       # free text
    overrides: [train.max_minutes=0]       # applied to every training stage, before the stage's own
    result: ${stages.gpt.export}           # printed when the recipe has finished (optional)
    stages:
      - name: vq                           # [A-Za-z0-9_-]+, unique; the stage's folder is <run>/<name>
        train: configs/shapes_vq.yaml      # a training config ...
        overrides: [train.steps=1200]      # ... with key=value overrides (visar train CONFIG key=value ...)
      - name: tokens
        tokenize: {tokenizer: "${stages.vq.export}", data: shapes, size: 32, length: 200000, seed: 1}
                                           # the options of `visar tokenize` (long names, - or _; --out is the
                                           # stage's folder); flags (flip, quiet) take true/false
      - name: gpt
        train: configs/shapes_gpt.yaml
        overrides: [tokenizer.path=${stages.vq.export}, data.path=${stages.tokens}]

``${run}`` is the run folder, ``${stages.NAME}`` an earlier stage's folder, ``${stages.NAME.export}`` an
earlier training stage's export folder and ``${stages.NAME.ema}`` the EMA weights of its last checkpoint (one
``.safetensors`` file holding what its export holds, for ``model.init_from``). A training stage writes to
``<run>/<name>`` (``train.output_dir``) and ``<run>/<name>/export`` (``export_dir``); the recipe sets both, so no stage writes where its config says
(``runs/...``, or inside the package). ``continues: NAME`` makes a training stage use NAME's folder instead,
resuming its checkpoint (a run done in two parts, e.g. 600 steps then the same config to 1200).
Key=value arguments given on the command line apply to every training stage, after its own overrides.

Relative config paths are looked up in the current folder, then in the folder above the recipe's (so
``recipes/x.yaml`` finds the ``configs/`` of the same checkout).

**Checked first.** The whole recipe is read and every stage's config is loaded with its overrides before any
stage runs (an unknown stage kind or key, a missing config, a bad override, a reference to a stage that does
not come earlier, a missing input that no earlier stage writes: one ``ERROR`` line, exit status 2). Paths that
earlier stages will write pass this check.

**Resumable.** When a stage finishes (a training stage's newest checkpoint has reached ``train.steps`` and its
export is written; a token cache's ``index.json`` says complete), a marker ``<run>/recipe/done/<name>.json``
records its resolved settings and the markers of the stages it read. A rerun skips finished stages; an
interrupted training stage resumes from its newest checkpoint and an interrupted token cache from its last
shard. A finished stage whose settings have changed since, or that read the outputs of a stage that has been
redone, is not silently reused or overwritten: the run refuses before starting, naming the stages to delete.
A training stage stopped by ``train.max_minutes`` ends the recipe with exit status 3 (rerun to continue).

``--dry-run`` prints every stage, its command line and whether it would run; ``--stages a,b`` runs only those
stages and ``--from NAME`` the stages from NAME on (their inputs must exist).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import shlex
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from visar.train.config import ConfigError, TrainConfig, load_config

log = logging.getLogger("visar.train")

#: keys of a recipe file and of one stage
RECIPE_KEYS = ("name", "description", "overrides", "result", "stages")
STAGE_KEYS = ("name", "train", "tokenize", "overrides", "continues")
#: what a stage does (exactly one key of these per stage)
STAGE_KINDS = ("train", "tokenize")
#: the options of ``visar tokenize`` a tokenize stage may set, and their types (``--out`` is the stage folder);
#: tests/test_train_recipe.py checks this list against the command's parser
TOKENIZE_OPTIONS: dict[str, type] = {
    "tokenizer": str, "name": str, "data": str, "path": str, "size": int, "length": int, "split": str, "seed": int,
    "cache": str, "flip": bool, "batch_size": int, "text_encoder": str, "text_max_length": int,
    "exclude_caption": list, "device": str, "threads": int, "quiet": bool}
#: settings that change speed or bookkeeping, not a stage's result: changing them does not make a finished
#: stage "changed"
SPEED_ONLY = {"train.threads", "train.progress", "train.log_every", "train.tensorboard", "train.max_minutes",
              "train.keep_checkpoints", "train.save_every", "train.sample_every", "train.resume", "data.num_workers",
              "tokenize.batch_size", "tokenize.threads", "tokenize.device", "tokenize.quiet"}
#: exit status of a recipe that stopped because a stage ran out of its ``train.max_minutes``
EXIT_UNFINISHED = 3

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_REF_RE = re.compile(r"\$\{([^}]*)\}")


class RecipeError(ConfigError):
    """A recipe problem found before any stage runs (one ``ERROR`` line, exit status 2)."""


@dataclass
class Stage:
    """One stage of a recipe, with its placeholders resolved."""

    index: int
    name: str
    kind: str                                   # "train" | "tokenize"
    folder: Path                                # <run>/<name> (or the folder of the stage it continues)
    config: Path | None = None                  # train: the config file
    overrides: list[str] = field(default_factory=list)   # train: every override, the recipe's folders last
    options: dict = field(default_factory=dict)          # tokenize: visar tokenize options (without out)
    continues: str | None = None
    deps: list[str] = field(default_factory=list)        # stages whose outputs this one reads
    cfg: TrainConfig | None = None              # train: the loaded config

    @property
    def export(self) -> Path:
        return self.folder / "export"

    @property
    def ema(self) -> Path:
        """The EMA weights of the stage's last checkpoint: the weights its export holds, as one
        ``.safetensors`` file (what ``model.init_from`` of a later stage takes)."""
        from visar.train.checkpoint import step_dir_name

        return self.folder / "checkpoints" / step_dir_name(self.cfg.train.steps) / "ema.safetensors"

    def command(self) -> list[str]:
        """The command line that runs this stage alone (without the launcher flags)."""
        if self.kind == "train":
            return ["visar", "train", str(self.config), *self.overrides]
        return ["visar", "tokenize", *tokenize_args(self.options), "--out", str(self.folder)]

    def spec(self) -> dict:
        """The resolved settings that decide this stage's result (flattened, speed-only keys left out)."""
        flat = _flatten(self.cfg.to_dict()) if self.kind == "train" else _flatten({"tokenize": self.options})
        return json.loads(json.dumps({k: v for k, v in flat.items() if k not in SPEED_ONLY}, default=str))

    def finished_outputs(self) -> bool:
        """Whether this stage's outputs are complete on disk (the marker aside)."""
        if self.kind == "tokenize":
            try:
                return bool(json.loads((self.folder / "index.json").read_text()).get("complete"))
            except (OSError, ValueError):
                return False
        step = checkpoint_step(self.folder)
        exported = (self.export / "pipeline.json").is_file() or (self.export / f"{self.cfg.task}.json").is_file()
        return step is not None and step >= self.cfg.train.steps and exported


@dataclass
class Recipe:
    name: str
    path: Path
    run: Path
    stages: list[Stage]
    result: str = ""
    description: str = ""

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    @property
    def marker_dir(self) -> Path:
        return self.run / "recipe" / "done"

    def marker(self, stage: Stage) -> dict | None:
        try:
            return json.loads((self.marker_dir / f"{stage.name}.json").read_text())
        except (OSError, ValueError):
            return None


def is_recipe(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a recipe file (a YAML mapping with ``stages``) rather than a training config."""
    import yaml

    p = Path(path)
    if not p.is_file() or p.suffix not in (".yaml", ".yml"):
        return False
    try:
        text = p.read_text()
        data = yaml.safe_load(text)
    except OSError:
        return False
    except yaml.YAMLError:  # a broken recipe is still a recipe (load_recipe names the YAML error)
        return re.search(r"(?m)^stages\s*:", text) is not None
    return isinstance(data, dict) and "stages" in data


def tokenize_args(options: dict) -> list[str]:
    """``visar tokenize`` arguments for a tokenize stage's options (``flip: true`` -> ``--flip``; lists repeat)."""
    out: list[str] = []
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out += [flag] if v else []
        elif isinstance(v, list):
            for x in v:
                out += [flag, str(x)]
        else:
            out += [flag, str(v)]
    return out


def checkpoint_step(folder: Path) -> int | None:
    """Step of the newest complete checkpoint under ``folder/checkpoints`` (``None``: none)."""
    from visar.train.checkpoint import PREFIX, find_latest

    latest = find_latest(folder / "checkpoints")
    return int(latest.name[len(PREFIX):]) if latest is not None else None


# ----------------------------------------------------------------------------------------------
# reading and checking

def load_recipe(path: str | os.PathLike, out: str | os.PathLike | None = None,
                cli_overrides: list[str] | None = None) -> Recipe:
    """Read ``path`` and resolve its stages (no config is loaded yet; see :func:`check`)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file {p} not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise RecipeError(f"recipe {p} must be a mapping with a non-empty list `stages`")
    unknown = sorted(set(data) - set(RECIPE_KEYS))
    if unknown:
        raise RecipeError(f"recipe {p}: unknown key {unknown[0]!r}; valid keys: {', '.join(RECIPE_KEYS)}")
    name = data.get("name", p.stem)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RecipeError(f"recipe {p}: name must be letters, digits, - or _, got {name!r}")
    run = Path(out) if out else Path("runs") / name
    shared = _str_list(data.get("overrides", []), f"recipe {p}: overrides")
    cli = _str_list(cli_overrides or [], "command-line overrides")
    stages: list[Stage] = []
    for i, raw in enumerate(data["stages"]):
        stages.append(_stage(i, raw, stages, run, p, shared, cli))
    result = data.get("result", "")
    if not isinstance(result, str):
        raise RecipeError(f"recipe {p}: result must be a string such as ${{stages.NAME.export}}")
    result = _resolve(result, run, stages, len(stages), "result", [])
    return Recipe(name, p, run, stages, result, str(data.get("description", "")))


def _str_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise RecipeError(f"{what} must be a list of key=value strings, got {value!r}")
    for x in value:
        if "=" not in x:
            raise RecipeError(f"{what}: {x!r} must look like key=value (dotted keys, e.g. train.steps=100)")
    return list(value)


def _stage(i: int, raw: Any, earlier: list[Stage], run: Path, path: Path, shared: list[str],
           cli: list[str]) -> Stage:
    where = f"recipe {path}, stage {i + 1}"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where} must be a mapping with name and one of {', '.join(STAGE_KINDS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RecipeError(f"{where}: name must be letters, digits, - or _, got {name!r}")
    where = f"recipe {path}, stage {name!r}"
    if any(s.name == name for s in earlier):
        raise RecipeError(f"{where}: the name is used by an earlier stage; stage names must be unique")
    kinds = [k for k in STAGE_KINDS if k in raw]
    unknown = sorted(set(raw) - set(STAGE_KEYS))
    if len(kinds) != 1:
        extra = f" (unknown key {unknown[0]!r})" if unknown else ""
        raise RecipeError(f"{where}: a stage has exactly one kind, train: CONFIG or tokenize: {{options}}; got "
                          f"{', '.join(kinds) or 'none'}{extra}")
    if unknown:
        raise RecipeError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(STAGE_KEYS)}")
    kind = kinds[0]
    deps: list[str] = []
    stage = Stage(i, name, kind, run / name, deps=deps)
    if kind == "train":
        if not isinstance(raw["train"], str):
            raise RecipeError(f"{where}: train must be a config path (configs/x.yaml), got {raw['train']!r}")
        stage.config = _find_config(raw["train"], path, where)
        own = _str_list(raw.get("overrides", []), f"{where}: overrides")
        resolved = [_resolve(o, run, earlier, i, where, deps) for o in shared + own + cli]
        for o in resolved:
            key = o.partition("=")[0].strip()
            if key in ("train.output_dir", "export_dir"):
                raise RecipeError(f"{where}: {key} is set by the recipe (<run>/<stage>, --out); remove {o!r}")
        cont = raw.get("continues")
        if cont is not None:
            prev = next((s for s in earlier if s.name == cont), None)
            if prev is None or prev.kind != "train":
                raise RecipeError(f"{where}: continues={cont!r} must name an earlier training stage")
            stage.folder, stage.continues = prev.folder, cont
            deps.append(cont)
        stage.overrides = resolved + [f"train.output_dir={_yaml_str(stage.folder)}",
                                      f"export_dir={_yaml_str(stage.export)}"]
        try:  # paths the earlier stages will write pass
            stage.cfg = load_config(stage.config, stage.overrides, will_exist=[e.folder for e in earlier])
        except ConfigError as e:
            raise RecipeError(f"{where} ({stage.config}): {e}") from None
    else:
        if "overrides" in raw or "continues" in raw:
            raise RecipeError(f"{where}: overrides and continues belong to training stages; a tokenize stage takes "
                              "the options of visar tokenize")
        opts = raw["tokenize"]
        if not isinstance(opts, dict):
            raise RecipeError(f"{where}: tokenize must be a mapping of visar tokenize options, e.g. "
                              "{tokenizer: ${stages.vq.export}, data: shapes, size: 32}")
        stage.options = {}
        for k, v in opts.items():
            key = str(k).replace("-", "_")
            if key == "out":
                raise RecipeError(f"{where}: the token cache goes to the stage's folder ({stage.folder}); remove out")
            if key not in TOKENIZE_OPTIONS:
                raise RecipeError(f"{where}: unknown visar tokenize option {k!r}; valid: "
                                  f"{', '.join(sorted(TOKENIZE_OPTIONS))}")
            tp = TOKENIZE_OPTIONS[key]
            ok = isinstance(v, tp) and not (tp is int and isinstance(v, bool))
            if tp is list:
                ok = ok and all(isinstance(x, str) for x in v)
            if not ok:
                raise RecipeError(f"{where}: tokenize option {k} must be {tp.__name__}, got {v!r}")
            if isinstance(v, str):
                v = _resolve(v, run, earlier, i, where, deps)
            stage.options[key] = v
        if "tokenizer" not in stage.options:
            raise RecipeError(f"{where}: a tokenize stage needs tokenizer: (a folder with tokenizer.json, e.g. "
                              "${stages.vq.export})")
    return stage


def _yaml_str(path: Path) -> str:
    """``path`` as an override value that YAML reads back as this string (quoted only when it must be)."""
    import yaml

    text = str(path)
    try:
        plain = yaml.safe_load(text) == text
    except yaml.YAMLError:
        plain = False
    return text if plain else json.dumps(text)


def _find_config(given: str, recipe: Path, where: str) -> Path:
    p = Path(given)
    candidates = [p] if p.is_absolute() else [p, recipe.parent.parent / p]
    for c in candidates:
        if c.is_file():
            return c
    raise RecipeError(f"{where}: config {given} not found (looked in {', '.join(str(c) for c in candidates)})")


def _resolve(text: str, run: Path, earlier: list[Stage], index: int, where: str, deps: list[str]) -> str:
    """``text`` with ``${run}``, ``${stages.NAME}`` and ``${stages.NAME.export}`` replaced; NAME must come earlier."""
    def sub(m: re.Match) -> str:
        ref = m.group(1).strip()
        if ref == "run":
            return str(run)
        parts = ref.split(".")
        if len(parts) in (2, 3) and parts[0] == "stages" and (len(parts) == 2 or parts[2] in ("export", "ema")):
            target = next((s for s in earlier[:index] if s.name == parts[1]), None)
            if target is None:
                raise RecipeError(f"{where}: ${{{ref}}} names no earlier stage (a stage reads only the outputs of "
                                  f"the stages before it; earlier: {', '.join(s.name for s in earlier) or 'none'})")
            if len(parts) == 3 and target.kind != "train":
                raise RecipeError(f"{where}: ${{{ref}}}: {target.name} is a {target.kind} stage; it has no {parts[2]} "
                                  f"(use ${{stages.{target.name}}})")
            if target.name not in deps:
                deps.append(target.name)
            if len(parts) == 2:
                return str(target.folder)
            return str(target.export if parts[2] == "export" else target.ema)
        raise RecipeError(f"{where}: unknown placeholder ${{{ref}}}; use ${{run}}, ${{stages.NAME}}, "
                          "${stages.NAME.export} or ${stages.NAME.ema}")

    return _REF_RE.sub(sub, text)


def select(recipe: Recipe, stages: str | None, start: str | None) -> list[Stage]:
    """The stages ``--stages a,b`` / ``--from NAME`` pick (all when neither is given), in recipe order."""
    names = [s.name for s in recipe.stages]
    if stages and start:
        raise RecipeError("give --stages or --from, not both")
    if start:
        if start not in names:
            raise RecipeError(f"--from {start}: no such stage; stages: {', '.join(names)}")
        return recipe.stages[names.index(start):]
    if stages:
        wanted = [x.strip() for x in stages.split(",") if x.strip()]
        bad = [x for x in wanted if x not in names]
        if bad or not wanted:
            raise RecipeError(f"--stages {stages}: no stage named {', '.join(bad) or '(empty)'}; stages: "
                              f"{', '.join(names)}")
        return [s for s in recipe.stages if s.name in wanted]
    return list(recipe.stages)


def check(recipe: Recipe, selected: list[Stage], num_processes: int = 1) -> dict[str, str]:
    """Load every stage's config and decide what each stage would do: ``{name: status}`` with status
    ``done`` (skipped), ``run`` or ``resume N`` (selected, not finished) or ``not selected``. Raises
    :class:`RecipeError` for any problem, before anything runs. Training configs are checked with
    their overrides, and their models built on the ``meta`` device (the pre-launch checks that need
    earlier stages' outputs run when the stage starts)."""
    from visar.train.preflight import check_batch, meta_model
    from visar.utils.io import check_writable_dir, inside_package, package_root

    if inside_package(recipe.run):
        raise RecipeError(f"--out {recipe.run} lies inside the installed visar package ({package_root()}); a recipe "
                          "must not write there. Use a folder under runs/")
    try:
        check_writable_dir(recipe.run, "--out")
    except ValueError as e:
        raise RecipeError(str(e)) from None
    chosen = {s.name for s in selected}
    status: dict[str, str] = {}
    for s in recipe.stages:
        where = f"recipe {recipe.path}, stage {s.name!r}"
        if s.kind == "train" and s.name in chosen:
            try:
                check_batch(s.cfg, num_processes)
                meta_model(s.cfg)
            except ConfigError as e:
                raise RecipeError(f"{where} ({s.config}): {e}") from None
        elif s.kind == "tokenize":
            _check_tokenize(s, [e.folder for e in recipe.stages[:s.index]], where)
        done = recipe.marker(s) is not None and s.finished_outputs()
        if done:
            status[s.name] = "done"
        elif s.name in chosen:
            missing = [d for d in s.deps if status.get(d) == "not selected"]
            if missing:
                raise RecipeError(f"{where} reads the outputs of {', '.join(missing)}, which "
                                  f"{'has' if len(missing) == 1 else 'have'} not finished and "
                                  "--stages/--from leaves out; run those first")
            step = checkpoint_step(s.folder) if s.kind == "train" else None
            status[s.name] = f"resume {step}" if step else "run"
        else:
            status[s.name] = "not selected"
    _check_finished(recipe, status)
    return status


def _check_tokenize(s: Stage, pending: list[Path], where: str) -> None:
    from visar.train.config import exists_or_pending

    o = s.options
    folder, name = Path(o["tokenizer"]), o.get("name", "tokenizer")
    files = (folder / f"{name}.json", folder / name / "config.json", folder / "config.json")  # as find_saved
    if not any(exists_or_pending(f, pending, file=True) for f in files):
        raise RecipeError(f"{where}: tokenizer={o['tokenizer']} holds no {name}.json (or {name}/config.json), is no "
                          "component folder (config.json) and no earlier stage writes it")
    if o.get("path") and not exists_or_pending(o["path"], pending):
        raise RecipeError(f"{where}: path={o['path']} does not exist")
    if o.get("data", "folder") not in ("shapes", "folder"):
        raise RecipeError(f"{where}: data must be shapes or folder, got {o['data']!r}")
    if o.get("data", "folder") == "folder" and not o.get("path"):
        raise RecipeError(f"{where}: data: folder needs path: IMAGE_FOLDER")


def _check_finished(recipe: Recipe, status: dict[str, str]) -> None:
    """A finished stage must still match the recipe and the outputs it read, or the run refuses."""
    problems, redo = [], []
    for s in recipe.stages:
        if status[s.name] != "done":
            continue
        marker = recipe.marker(s) or {}
        old, new = marker.get("spec", {}), s.spec()
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:3])
            problems.append(f"{s.name} finished with other settings ({shown}{'; ...' if len(changed) > 3 else ''})")
            redo.append(s)
            continue
        for d in s.deps:
            dep = recipe.stage(d)
            read = marker.get("deps", {}).get(d)
            if dep in redo or status[d] != "done" or (recipe.marker(dep) or {}).get("id") != read:
                problems.append(f"{s.name} read the outputs of {d} before {d} was redone")
                redo.append(s)
                break
    if problems:
        folders = sorted({str(s.folder) for s in redo})
        raise RecipeError(f"recipe {recipe.path}: {'; '.join(problems)}. Finished stages are not overwritten: delete "
                          f"{', '.join(folders)} to redo {'it' if len(folders) == 1 else 'them'}, or restore the "
                          "recipe's settings")


# ----------------------------------------------------------------------------------------------
# running

def describe(recipe: Recipe, status: dict[str, str]) -> str:
    """The stages, their command lines and what a run would do with each (``--dry-run``)."""
    lines = [f"recipe {recipe.name} ({recipe.path}): {len(recipe.stages)} stages, run folder {recipe.run}"]
    for s in recipe.stages:
        st = status[s.name]
        what = {"done": "finished: skipped", "run": "would run", "not selected": "not selected"}.get(st)
        if what is None:  # resume N
            what = f"would resume at step {st.split()[1]} of {s.cfg.train.steps}"
        lines.append(f"  {s.index + 1:2d}. {s.name} [{s.kind}] {what}")
        lines.append(f"      {shlex.join(s.command())}")
    if recipe.result:
        lines.append(f"  result: {recipe.result}")
    return "\n".join(lines)


class StageUnfinished(RuntimeError):
    """A training stage stopped before ``train.steps`` (``train.max_minutes``); rerun the recipe to continue."""


def run_recipe(recipe: Recipe, selected: list[Stage], status: dict[str, str], train: Callable[[list[str]], int],
               num_processes: int | None = None, accelerate_config: str | None = None, port: int | None = None) -> None:
    """Run the selected stages that have not finished, in order, writing a marker after each. ``train`` runs
    ``visar train`` arguments (a config and overrides) and returns its exit status."""
    recipe.marker_dir.mkdir(parents=True, exist_ok=True)
    from visar.utils.io import atomic_write_bytes

    atomic_write_bytes(recipe.run / "recipe" / "recipe.yaml", recipe.path.read_bytes())
    for s in selected:
        if status[s.name] == "done":
            log.info("stage %d/%d %s: finished, skipped", s.index + 1, len(recipe.stages), s.name)
            continue
        log.info("stage %d/%d %s: %s", s.index + 1, len(recipe.stages), s.name, shlex.join(s.command()))
        t0 = time.perf_counter()
        if s.kind == "train":
            _run_train(s, train, num_processes, accelerate_config, port)
        else:
            _run_tokenize(s)
        if not s.finished_outputs():
            step = checkpoint_step(s.folder) if s.kind == "train" else None
            raise StageUnfinished(f"stage {s.name} stopped before finishing"
                                  + (f" (step {step} of {s.cfg.train.steps}; train.max_minutes="
                                     f"{s.cfg.train.max_minutes:g})" if s.kind == "train" else "")
                                  + ": rerun the recipe to continue it")
        marker = {"name": s.name, "kind": s.kind, "id": uuid.uuid4().hex, "spec": s.spec(),
                  "deps": {d: (recipe.marker(recipe.stage(d)) or {}).get("id") for d in s.deps},
                  "command": s.command(), "seconds": round(time.perf_counter() - t0, 1),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_bytes(recipe.marker_dir / f"{s.name}.json", json.dumps(marker, indent=1).encode())
        log.info("stage %s finished in %.1f s", s.name, marker["seconds"])


class StageFailed(RuntimeError):
    """A stage's command failed (its own error was printed above)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _run_train(s: Stage, train: Callable[[list[str]], int], num_processes: int | None,
               accelerate_config: str | None, port: int | None) -> None:
    from visar.utils.cli import USER_ERRORS, error_message

    argv = [str(s.config), *s.overrides]
    if num_processes:
        argv += ["--num-processes", str(num_processes)]
    if accelerate_config:
        argv += ["--accelerate-config", accelerate_config]
    if port:
        argv += ["--main-process-port", str(port)]
    try:
        code = train(argv)
    except USER_ERRORS as e:  # e.g. the pre-launch checks, now that the earlier stages' outputs exist
        log.debug("stage %s", s.name, exc_info=True)
        raise StageFailed(f"stage {s.name}: {error_message(e)}", 2) from e
    if code:
        raise StageFailed(f"stage {s.name} failed (exit status {code})", code)


def _run_tokenize(s: Stage) -> None:
    from visar.utils.lifeline import call_tied

    cmd = [sys.executable, "-m", "visar", *s.command()[1:]]
    code = call_tied(cmd, dict(os.environ))
    if code:
        raise StageFailed(f"stage {s.name} failed (visar tokenize exit status {code})", code)


def main(args: argparse.Namespace, train: Callable[[list[str]], int]) -> int:
    """``visar train RECIPE.yaml``: the parsed arguments of :func:`visar.train.launch.build_parser`; ``train``
    runs one training stage's ``visar train`` arguments (the launcher's own entry, passed in)."""
    recipe = load_recipe(args.config, args.out, args.overrides)
    selected = select(recipe, args.stages, args.start)
    status = check(recipe, selected, args.num_processes or 1)
    if args.dry_run:
        print(describe(recipe, status))
        return 0
    try:
        run_recipe(recipe, selected, status, train, args.num_processes, args.accelerate_config,
                   args.main_process_port)
    except StageFailed as e:
        log.error("%s", e)
        return e.code
    except StageUnfinished as e:
        log.warning("%s", e)
        return EXIT_UNFINISHED
    if recipe.result and all(s in selected for s in recipe.stages):
        print(f"recipe {recipe.name} finished: {recipe.result}")
    else:
        print(f"recipe {recipe.name}: stages {', '.join(s.name for s in selected)} finished ({recipe.run})")
    return 0


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = copy.deepcopy(v)
    return out

