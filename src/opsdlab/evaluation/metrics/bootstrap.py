"""Percentile-bootstrap confidence intervals of a mean.

The resampling itself is shared: :func:`mean_ci` (one metric across training seeds), the avg@k
interval of :func:`opsdlab.evaluation.metrics.summary.summarize` (which resamples problems) and the
paired intervals of :func:`opsdlab.evaluation.metrics.comparison.bootstrap_diff_ci` all use the
argument checks and percentile interval here, so every interval in a report means the same thing.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["mean_ci"]


def _check_bootstrap_args(confidence: float, n_bootstrap: int) -> None:
    """Reject confidence levels outside (0, 1) and non-positive resample counts."""
    if not (0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")


def _percentile_interval(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile-bootstrap interval of the given resampled statistics."""
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _bootstrap_mean(
    values: np.ndarray, confidence: float, seed: int, n_bootstrap: int
) -> tuple[float, float, float]:
    """Mean of ``values`` with a percentile-bootstrap CI (resampling entries).

    Constant inputs return an exactly degenerate interval ``(v, v, v)`` rather
    than one that differs from ``v`` by floating-point summation error.
    """
    if values.size == 0:
        raise ValueError("cannot compute a mean of zero values")
    _check_bootstrap_args(confidence, n_bootstrap)
    if np.all(values == values[0]):
        v = float(values[0])
        return v, v, v
    mean = float(values.mean())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_bootstrap, values.size))
    lo, hi = _percentile_interval(values[idx].mean(axis=1), confidence)
    return mean, lo, hi


def mean_ci(
    values: Sequence[float],
    confidence: float = 0.95,
    seed: int = 0,
    n_bootstrap: int = 1000,
) -> tuple[float, float, float]:
    """Mean of ``values`` with a percentile-bootstrap confidence interval.

    Returns ``(mean, lo, hi)``. Intended for small sets of independent numbers,
    e.g. one metric across training seeds. A single value (or all-equal values)
    gives the degenerate interval ``(v, v, v)``: there is no spread to estimate.
    Deterministic for a given ``seed``.

    Raises:
        ValueError: for an empty list, ``confidence`` outside (0, 1) or
            ``n_bootstrap < 1``.
    """
    arr = np.asarray(list(values), dtype=float)
    return _bootstrap_mean(arr, confidence, seed, n_bootstrap)
