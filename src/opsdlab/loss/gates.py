"""Outcome gates: which rollouts OPSD trains on, and with which divergence.

A gate maps each rollout's outcome to a divergence name, or None to drop it before any forward
pass. A truncated rollout (it hit the length cap) never counts as correct, whatever its text
says; `correct_or_truncated` is the gate that keeps truncated rollouts beside the correct ones.
`split` keeps everything, with reverse KL on correct rollouts and forward KL on the rest.
"""

from __future__ import annotations

from typing import Callable

Route = str | None


def _all(ok: bool, truncated: bool, divergence: str) -> Route:
    return divergence


def _correct(ok: bool, truncated: bool, divergence: str) -> Route:
    return divergence if ok and not truncated else None


def _incorrect(ok: bool, truncated: bool, divergence: str) -> Route:
    return None if ok and not truncated else divergence


def _correct_or_truncated(ok: bool, truncated: bool, divergence: str) -> Route:
    return divergence if (ok or truncated) else None


def _split(ok: bool, truncated: bool, divergence: str) -> Route:
    return "reverse_kl" if ok and not truncated else "forward_kl"


GATES: dict[str, Callable[[bool, bool, str], Route]] = {
    "all": _all,
    "correct": _correct,
    "incorrect": _incorrect,
    "correct_or_truncated": _correct_or_truncated,
    "split": _split,
}


def route(gate: str, correct: list[bool], truncated: list[bool], divergence: str) -> list[Route]:
    """Per rollout: the divergence to train it with, or None when the gate drops it."""
    if gate not in GATES:
        raise ValueError(f"unknown gate {gate!r}; choose one of {sorted(GATES)}")
    if len(correct) != len(truncated):
        raise ValueError(f"gate: {len(correct)} correctness flags but {len(truncated)} truncation flags")
    return [GATES[gate](ok, cut, divergence) for ok, cut in zip(correct, truncated)]
