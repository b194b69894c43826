"""Distilled Decoding samplers: one or two student passes in place of L teacher steps.

A student (:class:`~visar.generators.next_token.distilled.DistilledNextToken`) maps a state
``X_t = (c_{q_1}, ..., c_{q_t}, eps_{t+1}, ..., eps_L)`` to the teacher's tokens (Liu et al. 2024, arXiv
2412.17153, trained on pairs of :mod:`visar.samplers.flow_map`'s teacher map):

* ``steps=1``: tokens = draw(student(X_0)), ``X_0`` the noise ``[B, L, C]``;
* ``steps=2``: ``q' = draw(student(X_0))``; keep ``q'_1..q'_{t2}``, put the **same** noise back on the
  positions ``>= t2`` and predict again from ``X_{t2} = (c_{q'_1}, ..., c_{q'_{t2}}, eps_{t2+1}, ..., eps_L)``;
  tokens = ``q'_{<t2}`` followed by the second pass's tokens from ``t2`` on.

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
from visar.generators.next_token.distilled import DistilledNextToken
from visar.registry import register
from visar.samplers.base import Sampler
from visar.samplers.flow_map import codebook_of
from visar.samplers.logits import check_finite, sample_categorical
from visar.samplers.options import check_choice, check_positive_int

DRAWS = ("argmax", "sample")
#: file stems a student folder may hold, in the order they are tried (``distill``: the export of
#: ``visar train`` with ``task: distill``; ``sampler_student``: a pipeline saved with this sampler)
STUDENT_NAMES = ("distill", "student", "sampler_student", "generator")


def load_student(path: str | os.PathLike, device: torch.device | str = "cpu") -> DistilledNextToken:
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
        if isinstance(m, DistilledNextToken):
            return m.eval()
    for name in STUDENT_NAMES:
        if component_path(d, name) is not None:  # flat NAME.json or the component folder NAME/
            m = Generator.from_pretrained(d, name, map_location=where)
            if isinstance(m, DistilledNextToken):
                return m.eval()
    raise FileNotFoundError(f"{d} holds no distilled student ({', '.join(n + '.json' for n in STUDENT_NAMES)} of "
                            "family llamagen-distilled); train one with `visar train configs/shapes_distill_one.yaml`")


def _device_of(module: Any) -> torch.device | None:
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return None


@register("sampler", "distilled")
class DistilledSampler(Sampler):
    """One- or two-step sampling with a distilled student (see the module docstring).

    The pipeline's generator is either the student itself, or the teacher (a next-token model emitting
    logits over the same vocabulary and image size) with the student given as ``student=``:
    ``pipe(labels, sampler=DistilledSampler(student=..., steps=2))``.

    Options:
        student: a :class:`DistilledNextToken`, a folder holding one (``visar train`` export), or ``None``
            (the pipeline's generator is the student).
        steps: 1 or 2 student passes.
        t2: two-step: tokens kept from the first pass (``1 <= t2 < L``); ``None``: the student's trained
            intermediate state (the largest of its ``timesteps``).
        noise: ``[B, L, C]`` float noise or ``None`` (drawn from ``generator`` as one standard normal tensor).
        codebook: the pipeline's VQ tokenizer or its ``[V, C]`` codebook, checked against the student's
            (``None``: only the vocabulary and image size are checked against the pipeline's generator).
        draw: ``"argmax"`` (default) or ``"sample"`` (categorical with ``temperature``).
        temperature: ``> 0``, for ``draw="sample"``.

    ``stats``: ``model_passes`` (student passes), ``tokens``, ``t2``.
    """

    name = "distilled"
    emits = None
    defaults = {"student": None, "steps": 1, "t2": None, "noise": None, "codebook": None, "draw": "argmax",
                "temperature": 1.0}

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._loaded: dict[tuple[str, str], DistilledNextToken] = {}

    def check_model(self, model: Any) -> None:
        if isinstance(model, DistilledNextToken):
            return
        speaks = hasattr(model, "vocab_size") and hasattr(model, "num_tokens")
        if not speaks or getattr(model, "emits", None) != "logits":
            raise TypeError(f"the 'distilled' sampler stands in for a next-token teacher (a model with logits over a "
                            f"VQ vocabulary) or runs a distilled student; {type(model).__name__} is neither: use its "
                            "own default sampler (sampler=None)")

    def validate(self, options: dict[str, Any]) -> None:
        steps = options["steps"]
        if isinstance(steps, bool) or steps not in (1, 2):
            raise ValueError(f"steps must be 1 (one student pass) or 2 (through the intermediate state t2), got "
                             f"{steps!r}")
        if options["t2"] is not None:
            check_positive_int("t2", options["t2"])
        check_choice("draw", options["draw"], DRAWS)
        s = options["student"]
        if s is not None and not isinstance(s, (DistilledNextToken, str, os.PathLike)):
            raise TypeError(f"student must be a DistilledNextToken, a folder holding one, or None (the pipeline's "
                            f"generator is the student), got {type(s).__name__}")
        noise = options["noise"]
        if noise is not None and not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise must be a float tensor [B, L, C] or None, got {type(noise).__name__}")

    def student_for(self, model: Any, student: Any) -> DistilledNextToken:
        """The student to run: ``student`` (loaded once per folder and device), or ``model`` itself."""
        if student is None:
            if isinstance(model, DistilledNextToken):
                return model
            raise ValueError("the 'distilled' sampler needs student=: a DistilledNextToken or the folder of one "
                             "(the export of `visar train` with task: distill)")
        if isinstance(student, DistilledNextToken):
            return student
        device = _device_of(model) or torch.device("cpu")
        key = (str(Path(student).resolve()), str(device))
        if key not in self._loaded:
            self._loaded[key] = load_student(student, device)
        return self._loaded[key]

    @staticmethod
    def check_pair(student: DistilledNextToken, model: Any) -> None:
        """The student must stand in for ``model``: same vocabulary, image size and classes."""
        if student is model:
            return
        classes = getattr(model, "num_classes", student.num_classes)
        for what, mine, theirs in (("token vocabulary", student.vocab_size, model.vocab_size),
                                   ("tokens per image", student.num_tokens, model.num_tokens),
                                   ("classes", student.num_classes, classes)):
            if mine != theirs:
                raise ValueError(f"the student was distilled for another tokenizer or teacher: its {what} is {mine}, "
                                 f"the pipeline's generator has {theirs}; use a student distilled from this "
                                 "pipeline's teacher")

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
        device = _device_of(s) or torch.device("cpu")
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
            if not 1 <= t2 < L:
                raise ValueError(f"t2 must lie in [1, {L}) (tokens kept from the first pass), got {t2}")
        cond = cond.to(device)

        def pick(logits: torch.Tensor) -> torch.Tensor:
            check_finite(logits, "distilled sampling")
            if draw == "argmax":
                return logits.argmax(-1)
            return sample_categorical(torch.softmax(logits / temperature, dim=-1), generator)

        x, data = s.input_state(noise)
        tokens = pick(s(x, cond, data))  # [B, L]
        if steps == 2:
            x, data = s.input_state(noise, tokens, t2)
            second = pick(s(x, cond, data))
            tokens = torch.cat([tokens[:, :t2], second[:, t2:]], dim=1)
        self.stats.update(model_passes=steps, tokens=L, t2=t2 if steps == 2 else None)
        out = tokens.view(B, s.grid_size, s.grid_size)
        target = _device_of(model)
        return out if target is None else out.to(target)


__all__ = ["DistilledSampler", "load_student", "DRAWS", "STUDENT_NAMES"]
