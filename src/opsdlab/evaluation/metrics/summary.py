"""One evaluation run summarized: avg@k with its uncertainty, unbiased pass@k, maj@k and lengths.

:func:`summarize` is what each evaluation writes into its ``summary.json``; it takes the
efficient-reasoning metrics from :mod:`opsdlab.evaluation.metrics.efficiency`. Samples of the same
problem are correlated, so the avg@k interval resamples *problems*.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np

from opsdlab.evaluation.metrics.bootstrap import _bootstrap_mean
from opsdlab.evaluation.metrics.collapse import mean_token_entropy
from opsdlab.evaluation.metrics.efficiency import accuracy_at_budget, tokens_after_first_correct
from opsdlab.evaluation.metrics.samples import _MAX_NAMED, Sample, _group_by_problem

__all__ = ["pass_at_k", "per_problem_accuracy", "summarize"]


def _majority_correct(group: Sequence[Sample]) -> bool:
    """maj@k outcome for one problem's samples (already sorted by index).

    The most frequent non-None answer wins, ties going to the answer that
    occurs first; it counts as correct if any sample with that answer is
    correct (the verifier may accept equivalent spellings that the string
    comparison here treats as different, so "any" is the generous reading).
    A problem with no extracted answer at all counts as wrong.
    """
    counts: Counter[str] = Counter()
    first_seen: dict[str, int] = {}
    for pos, s in enumerate(group):
        if s.answer is None:
            continue
        counts[s.answer] += 1
        first_seen.setdefault(s.answer, pos)
    if not counts:
        return False
    winner = min(counts, key=lambda a: (-counts[a], first_seen[a]))
    return any(s.correct for s in group if s.answer == winner)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator of Chen et al. (2021), ``1 - C(n-c,k)/C(n,k)``.

    The probability that at least one of ``k`` samples drawn without
    replacement from ``n`` generated samples (``c`` of them correct) is
    correct. Evaluated as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, which avoids
    the huge binomial coefficients of the direct formula.

    Raises:
        ValueError: if ``k > n``, ``k < 1``, ``n < 1`` or ``c`` is not in
            ``[0, n]``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"k={k} exceeds the number of samples n={n}")
    if n - c < k:
        # Every k-subset contains at least one correct sample.
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def per_problem_accuracy(samples: Sequence[Sample]) -> dict[str, float]:
    """Fraction of correct samples for each problem, keyed by problem id.

    Keys are in order of first appearance. Problems may have different numbers
    of samples here; uniformity is only enforced where an estimator needs it.
    """
    out: dict[str, list[int]] = {}
    for s in samples:
        tally = out.setdefault(s.problem_id, [0, 0])
        tally[0] += int(bool(s.correct))
        tally[1] += 1
    return {pid: c / n for pid, (c, n) in out.items()}


def summarize(
    samples: list[Sample],
    k: int | None = None,
    confidence: float = 0.95,
    seed: int = 0,
    n_bootstrap: int = 1000,
    budgets: Sequence[int] | None = None,
) -> dict:
    """Summarize one evaluation run: accuracy, its uncertainty, and lengths.

    Every problem must have the same number of samples ``n`` (reported as
    ``samples_per_problem``): otherwise avg@k would silently weight problems
    unequally and pass@k would mix different ``n``.

    Keys of the returned (JSON-able) dict:

    * ``num_problems``, ``num_samples``, ``samples_per_problem`` (= n),
      ``k`` (defaults to n), ``confidence``.
    * ``avg_at_k``: mean correctness over all samples (equivalently the mean of
      per-problem accuracies, since ``n`` is uniform).
    * ``avg_at_k_ci``: ``[lo, hi]`` percentile-bootstrap interval that
      resamples *problems* with replacement (samples of one problem are
      correlated, so resampling samples would understate the uncertainty);
      seeded with ``numpy.random.default_rng(seed)``.
    * ``avg_at_k_stderr``: sample standard deviation (ddof=1) of per-problem
      accuracies divided by sqrt(num_problems); 0.0 for a single problem.
    * ``pass_at_k``: mean over problems of the unbiased pass@k estimate from
      the problem's ``n`` samples.
    * ``maj_at_k``: fraction of problems whose majority answer is correct
      (see ``_majority_correct``); voting uses all ``n`` samples.
    * ``mean_response_tokens``, ``median_response_tokens``,
      ``mean_thinking_tokens``, ``truncation_rate``: over all samples.
    * ``repetition_rate``: the share of samples that repeat themselves
      (``Sample.repeats``, :func:`~.collapse.repeats`), over the samples that
      record it; ``None`` when none does.
    * ``mean_token_entropy``: the mean next-token entropy per scored token
      (``Sample.token_entropy``, weighted by each sample's scored positions:
      its response tokens and, unless truncated, its closing EOS); ``None``
      when no sample has one.
    * ``mean_tokens_correct``, ``mean_tokens_incorrect``: mean response
      length of correct / incorrect samples, ``None`` if there are none.
    * ``accuracy_at_budget``: ``{"<budget>": accuracy}`` from
      :func:`accuracy_at_budget` at ``budgets`` (default: the
      :func:`budget_ladder` of this set's response lengths).
    * ``tokens_after_first_correct``, ``tokens_after_first_correct_share``,
      ``tokens_after_first_correct_samples``: see
      :func:`tokens_after_first_correct`.

    Raises:
        ValueError: for no samples, uneven samples per problem (naming the
            offending problems), duplicate sample indices, ``k`` outside
            ``[1, n]``, a budget that is not an integer >= 0, or a
            ``first_correct_token`` outside its response.
    """
    if not samples:
        raise ValueError("summarize() needs at least one sample")
    groups = _group_by_problem(samples)
    sizes = {pid: len(g) for pid, g in groups.items()}
    n = Counter(sizes.values()).most_common(1)[0][0]
    uneven = [pid for pid, size in sizes.items() if size != n]
    if uneven:
        detail = ", ".join(f"{pid!r} has {sizes[pid]}" for pid in uneven[:_MAX_NAMED])
        more = f", ... ({len(uneven) - _MAX_NAMED} more)" if len(uneven) > _MAX_NAMED else ""
        raise ValueError(
            f"all problems must have the same number of samples; most have {n}, "
            f"but {detail}{more}"
        )
    if k is None:
        k = n
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, samples_per_problem={n}], got {k}")

    acc = np.array([sum(s.correct for s in g) / n for g in groups.values()])
    num_problems = len(groups)
    avg, lo, hi = _bootstrap_mean(acc, confidence, seed, n_bootstrap)
    stderr = float(acc.std(ddof=1) / math.sqrt(num_problems)) if num_problems > 1 else 0.0

    pass_k = float(
        np.mean([pass_at_k(n, sum(s.correct for s in g), k) for g in groups.values()])
    )
    maj_k = float(np.mean([_majority_correct(g) for g in groups.values()]))

    resp = np.array([s.response_tokens for s in samples], dtype=float)
    think = np.array([s.thinking_tokens for s in samples], dtype=float)
    correct_mask = np.array([bool(s.correct) for s in samples])

    def _mean_or_none(x: np.ndarray) -> float | None:
        return float(x.mean()) if x.size else None

    return {
        "num_problems": num_problems,
        "num_samples": len(samples),
        "samples_per_problem": n,
        "k": k,
        "confidence": confidence,
        "avg_at_k": avg,
        "avg_at_k_ci": [lo, hi],
        "avg_at_k_stderr": stderr,
        "pass_at_k": pass_k,
        "maj_at_k": maj_k,
        "mean_response_tokens": float(resp.mean()),
        "median_response_tokens": float(np.median(resp)),
        "mean_thinking_tokens": float(think.mean()),
        "truncation_rate": float(np.mean([bool(s.truncated) for s in samples])),
        "repetition_rate": _mean_or_none(np.array([s.repeats for s in samples if s.repeats is not None], dtype=float)),
        "mean_token_entropy": mean_token_entropy([s.token_entropy for s in samples],
                                                 [s.response_tokens + (not s.truncated) for s in samples]),
        "mean_tokens_correct": _mean_or_none(resp[correct_mask]),
        "mean_tokens_incorrect": _mean_or_none(resp[~correct_mask]),
        "accuracy_at_budget": accuracy_at_budget(samples, budgets),
        **tokens_after_first_correct(samples),
    }
