"""Efficient-reasoning metrics: accuracy within token budgets, and tokens spent after the answer.

A shorter model is only better if it keeps its accuracy: :func:`accuracy_at_budget` says how much
accuracy each token budget would keep (on the :func:`budget_ladder` of the set's own lengths by
default), and :func:`tokens_after_first_correct` how long correct responses go on after first writing
the gold answer (located in the text by :func:`find_answer`).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from opsdlab.evaluation.metrics.samples import Sample, _group_by_problem

__all__ = ["LADDER_PERCENTILES", "accuracy_at_budget", "budget_ladder", "find_answer", "tokens_after_first_correct"]


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
