"""What a report states as a result, and how to read it: the findings lines (one run: each paired
change with its CI, named a change only when the CI excludes 0; over seeds: only what keeps its
sign in every seed, or every pipeline and OPSD seed for an arm with several OPSD seeds) and the
guide to the metrics that precedes the tables.
"""

from __future__ import annotations

from collections import defaultdict

from opsdlab.report.changes import consistent_sign, holds_in_every_seed
from opsdlab.report.rundir import arm_of, opsd_seed_of
from opsdlab.report.tables import _pct, _pp


def reading_guide(k: int | str, max_tokens: int | None, with_flips: bool = True) -> list[str]:
    """What every metric of the report means, before its first use."""
    limit = f" ({max_tokens} tokens here)" if max_tokens else ""
    return [
        "## How to read this report", "",
        f"- **avg@{k}** (avg@k with k = {k}): each held-out problem gets {k} sampled responses; avg@{k} is the share "
        "of correct responses, averaged over problems (the accuracy of one sampled response). Its 95% CI resamples "
        "problems.",
        f"- **pass@{k}**: the share of problems with at least one correct response among the {k} (unbiased "
        f"estimator, Chen et al. 2021). **maj@{k}**: the share of problems whose most frequent answer among the "
        f"{k} is correct. **greedy**: accuracy of one temperature-0 response per problem.",
        "- **length**: tokens in a response (its thinking included, its end token not); *mean tokens* averages "
        f"over all responses. **truncated**: the share of responses that hit the generation limit{limit} "
        "before finishing (they rarely contain an answer).",
        "- **pp** (percentage points): the difference of two accuracies, e.g. 40% → 43% is +3 pp. Length "
        "changes are relative: −10% is a tenth shorter.",
        "- **paired 95% CI**: both checkpoints answered the same problems, so the bootstrap resamples problems "
        "(1000 draws) and recomputes both on each draw; problem difficulty cancels out. A change is stated as "
        "a finding only when its CI excludes 0.",
        "- **AES** (accuracy-efficiency score, O1-Pruner): ΔL + 3·ΔAcc, or ΔL − 5·|ΔAcc| when accuracy drops, "
        "with ΔL = (L_before − L) / L_before (positive: shorter) and ΔAcc = (Acc − Acc_before) / Acc_before, "
        "both relative; above 0 is a better trade. E.g. 20% shorter at a 10% relative accuracy loss: "
        "0.2 − 5·0.1 = −0.3.",
        *[f"- **correct→incorrect / incorrect→correct**: problems solved (more than half of the {k} responses "
          "correct) before and not after, and the reverse."] * with_flips, ""]


def change_finding(name: str, before: str, d: dict) -> str:
    """One paired change as a findings line: each of accuracy (pp) and length (%) with its CI, named
    as a change only when the CI excludes 0."""
    acc, length = _pp(d), _pct(d)
    acc_text = {1: f"more accurate, {acc}", -1: f"less accurate, {acc}",
                0: f"accuracy: no change detected ({acc})"}[consistent_sign([d["accuracy_diff_ci"]])]
    length_text = {1: f"longer, {length}", -1: f"shorter, {length}",
                   0: f"length: no change detected ({length})"}[consistent_sign([d["length_change_ci"]])]
    return f"- `{name}` against `{before}`: {acc_text}; {length_text}."


def findings(advantages: dict, comparisons: list[tuple], seeds: list[int]) -> list[str]:
    """The statements that hold in every seed (same sign, 95% CI excluding 0), as bullet lines.
    `comparisons`: (what is compared, what it is compared with, draw -> paired change, the draws it
    must hold in, how those draws read), the first two as Markdown phrases (e.g. "`opsd-all-s0`",
    "`rlvr`"); a draw is a pipeline seed, or a (pipeline seed, OPSD seed) pair for an arm pooled by
    `opsd_comparisons`."""
    out = []
    for (name, context), by_seed in advantages.items():
        if sign := holds_in_every_seed(by_seed, seeds, "accuracy_diff"):
            diffs = [100 * d["accuracy_diff"] for d in by_seed.values()]
            out.append(f"- At `{name}`, the teacher prompt (`{context}`) is {'more' if sign > 0 else 'less'} accurate "
                       f"than the student prompt in every seed ({min(diffs):+.1f} to {max(diffs):+.1f} pp).")
    for name, reference, by_draw, draws, scope in comparisons:
        if sign := holds_in_every_seed(by_draw, draws, "accuracy_diff"):
            diffs = [100 * d["accuracy_diff"] for d in by_draw.values()]
            out.append(f"- {name} is {'more' if sign > 0 else 'less'} accurate than {reference} {scope} "
                       f"({min(diffs):+.1f} to {max(diffs):+.1f} pp).")
        if sign := holds_in_every_seed(by_draw, draws, "length_change"):
            pct = [100 * d["length_change"] for d in by_draw.values()]
            out.append(f"- {name} is {'longer' if sign > 0 else 'shorter'} than {reference} {scope} "
                       f"({min(pct):+.1f}% to {max(pct):+.1f}%).")
    return out or ["- None: no change keeps its sign with a 95% CI excluding 0 in every seed."]


def opsd_comparisons(changes: dict[str, dict[int, dict]], reference: str, seeds: list[int],
                     opsd_seeds: list[int]) -> list[tuple]:
    """`findings` comparisons for OPSD checkpoints against `reference` (a Markdown phrase).

    With one OPSD seed, one per checkpoint, over the pipeline seeds. With several, one per arm,
    over every (pipeline seed, OPSD seed) pair: an arm's finding must hold whichever OPSD draw
    trained it, not for one draw that happened to land on one side (on the demo's task, `concise`
    against `all` had its CI below 0 in all three pipeline seeds with OPSD seed 0, in one with OPSD
    seed 1 and in none with OPSD seed 2).
    """
    if len(opsd_seeds) <= 1:
        return [(f"`{name}`", reference, by_seed, seeds, "in every seed") for name, by_seed in changes.items()]
    pooled: dict[str, dict[tuple[int, int], dict]] = defaultdict(dict)
    for name, by_seed in changes.items():
        for seed, d in by_seed.items():
            pooled[arm_of(name)][(seed, opsd_seed_of(name))] = d
    draws = [(seed, opsd_seed) for seed in seeds for opsd_seed in opsd_seeds]
    label = ", ".join(str(opsd_seed) for opsd_seed in opsd_seeds)
    return [(f"`opsd-{arm}` (OPSD seeds {label})", reference, by_draw, draws, "in every pipeline seed and OPSD seed")
            for arm, by_draw in pooled.items()]
