"""The graded-sample record every evaluation produces, and grouping samples by problem.

Every metric in this package is computed from a list of :class:`Sample`; the helpers here group that
list by problem (rejecting a run merged twice) and check that two evaluations cover the same
problems, naming the first few offending ids in their errors.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = ["Sample"]


# How many offending problem ids an error message lists before eliding.
_MAX_NAMED = 5


@dataclass(frozen=True)
class Sample:
    """One graded response to one problem.

    This is the common record every evaluation produces, so that all metrics
    below can be computed from the same list regardless of which stage
    (SFT, RLVR, OPSD) or backend generated it.

    Attributes:
        problem_id: Identifier of the problem; samples are grouped by it.
        sample_index: Index of this sample among the problem's samples
            (0-based). Defines "first occurrence" for maj@k tie-breaking and
            must be unique within a problem.
        correct: Whether the verifier judged the final answer correct.
        answer: The extracted final answer (used for majority voting), or
            ``None`` when no answer could be extracted.
        response_tokens: Length of the whole response in tokens.
        thinking_tokens: Length of the reasoning ("thinking") part in tokens.
        truncated: Whether generation hit the token limit.
        text: The response text (optional; used for text diagnostics).
        first_correct_token: For a correct response, the 0-based index of
            the response token that completes the first appearance of the
            gold answer in the response (see :func:`find_answer`), so
            ``response_tokens - first_correct_token - 1`` tokens follow it;
            ``None`` for an incorrect response, when the gold answer is not
            written out verbatim, and in samples saved before this field
            existed.
        repeats: Whether the response holds a loop of back-to-back copies
            of one block of tokens (:func:`~.collapse.repeats`); ``None``
            in samples saved before this field existed.
        token_entropy: The model's mean next-token entropy (nats, at
            temperature 1) over the positions that predicted the
            response's tokens, its closing EOS included; ``None`` unless the
            evaluation asked for it and its backend can compute it.
    """

    problem_id: str
    sample_index: int
    correct: bool
    answer: str | None
    response_tokens: int
    thinking_tokens: int
    truncated: bool
    text: str = ""
    first_correct_token: int | None = None
    repeats: bool | None = None
    token_entropy: float | None = None


def _name_few(ids: Iterable[str]) -> str:
    """Format up to ``_MAX_NAMED`` ids for an error message, eliding the rest."""
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:_MAX_NAMED])
    if len(ids) > _MAX_NAMED:
        shown += f", ... ({len(ids) - _MAX_NAMED} more)"
    return shown


def _group_by_problem(samples: Sequence[Sample]) -> dict[str, list[Sample]]:
    """Group samples by problem id (first-appearance order), each group sorted
    by ``sample_index``; duplicate indices within a problem are an error because
    they usually mean the same run was merged twice."""
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.problem_id, []).append(s)
    for pid, group in groups.items():
        group.sort(key=lambda s: s.sample_index)
        indices = [s.sample_index for s in group]
        if len(set(indices)) != len(indices):
            dup = sorted(i for i, c in Counter(indices).items() if c > 1)
            raise ValueError(
                f"problem {pid!r} has duplicate sample_index values {dup[:_MAX_NAMED]}"
            )
    return groups


def _check_same_problems(
    before: dict[str, object], after: dict[str, object]
) -> None:
    """Raise ValueError naming problems that appear on only one side."""
    only_before = [p for p in before if p not in after]
    only_after = [p for p in after if p not in before]
    if only_before or only_after:
        parts = []
        if only_before:
            parts.append(
                f"{len(only_before)} only in 'before': {_name_few(only_before)}"
            )
        if only_after:
            parts.append(f"{len(only_after)} only in 'after': {_name_few(only_after)}")
        raise ValueError("before and after must cover the same problems; " + "; ".join(parts))
