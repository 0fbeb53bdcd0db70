"""Teacher weights for OPSD: the network that reads the privileged prompt.

`frozen` (default) keeps the initial weights: a frozen copy, or, for a PEFT model, the same
network with its adapters disabled (no copy). `ema` is a copy updated after every optimizer step
as teacher <- (1 - rate) * teacher + rate * student. `live` is the current student itself. All
teachers run without gradients.
"""

from __future__ import annotations

import contextlib
import copy

import torch


def _is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class FrozenTeacher:
    def __init__(self, student, rate: float = 0.0):
        self.peft = _is_peft(student)
        self.copy = None if self.peft else _frozen_copy(student)

    @contextlib.contextmanager
    def use(self, student):
        """Yield the module to run the teacher forward with."""
        if self.peft:
            with student.disable_adapter():
                yield student
        else:
            yield self.copy

    def after_step(self, student) -> None:
        pass


class EmaTeacher:
    def __init__(self, student, rate: float = 0.05):
        if not 0 < rate <= 1:
            raise ValueError(f"teacher: ema rate must be in (0, 1], got {rate}")
        self.rate = rate
        self.copy = _frozen_copy(student)

    @contextlib.contextmanager
    def use(self, student):
        yield self.copy

    @torch.no_grad()
    def after_step(self, student) -> None:
        for mine, theirs in zip(self.copy.parameters(), student.parameters()):
            mine.lerp_(theirs.detach().to(mine.dtype), self.rate)


class LiveTeacher:
    def __init__(self, student, rate: float = 0.0):
        pass

    @contextlib.contextmanager
    def use(self, student):
        yield student

    def after_step(self, student) -> None:
        pass


def _frozen_copy(model):
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


TEACHER_WEIGHTS = {"frozen": FrozenTeacher, "ema": EmaTeacher, "live": LiveTeacher}


def build_teacher(kind: str, student, rate: float = 0.05):
    if kind not in TEACHER_WEIGHTS:
        raise ValueError(f"unknown teacher weights {kind!r}; choose one of {sorted(TEACHER_WEIGHTS)}")
    return TEACHER_WEIGHTS[kind](student, rate)
