"""Signs that a model's responses are collapsing: a response caught in a loop, and token entropy over responses.

Self-distillation and RL can end in "truncation collapse" (StableOPD, arXiv 2604.08527): responses
suddenly grow and repeat themselves until they hit the length cap. Truncation and length are read
from the summary's own fields; this module adds what they miss, whether a response repeats itself
(`repeats`), and how a per-response mean token entropy is aggregated over responses
(`mean_token_entropy`; entropy drift, TRACE arXiv 2605.10194).

A response *repeats* when some block of p consecutive tokens (1 <= p <= `MAX_PERIOD`) is followed
directly by exact copies of itself, the run of copies spanning at least `MIN_COPIES` blocks and at
least `MIN_RUN` tokens. A looping response written until the cap is such a run; healthy text rarely
holds three back-to-back copies of one block, and the token floor keeps runs of a single token or a
few (a long number's zeros, a row of dashes) from counting. Exact copies, because a degenerate loop
at a check's temperature is copied token for token; a loop that keeps varying one token breaks into
shorter runs, each of which must still meet the floor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["MAX_PERIOD", "MIN_COPIES", "MIN_RUN", "longest_run", "repeats", "mean_token_entropy"]

MAX_PERIOD = 128  # the longest repeated block looked for, in tokens (a paragraph of a reasoning loop)
MIN_COPIES = 3  # the block and at least two exact copies straight after it
MIN_RUN = 32  # tokens the run must span: 32 copies of one token, 16 of two, 3 of an 11-token block


def longest_run(token_ids: Sequence[int], period: int) -> int:
    """Tokens in the longest stretch of `token_ids` that repeats with this period: every token in it
    after the first `period` equals the token `period` places before it (0 if the ids are shorter
    than two periods and hold no such stretch)."""
    ids = np.asarray(token_ids)
    if period < 1 or len(ids) <= period:
        return 0
    same = np.concatenate(([0], (ids[period:] == ids[:-period]).astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(same))  # starts and ends of the runs of matches, alternating
    streak = int((edges[1::2] - edges[::2]).max()) if len(edges) else 0
    return streak + period if streak else 0


def repeats(token_ids: Sequence[int]) -> bool:
    """Whether the response holds a run of back-to-back copies of one block of p <= MAX_PERIOD tokens
    spanning at least MIN_COPIES blocks and MIN_RUN tokens (module docstring)."""
    longest = min(MAX_PERIOD, len(token_ids) // MIN_COPIES)
    return any(longest_run(token_ids, p) >= max(MIN_COPIES * p, MIN_RUN) for p in range(1, longest + 1))


def mean_token_entropy(entropies: Sequence[float | None], positions: Sequence[int]) -> float | None:
    """The mean entropy per scored token over responses, given each response's mean entropy and how
    many positions it was taken over (responses without one are left out); None when none has one."""
    pairs = [(e, n) for e, n in zip(entropies, positions) if e is not None and n > 0]
    total = sum(n for _, n in pairs)
    return sum(e * n for e, n in pairs) / total if total else None
