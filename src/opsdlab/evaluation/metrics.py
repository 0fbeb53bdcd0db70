"""Evaluation metrics for opsdlab: accuracy, length, and their uncertainty.

The project's central claim is about a trade-off: after RLVR, on-policy
self-distillation (OPSD) should shorten responses without losing accuracy.
Supporting that claim needs more than a point estimate, so this module
provides

* per-run summaries (avg@k, unbiased pass@k, maj@k, length statistics, and
  efficient-reasoning metrics: accuracy within token budgets and how many
  tokens a correct response spends after it first wrote the answer),
* uncertainty estimates that respect the data's structure (samples of the
  same problem are correlated, so the bootstrap resamples *problems*),
* paired comparisons between two evaluations of the same problems
  (accuracy flips, paired bootstrap of accuracy and length change),
* diagnostics for *how* responses got shorter (hesitation-marker density,
  per-position KL, tokens whose probability the teacher moves most).

Everything here is a pure function on plain Python lists, dataclasses and
numbers: no model, tokenizer or file I/O, so it is cheap to test and safe to
call from any stage. Results are JSON-able (plain ``int``/``float``/``str``/
``list``/``dict``/``None``), so they can be written straight into reports.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "Sample",
    "pass_at_k",
    "summarize",
    "budget_ladder",
    "accuracy_at_budget",
    "find_answer",
    "tokens_after_first_correct",
    "mean_ci",
    "per_problem_accuracy",
    "flips",
    "HESITATION_MARKERS",
    "hesitation_density",
    "length_change",
    "bootstrap_diff_ci",
    "per_position_mean",
    "top_tokens_by_shift",
]

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


# ---------------------------------------------------------------------------
# helpers


def _name_few(ids: Iterable[str]) -> str:
    """Format up to ``_MAX_NAMED`` ids for an error message, eliding the rest."""
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:_MAX_NAMED])
    if len(ids) > _MAX_NAMED:
        shown += f", ... ({len(ids) - _MAX_NAMED} more)"
    return shown


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


# ---------------------------------------------------------------------------
# accuracy


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
        "mean_tokens_correct": _mean_or_none(resp[correct_mask]),
        "mean_tokens_incorrect": _mean_or_none(resp[~correct_mask]),
        "accuracy_at_budget": accuracy_at_budget(samples, budgets),
        **tokens_after_first_correct(samples),
    }


# ---------------------------------------------------------------------------
# efficient reasoning: accuracy per token budget, tokens spent after the answer

# Percentiles of the response-length distribution that make the default budget ladder.
LADDER_PERCENTILES: tuple[float, ...] = (25.0, 50.0, 75.0, 90.0)


def budget_ladder(lengths: Sequence[int]) -> list[int]:
    """Default token budgets for :func:`accuracy_at_budget`, from the lengths themselves.

    The 25th, 50th, 75th and 90th percentiles of ``lengths`` (numpy's default
    linear interpolation) and their maximum, each rounded to the nearest
    integer (halves up), deduplicated and sorted. E.g. lengths 10, 25, 30, 40
    give ``[21, 28, 33, 37, 40]`` (21.25, 27.5, 32.5, 37.0, 40). A ladder from
    the set's own distribution always spans its short and long responses,
    whatever the model's verbosity; compare two checkpoints at the *same*
    budgets by passing one ladder explicitly.

    Raises:
        ValueError: for no lengths.
    """
    if len(lengths) == 0:
        raise ValueError("budget_ladder() needs at least one response length")
    values = np.asarray(lengths, dtype=float)
    points = [*np.percentile(values, LADDER_PERCENTILES), values.max()]
    return sorted({int(math.floor(float(p) + 0.5)) for p in points})


def _check_budgets(budgets: Sequence[int]) -> list[int]:
    """Deduplicated, sorted budgets; a ValueError naming the bad entries otherwise."""
    bad = [b for b in budgets if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 0]
    if bad or len(budgets) == 0:
        raise ValueError(f"budgets must be a non-empty list of integers >= 0, got {list(budgets)!r}")
    return sorted({int(b) for b in budgets})


def accuracy_at_budget(samples: Sequence[Sample], budgets: Sequence[int] | None = None) -> dict[str, float]:
    """Accuracy that a token budget would keep: ``{"<budget>": accuracy}``, budgets ascending.

    A sample is *correct within budget B* when it is correct, was not
    truncated, and its response (``response_tokens``, without the closing
    EOS) is at most ``B`` tokens long. A truncated response counts as wrong at
    every budget, even if an answer was extracted from it: it never finished,
    so no budget would have let it finish. (Its length still enters the
    default ladder.) The accuracy at ``B`` is avg@k-style: the mean over
    problems of the share of the problem's samples correct within ``B``.
    A curve that is already flat at small budgets means the long responses
    add length, not accuracy.

    ``budgets`` defaults to :func:`budget_ladder` of the samples' lengths;
    given budgets are deduplicated and sorted. Keys are the budgets as
    decimal strings (``{"64": 0.41}``): JSON object keys are strings anyway,
    so the dict reads the same before and after a round trip through
    ``summary.json``.

    Raises:
        ValueError: for no samples or a budget that is not an integer >= 0.
    """
    if not samples:
        raise ValueError("accuracy_at_budget() needs at least one sample")
    ladder = (budget_ladder([s.response_tokens for s in samples]) if budgets is None
              else _check_budgets(budgets))
    groups = _group_by_problem(samples)
    finished = [[(bool(s.correct) and not s.truncated, s.response_tokens) for s in g] for g in groups.values()]
    return {
        str(b): float(np.mean([np.mean([ok and length <= b for ok, length in g]) for g in finished]))
        for b in ladder
    }


def find_answer(text: str, answer: str) -> tuple[int, int] | None:
    """Character span ``(start, end)`` of the first whole appearance of ``answer`` in ``text``.

    ``answer`` (stripped) is matched literally, and only where it stands on
    its own as a number or expression, not as part of a longer one:

    * no letter, digit, ``_``, ``.``, ``/`` or ``^`` glued before it, no
      ``}{`` before it (a ``\\frac`` denominator), and no unary minus before it
      (``-12`` is not 12; ``24-12`` still contains 12);
    * no letter, digit, ``_`` or ``^`` after it, no decimal part (``12.5``),
      no ``/digit`` (``12/5``), no thousands group (``12,000``) and no ``}{``
      after it (a ``\\frac`` numerator).

    So "12" is found in "= 12.", "\\boxed{12}" and "24-12", but not in
    "112", "120", "-12", "3.12", "12.5", "12/5", "12,000" or "x_12".
    An equivalent but different spelling (``0.5`` for ``\\frac{1}{2}``,
    ``10,080`` for ``10080``) is not found, and a small answer that also
    occurs as a number in the problem may be found where the response merely
    restates it. Returns None when there is no such appearance or ``answer``
    is empty.
    """
    answer = answer.strip()
    if not answer:
        return None
    before = r"(?<![\w./^])(?<!\}\{)(?:(?<!-)|(?<=[\w)\]}]-))"
    after = r"(?![\w^])(?!\.\d)(?!/\d)(?!,\d{3}(?!\d))(?!\}\{)"
    match = re.search(before + re.escape(answer) + after, text)
    return None if match is None else match.span()


def tokens_after_first_correct(samples: Sequence[Sample]) -> dict:
    """How long correct responses go on after first writing the correct answer (overthinking).

    For each correct sample whose ``first_correct_token`` is known, the tokens
    after it are ``response_tokens - first_correct_token - 1`` (the tokens
    after the one that completes the first appearance of the gold answer;
    the closing EOS is not counted) and its share is that over
    ``response_tokens``. As evalscope's ThinkEval reports the tokens up to
    the first correct answer and their ratio to all reasoning tokens, this
    reports the remainder, over the whole response (a final summary after
    the reasoning counts as spent after the answer too).

    Returns ``tokens_after_first_correct`` (mean tokens after),
    ``tokens_after_first_correct_share`` (mean of the per-sample shares) —
    both ``None`` when no correct sample has a ``first_correct_token``, as in
    samples saved before the field existed — and
    ``tokens_after_first_correct_samples`` (how many samples the means are
    over; correct samples whose answer was not found verbatim are left out).

    Raises:
        ValueError: if a ``first_correct_token`` is not an index into its
            response, naming the sample.
    """
    after: list[int] = []
    shares: list[float] = []
    for s in samples:
        if not s.correct or s.first_correct_token is None:
            continue
        if not 0 <= s.first_correct_token < s.response_tokens:
            raise ValueError(
                f"problem {s.problem_id!r} sample {s.sample_index}: first_correct_token "
                f"{s.first_correct_token} is not in [0, response_tokens={s.response_tokens})"
            )
        after.append(s.response_tokens - s.first_correct_token - 1)
        shares.append(after[-1] / s.response_tokens)
    return {
        "tokens_after_first_correct": float(np.mean(after)) if after else None,
        "tokens_after_first_correct_share": float(np.mean(shares)) if shares else None,
        "tokens_after_first_correct_samples": len(after),
    }


# ---------------------------------------------------------------------------
# paired comparisons


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


# ---------------------------------------------------------------------------
# diagnostics of how responses change


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
