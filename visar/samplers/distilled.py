"""Distilled Decoding samplers: one or two student passes in place of the teacher's AR steps.

A student (:class:`~visar.generators.next_token.distilled.DistilledNextToken` for next-token teachers,
:class:`~visar.generators.next_scale.distilled.DistilledNextScale` for VAR) maps a state ``X_t`` (the first
``n(t)`` positions hold codebook vectors of tokens, the rest their noise) to the teacher's tokens (Liu et al.
2024, arXiv 2412.17153, trained on pairs of :mod:`visar.samplers.flow_map`'s teacher map). ``t`` counts tokens
for a next-token student (``n(t) = t``) and scales for a VAR student (``n(t)`` = the tokens of the ``t``
coarsest scales):

* ``steps=1``: tokens = draw(student(X_0)), ``X_0`` the noise ``[B, L, C]`` (VAR: all scales' noise, scale 0
  first, ``L = sum pn^2``);
* ``steps=2``: ``q' = draw(student(X_0))``; keep the first ``n(t2)`` tokens of ``q'``, put the **same** noise
  back on the other positions and predict again from ``X_{t2}``; tokens = ``q'`` on the first ``n(t2)``
  positions followed by the second pass's tokens.

``draw`` is ``argmax`` (default: the student regresses a deterministic map) or ``sample`` (a categorical draw
from ``softmax(logits / temperature)`` with the given generator). No guidance: it is baked into the teacher's
pairs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from visar.conditions import Condition
from visar.generators.components.distilled_student import DistilledStudent
from visar.registry import register
from visar.samplers.base import Sampler
from visar.samplers.flow_map import codebook_of
from visar.samplers.logits import check_finite, sample_categorical
from visar.samplers.options import check_choice, check_positive_int

DRAWS = ("argmax", "sample")
#: file stems a student folder may hold, in the order they are tried (``distill``: the export of
#: ``visar train`` with ``task: distill``; ``sampler_student``: a pipeline saved with this sampler)
STUDENT_NAMES = ("distill", "student", "sampler_student", "generator")


def load_student(path: str | os.PathLike, device: torch.device | str = "cpu") -> DistilledStudent:
    """The distilled student saved in folder ``path`` (``distill.json`` + ``distill.safetensors``, or
    ``student`` / ``sampler_student`` / ``generator`` files), on ``device``, in eval mode."""
    from visar.generators.base import Generator

    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"student={str(path)!r} is not a folder: give the export folder of a `visar train` "
                                "run with task: distill (it holds distill.json + distill.safetensors)")
    device = torch.device(device)
    where = "cpu" if device.type == "cpu" else str(device)  # safetensors rejects "cpu:0"
    from visar.utils.config import component_path

    if (component_path(d) or ("",))[0] == "folder":  # the student's own component folder (save_pretrained(d))
        m = Generator.from_pretrained(d, map_location=where)
        if isinstance(m, DistilledStudent):
            return m.eval()
    for name in STUDENT_NAMES:
        if component_path(d, name) is not None:  # flat NAME.json or the component folder NAME/
            m = Generator.from_pretrained(d, name, map_location=where)
            if isinstance(m, DistilledStudent):
                return m.eval()
    raise FileNotFoundError(f"{d} holds no distilled student ({', '.join(n + '.json' for n in STUDENT_NAMES)} of "
                            "family llamagen-distilled or var-distilled); train one with `visar train "
                            "configs/shapes_distill_one.yaml` (VAR: configs/shapes_var_distill_one.yaml)")


def _device_of(module: Any) -> torch.device | None:
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return None


@register("sampler", "distilled")
class DistilledSampler(Sampler):
    """One- or two-step sampling with a distilled student (see the module docstring).

    The pipeline's generator is either the student itself, or the teacher (a next-token or VAR model emitting
    logits over the same vocabulary and image layout) with the student given as ``student=``:
    ``pipe(labels, sampler=DistilledSampler(student=..., steps=2))``. It returns the teacher's token layout:
    ``[B, h, w]`` for next-token models, a list of ``[B, pn, pn]`` per scale for VAR.

    Options:
        student: a :class:`~visar.generators.components.distilled_student.DistilledStudent`, a folder holding
            one (``visar train`` export), or ``None`` (the pipeline's generator is the student).
        steps: 1 or 2 student passes.
        t2: two-step: the state kept from the first pass, in the student's unit (next-token: tokens,
            ``1 <= t2 < L``; VAR: scales, ``1 <= t2 < S``); ``None``: the student's trained intermediate state
            (the largest of its ``timesteps``).
        noise: ``[B, L, C]`` float noise or ``None`` (drawn from ``generator`` as one standard normal tensor).
        codebook: the pipeline's VQ tokenizer or its ``[V, C]`` codebook, checked against the student's
            (``None``: only the vocabulary and image size are checked against the pipeline's generator).
        draw: ``"argmax"`` (default) or ``"sample"`` (categorical with ``temperature``).
        temperature: ``> 0``, for ``draw="sample"``.

    ``stats``: ``model_passes`` (student passes), ``tokens`` (``L``), ``t2``.
    """

    name = "distilled"
    emits = None
    defaults = {"student": None, "steps": 1, "t2": None, "noise": None, "codebook": None, "draw": "argmax",
                "temperature": 1.0}

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._loaded: dict[tuple[str, str], DistilledStudent] = {}

    def check_model(self, model: Any) -> None:
        if isinstance(model, DistilledStudent):
            return
        speaks = hasattr(model, "vocab_size") and (hasattr(model, "num_tokens") or hasattr(model, "scales"))
        if not speaks or getattr(model, "emits", None) != "logits":
            raise TypeError(f"the 'distilled' sampler stands in for a next-token or VAR teacher (a model with logits "
                            f"over a VQ vocabulary) or runs a distilled student; {type(model).__name__} is neither: "
                            "use its own default sampler (sampler=None)")

    def validate(self, options: dict[str, Any]) -> None:
        steps = options["steps"]
        if isinstance(steps, bool) or steps not in (1, 2):
            raise ValueError(f"steps must be 1 (one student pass) or 2 (through the intermediate state t2), got "
                             f"{steps!r}")
        if options["t2"] is not None:
            check_positive_int("t2", options["t2"])
        check_choice("draw", options["draw"], DRAWS)
        s = options["student"]
        if s is not None and not isinstance(s, (DistilledStudent, str, os.PathLike)):
            raise TypeError(f"student must be a distilled student (DistilledNextToken, DistilledNextScale), a folder "
                            f"holding one, or None (the pipeline's "
                            f"generator is the student), got {type(s).__name__}")
        noise = options["noise"]
        if noise is not None and not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a float tensor [B, L, C] or None, got {type(noise).__name__}")

    def student_for(self, model: Any, student: Any) -> DistilledStudent:
        """The student to run: ``student`` (loaded once per folder and device), or ``model`` itself."""
        if student is None:
            if isinstance(model, DistilledStudent):
                return model
            raise ValueError("the 'distilled' sampler needs student=: a distilled student or the folder of one "
                             "(the export of `visar train` with task: distill)")
        if isinstance(student, DistilledStudent):
            return student
        device = _device_of(model) or torch.device("cpu")
        key = (str(Path(student).resolve()), str(device))
        if key not in self._loaded:
            self._loaded[key] = load_student(student, device)
        return self._loaded[key]

    @staticmethod
    def check_pair(student: DistilledStudent, model: Any) -> None:
        """The student must stand in for ``model``: same kind of teacher, vocabulary, token layout (tokens per
        image, or VAR's scales and code dimension) and classes."""
        if student is model:
            return
        why = student.teacher_mismatch(model)
        if why is not None:
            raise ValueError(why)

    @torch.no_grad()
    def run(self, model: Any, cond: Condition, generator: torch.Generator | None, *, student: Any, steps: int,
            t2: int | None, noise: torch.Tensor | None, codebook: Any, draw: str,
            temperature: float) -> torch.Tensor:
        s = self.student_for(model, student)
        self.check_pair(s, model)
        s.check_ready()
        if codebook is not None:
            s.check_codebook(codebook_of(codebook), "codebook=")
        B, L, C = cond.batch_size, s.num_tokens, s.codebook_dim
        device = s.codebook.device
        if noise is None:
            noise = torch.randn(B, L, C, generator=generator,
                                device=generator.device if generator is not None else device)
        noise = s.check_noise(noise, B).to(device=device, dtype=torch.float32)
        if steps == 2:
            if t2 is None:
                if len(s.timesteps) < 2:
                    raise ValueError(f"t2: this student was trained for one step (timesteps {s.timesteps}); give t2= "
                                     "or use a two-step student")
                t2 = s.timesteps[-1]
            if not 1 <= t2 < s.num_states:
                raise ValueError(f"t2 must lie in [1, {s.num_states}) ({s.state_unit} kept from the first pass), got "
                                 f"{t2}")
        cond = cond.to(device)

        def pick(logits: torch.Tensor) -> torch.Tensor:
            check_finite(logits, "distilled sampling")
            if draw == "argmax":
                return logits.argmax(-1)
            return sample_categorical(torch.softmax(logits / temperature, dim=-1), generator)

        x, data = s.input_state(noise)
        tokens = pick(s(x, cond, data))  # [B, L]
        if steps == 2:
            x, data = s.input_state(noise, tokens, t2)  # data: the first n(t2) positions, the same noise after
            second = pick(s(x, cond, data))
            tokens = torch.where(data, tokens, second)
        self.stats.update(model_passes=steps, tokens=L, t2=t2 if steps == 2 else None)
        target = _device_of(model)
        return s.tokens_out(tokens if target is None else tokens.to(target))


__all__ = ["DistilledSampler", "load_student", "DRAWS", "STUDENT_NAMES"]
