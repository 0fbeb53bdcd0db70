"""Two evaluations of the same problems compared: accuracy flips, paired bootstrap, length change, AES.

Aggregate accuracy can hide churn, and two independent intervals are much wider than a paired one:
:func:`flips` counts the problems a stage fixed and broke, :func:`bootstrap_diff_ci` resamples the
same problems for both runs so problem difficulty cancels out of the difference, and
:func:`length_change` / :func:`accuracy_efficiency_score` put a length change next to the accuracy
change it cost.
"""

from __future__ import annotations

import numpy as np

from opsdlab.evaluation.metrics.bootstrap import _check_bootstrap_args, _percentile_interval
from opsdlab.evaluation.metrics.samples import Sample, _check_same_problems, _group_by_problem
from opsdlab.evaluation.metrics.summary import per_problem_accuracy

__all__ = ["accuracy_efficiency_score", "bootstrap_diff_ci", "flips", "length_change"]


def flips(before: list[Sample], after: list[Sample], threshold: float = 0.5) -> dict:
    """Compare two evaluations of the same problems problem by problem.

    A problem counts as *solved* when its per-problem accuracy is strictly
    greater than ``threshold`` (so with the default 0.5, a problem solved in
    exactly half of its samples is "not solved"). Aggregate accuracy can hide
    churn: a stage may fix some problems and break others; the flip counts make
    that visible.

    Returns a dict with integer counts ``correct_to_incorrect``,
    ``incorrect_to_correct``, ``stayed_correct``, ``stayed_incorrect``, the
    problem-id lists ``correct_to_incorrect_ids`` and
    ``incorrect_to_correct_ids`` (in order of first appearance in ``before``),
    ``mean_accuracy_change_per_problem`` (mean of after − before per-problem
    accuracy), ``num_problems`` and ``threshold``.

    Raises:
        ValueError: if either side is empty or some problems appear on only
            one side (the first few are named).
    """
    if not before or not after:
        raise ValueError("flips() needs non-empty before and after samples")
    acc_b = per_problem_accuracy(before)
    acc_a = per_problem_accuracy(after)
    _check_same_problems(acc_b, acc_a)

    c2i: list[str] = []
    i2c: list[str] = []
    stayed_c = stayed_i = 0
    for pid, b in acc_b.items():
        was, now = b > threshold, acc_a[pid] > threshold
        if was and not now:
            c2i.append(pid)
        elif now and not was:
            i2c.append(pid)
        elif was:
            stayed_c += 1
        else:
            stayed_i += 1
    change = float(np.mean([acc_a[pid] - acc_b[pid] for pid in acc_b]))
    return {
        "num_problems": len(acc_b),
        "threshold": threshold,
        "correct_to_incorrect": len(c2i),
        "incorrect_to_correct": len(i2c),
        "stayed_correct": stayed_c,
        "stayed_incorrect": stayed_i,
        "correct_to_incorrect_ids": c2i,
        "incorrect_to_correct_ids": i2c,
        "mean_accuracy_change_per_problem": change,
    }


def length_change(before_mean: float, after_mean: float) -> float:
    """Relative change ``(after − before) / before``; −0.3 means 30% shorter.

    Raises:
        ValueError: if ``before_mean`` is 0 (the ratio is undefined).
    """
    if before_mean == 0:
        raise ValueError("before_mean is 0; relative length change is undefined")
    return (after_mean - before_mean) / before_mean


def accuracy_efficiency_score(acc_ref: float, acc: float, len_ref: float, length: float,
                              reward: float = 3.0, penalty: float = 5.0) -> float:
    """Accuracy-efficiency score (AES) of a checkpoint against a reference (O1-Pruner, arXiv 2501.12570).

    ΔL = (L_ref − L) / L_ref (positive when shorter) and ΔAcc = (Acc − Acc_ref) / Acc_ref;
    AES = ΔL + reward·ΔAcc when ΔAcc ≥ 0, else ΔL − penalty·|ΔAcc|: an accuracy drop costs more
    than the same gain earns. E.g. 20% shorter at 10% relative accuracy loss: 0.2 − 5·0.1 = −0.3.

    Raises:
        ValueError: if the reference accuracy or length is 0 (the relative changes are undefined).
    """
    if acc_ref <= 0 or len_ref <= 0:
        raise ValueError(f"AES needs a reference with accuracy and length above 0, got {acc_ref} and {len_ref}")
    delta_length = (len_ref - length) / len_ref
    delta_acc = (acc - acc_ref) / acc_ref
    if delta_acc >= 0:
        return delta_length + reward * delta_acc
    return delta_length - penalty * abs(delta_acc)


def bootstrap_diff_ci(
    before: list[Sample],
    after: list[Sample],
    confidence: float = 0.95,
    seed: int = 0,
    n_bootstrap: int = 1000,
) -> dict:
    """Paired bootstrap over problems of the accuracy and length change.

    Each bootstrap replicate draws one set of problems with replacement and
    evaluates *both* runs on it, so problem difficulty cancels out of the
    difference (a paired test is much tighter than comparing two independent
    intervals).

    Both statistics weight problems equally: accuracy is the mean of
    per-problem accuracies and mean length the mean of per-problem mean
    response lengths (with a uniform number of samples per problem these are
    the sample-level means reported by :func:`summarize`). The two runs may use
    different numbers of samples per problem.

    Returns a JSON-able dict with ``accuracy_before``, ``accuracy_after``,
    ``accuracy_diff`` (after − before) and ``accuracy_diff_ci`` ``[lo, hi]``;
    ``mean_length_before``, ``mean_length_after``, ``length_change`` (relative,
    see :func:`length_change`) and ``length_change_ci``; plus
    ``num_problems``, ``confidence`` and ``n_bootstrap``.

    Raises:
        ValueError: for empty inputs, problems present on only one side,
            a zero mean length before, or bad ``confidence``/``n_bootstrap``.
    """
    if not before or not after:
        raise ValueError("bootstrap_diff_ci() needs non-empty before and after samples")
    _check_bootstrap_args(confidence, n_bootstrap)
    gb = _group_by_problem(before)
    ga = _group_by_problem(after)
    _check_same_problems(gb, ga)
    pids = list(gb)

    def _per_problem(groups: dict[str, list[Sample]]) -> tuple[np.ndarray, np.ndarray]:
        acc = np.array([np.mean([s.correct for s in groups[p]]) for p in pids], dtype=float)
        length = np.array(
            [np.mean([s.response_tokens for s in groups[p]]) for p in pids], dtype=float
        )
        return acc, length

    acc_b, len_b = _per_problem(gb)
    acc_a, len_a = _per_problem(ga)
    mean_len_b, mean_len_a = float(len_b.mean()), float(len_a.mean())
    if mean_len_b == 0:
        raise ValueError("mean response length before is 0; relative change is undefined")

    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(pids), size=(n_bootstrap, len(pids)))
    diff_stats = acc_a[idx].mean(axis=1) - acc_b[idx].mean(axis=1)
    boot_len_b = len_b[idx].mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_stats = len_a[idx].mean(axis=1) / boot_len_b - 1.0
    # A replicate can only have zero "before" length if it drew exclusively
    # zero-length problems; such replicates carry no information on a ratio.
    rel_stats = rel_stats[np.isfinite(rel_stats)]
    if rel_stats.size == 0:
        raise ValueError("every bootstrap replicate had zero mean length before")

    diff = float(acc_a.mean() - acc_b.mean())
    return {
        "num_problems": len(pids),
        "confidence": confidence,
        "n_bootstrap": n_bootstrap,
        "accuracy_before": float(acc_b.mean()),
        "accuracy_after": float(acc_a.mean()),
        "accuracy_diff": diff,
        "accuracy_diff_ci": list(_percentile_interval(diff_stats, confidence)),
        "mean_length_before": mean_len_b,
        "mean_length_after": mean_len_a,
        "length_change": length_change(mean_len_b, mean_len_a),
        "length_change_ci": list(_percentile_interval(rel_stats, confidence)),
    }
