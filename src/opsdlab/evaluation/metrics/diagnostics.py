"""Diagnostics of *how* responses got shorter: hesitation markers, per-position means, token shifts.

Self-distillation is expected to compact reasoning by removing redundant self-verification; these
functions look for that in the text (:func:`hesitation_density` of "wait", "hmm", ...), along the
response (:func:`per_position_mean`, e.g. teacher-student KL by position) and per token
(:func:`top_tokens_by_shift`: the words the teacher lowers or raises most).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

__all__ = ["HESITATION_MARKERS", "hesitation_density", "per_position_mean", "top_tokens_by_shift"]


HESITATION_MARKERS: tuple[str, ...] = (
    "wait",
    "hmm",
    "perhaps",
    "let me check",
    "double-check",
    "actually",
    "alternatively",
)


def _marker_pattern(marker: str) -> re.Pattern[str]:
    """Case-insensitive whole-word/phrase regex for ``marker``.

    Lookarounds instead of ``\\b`` so that markers starting or ending with a
    non-word character still anchor correctly; any run of whitespace matches a
    space inside a phrase (so a line break inside "let me\\ncheck" counts).
    """
    body = r"\s+".join(re.escape(part) for part in marker.split())
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def hesitation_density(
    texts: list[str],
    markers: Sequence[str] = HESITATION_MARKERS,
    per_tokens: int = 1000,
    token_counts: list[int] | None = None,
) -> dict:
    """Frequency of hesitation markers ("wait", "hmm", ...) in responses.

    Compaction by self-distillation is expected to remove redundant
    self-verification; these markers are a cheap textual proxy for it.
    Matching is case-insensitive and whole-word: "Wait," and "HMM" count,
    "waiting" does not.

    Density is pooled: total marker count divided by total length, times
    ``per_tokens`` (so long responses weigh more than in a mean of per-text
    densities). Length is ``sum(token_counts)`` when given, otherwise the
    number of whitespace-separated words.

    Returns a dict with ``counts`` (marker -> int), ``total_markers``,
    ``total_tokens``, ``density`` (markers per ``per_tokens`` tokens),
    ``per_marker_density`` (marker -> float), ``per_tokens`` and
    ``num_texts``. Densities are 0.0 when the total length is 0.

    Raises:
        ValueError: if ``token_counts`` has a different length than ``texts``
            or ``per_tokens`` is not positive.
    """
    if per_tokens <= 0:
        raise ValueError(f"per_tokens must be positive, got {per_tokens}")
    if token_counts is not None and len(token_counts) != len(texts):
        raise ValueError(
            f"token_counts has {len(token_counts)} entries but there are {len(texts)} texts"
        )
    patterns = {m: _marker_pattern(m) for m in markers}
    counts = {m: sum(len(p.findall(t)) for t in texts) for m, p in patterns.items()}
    total_tokens = (
        int(sum(token_counts)) if token_counts is not None else sum(len(t.split()) for t in texts)
    )
    total = sum(counts.values())

    def _density(c: int) -> float:
        return c * per_tokens / total_tokens if total_tokens > 0 else 0.0

    return {
        "num_texts": len(texts),
        "per_tokens": per_tokens,
        "counts": counts,
        "total_markers": total,
        "total_tokens": total_tokens,
        "density": _density(total),
        "per_marker_density": {m: _density(c) for m, c in counts.items()},
    }


def per_position_mean(
    values_per_row: list[list[float]], bucket: int = 1, max_len: int | None = None
) -> list[float]:
    """Mean of a per-token quantity by response position, for plotting.

    Row ``r`` contributes ``values_per_row[r][t]`` to position ``t`` only if it
    is long enough, so late positions average over the longer responses only
    (padding never dilutes the mean). Positions are grouped into consecutive
    buckets of ``bucket`` positions; each bucket's value is the mean of all
    values falling in it (the last bucket may be partial). Positions at or
    beyond ``max_len`` are ignored. Used, e.g., to draw teacher–student KL
    against response position.

    Returns one float per bucket, covering positions up to the longest row
    (capped at ``max_len``); an empty list if there are no values.

    Raises:
        ValueError: if ``bucket < 1`` or ``max_len < 0``.
    """
    if bucket < 1:
        raise ValueError(f"bucket must be >= 1, got {bucket}")
    if max_len is not None and max_len < 0:
        raise ValueError(f"max_len must be >= 0, got {max_len}")
    length = max((len(r) for r in values_per_row), default=0)
    if max_len is not None:
        length = min(length, max_len)
    if length == 0:
        return []
    sums = np.zeros(length, dtype=float)
    counts = np.zeros(length, dtype=np.int64)
    for row in values_per_row:
        m = min(len(row), length)
        if m:
            sums[:m] += np.asarray(row[:m], dtype=float)
            counts[:m] += 1
    n_buckets = -(-length // bucket)
    pad = n_buckets * bucket - length
    sums = np.pad(sums, (0, pad)).reshape(n_buckets, bucket).sum(axis=1)
    counts = np.pad(counts, (0, pad)).reshape(n_buckets, bucket).sum(axis=1)
    # Every bucket holds at least one position < length, which the longest row covers.
    return [float(x) for x in sums / counts]


def top_tokens_by_shift(
    records: list[tuple[str, float]], n: int = 15, min_count: int = 5
) -> dict:
    """Tokens whose log-probability the teacher shifts most, on average.

    ``records`` are ``(token_string, teacher_logp − student_logp)`` pairs for
    tokens the student sampled. Averaging per token string shows which words
    self-distillation suppresses (negative shift, e.g. "Wait") and which it
    promotes. Tokens seen fewer than ``min_count`` times are dropped because
    their means are noise. Non-finite shifts (e.g. from a ``-inf`` logp) are
    skipped and counted.

    Returns a dict with

    * ``lowered``: up to ``n`` tokens with negative mean shift, most negative
      first;
    * ``raised``: up to ``n`` tokens with positive mean shift, most positive
      first;

    each entry ``{"token", "mean_shift", "count"}`` (ties broken by higher
    count, then token string, for determinism); plus ``num_records``,
    ``num_skipped_nonfinite``, ``num_distinct_tokens`` and ``num_eligible``
    (distinct tokens meeting ``min_count``). A token never appears in both
    lists.

    Raises:
        ValueError: if ``n < 0`` or ``min_count < 1``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    skipped = 0
    for token, shift in records:
        shift = float(shift)
        if not math.isfinite(shift):
            skipped += 1
            continue
        sums[token] = sums.get(token, 0.0) + shift
        counts[token] = counts.get(token, 0) + 1
    eligible = [
        {"token": t, "mean_shift": sums[t] / c, "count": c}
        for t, c in counts.items()
        if c >= min_count
    ]
    lowered = sorted(
        (e for e in eligible if e["mean_shift"] < 0),
        key=lambda e: (e["mean_shift"], -e["count"], e["token"]),
    )[:n]
    raised = sorted(
        (e for e in eligible if e["mean_shift"] > 0),
        key=lambda e: (-e["mean_shift"], -e["count"], e["token"]),
    )[:n]
    return {
        "num_records": len(records),
        "num_skipped_nonfinite": skipped,
        "num_distinct_tokens": len(counts),
        "num_eligible": len(eligible),
        "lowered": lowered,
        "raised": raised,
    }
