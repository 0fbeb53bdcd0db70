"""The report's Markdown tables and their cells: checkpoints and their spread over seeds, paired
changes with their CIs, the teacher advantage, and whether each change holds in every seed.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from opsdlab.evaluation.metrics.diagnostics import HESITATION_MARKERS, hesitation_density
from opsdlab.report.changes import holds_in_every_seed
from opsdlab.report.rundir import _samples, _union_order, arm_of, checkpoint_order, k_of, load_eval, training_warning


MARKERS = HESITATION_MARKERS + ("let me add them again",)


def _fmt(value, pattern="{:.3f}") -> str:
    return "–" if value is None else pattern.format(value)


def _pp(d: dict) -> str:
    lo, hi = d["accuracy_diff_ci"]
    return f"{100 * d['accuracy_diff']:+.1f} pp [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _pct(d: dict) -> str:
    lo, hi = d["length_change_ci"]
    return f"{d['length_change']:+.1%} [{lo:+.1%}, {hi:+.1%}]"


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max of per-seed values."""
    arr = np.asarray(values, dtype=float)
    return {"n": len(arr), "mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max())}


def _spread_cell(values: list[float], pattern: str) -> str:
    """mean ± sd (min–max) over seeds; the plain value when there is one seed (no spread to show)."""
    s = spread(values)
    if s["n"] == 1:
        return pattern.format(s["mean"])
    return (f"{pattern.format(s['mean'])} ± {pattern.format(s['sd'])} "
            f"({pattern.format(s['min'])}–{pattern.format(s['max'])})")


def results_table(run_dir: Path, names: list[str], set_name: str, k) -> list[str]:
    lines = [f"| checkpoint | avg@{k} [95% CI] | pass@{k} | maj@{k} | greedy | mean tokens | median | thinking | "
             f"truncated | teacher prompt avg@{k} |", "|" + "---|" * 10]
    for name in names:
        s = load_eval(run_dir, name, set_name)
        if s is None:
            continue
        greedy = load_eval(run_dir, name, f"{set_name}-greedy")
        teacher = [load_eval(run_dir, name, p.name)
                   for p in sorted((run_dir / "eval" / name).glob(f"{set_name}-teacher-*"))]
        teacher_text = ", ".join(f"{t['context']}: {t['avg_at_k']:.3f}" for t in teacher if t) or "–"
        mark = " (**WARNING**: see Findings)" if training_warning(run_dir, name) else ""
        lines.append(
            f"| {name}{mark} | {s['avg_at_k']:.3f} [{s['avg_at_k_ci'][0]:.3f}, {s['avg_at_k_ci'][1]:.3f}] | "
            f"{s['pass_at_k']:.3f} | {s['maj_at_k']:.3f} | {_fmt(greedy and greedy['avg_at_k'])} | "
            f"{s['mean_response_tokens']:.1f} | {s['median_response_tokens']:.0f} | {s['mean_thinking_tokens']:.1f} | "
            f"{s['truncation_rate']:.1%} | {teacher_text} |")
    return lines


def arm_summary(run_dir: Path, names: list[str], set_name: str, k) -> list[str]:
    """Per OPSD arm trained with several OPSD seeds: accuracy and length over those seeds (empty when
    every arm has one seed: the results table already holds it)."""
    by_arm = defaultdict(list)
    for name in names:
        if name.startswith("opsd-") and (s := load_eval(run_dir, name, set_name)):
            by_arm[arm_of(name)].append(s)
    if all(len(runs) < 2 for runs in by_arm.values()):
        return []
    lines = [f"| arm | OPSD seeds | avg@{k}: mean ± sd (min–max) | mean tokens: mean ± sd (min–max) |",
             "|---|---|---|---|"]
    for arm, runs in by_arm.items():
        lines.append(f"| {arm} | {len(runs)} | {_spread_cell([r['avg_at_k'] for r in runs], '{:.3f}')} | "
                     f"{_spread_cell([r['mean_response_tokens'] for r in runs], '{:.1f}')} |")
    return lines


def changes_table(run_dir: Path, changes: dict[tuple[str, str], dict], set_name: str) -> list[str]:
    """Each checkpoint against the one it started from: paired changes, AES, flips and hesitation."""
    lines = ["| checkpoint | against | Δ accuracy [95% CI] | length change [95% CI] | AES | correct→incorrect | "
             "incorrect→correct | hesitation markers / 1k tokens (before → after) |", "|---" * 8 + "|"]
    for (name, before), d in changes.items():
        density = [_fmt(hesitation_density([s.text for s in samples], MARKERS,
                                           token_counts=[s.response_tokens for s in samples])["density"], "{:.1f}")
                   for samples in (_samples(run_dir, before, set_name), _samples(run_dir, name, set_name))]
        lines.append(f"| {name} | {before} | {_pp(d)} | {_pct(d)} | {_fmt(d['aes'], '{:+.3f}')} | "
                     f"{d['flips']['correct_to_incorrect']} | {d['flips']['incorrect_to_correct']} | "
                     f"{density[0]} → {density[1]} |")
    return lines


def seed_checkpoint_table(seeds: dict[int, Path], set_name: str) -> list[str]:
    """Per checkpoint, over seeds: avg@k and mean response tokens as mean ± sd (min–max)."""
    names = _union_order([checkpoint_order(d) for d in seeds.values()])
    lines = [f"| checkpoint | seeds | avg@{k_of(seeds.values(), set_name)}: mean ± sd (min–max) | "
             "mean tokens: mean ± sd (min–max) |",
             "|---|---|---|---|"]
    for name in names:
        runs = [s for d in seeds.values() if (s := load_eval(d, name, set_name))]
        if runs:
            lines.append(f"| {name} | {len(runs)} | {_spread_cell([r['avg_at_k'] for r in runs], '{:.3f}')} | "
                         f"{_spread_cell([r['mean_response_tokens'] for r in runs], '{:.1f}')} |")
    return lines


# How a sign that holds in every seed reads, per quantity.
_HOLDS = {"accuracy_diff": {1: "higher in every seed", -1: "lower in every seed", 0: "no"},
          "length_change": {1: "longer in every seed", -1: "shorter in every seed", 0: "no"}}


def teacher_advantage_table(advantages: dict, seeds: list[int]) -> list[str]:
    lines = ["| checkpoint | teacher context | " + " | ".join(f"seed {s}" for s in seeds)
             + " | teacher vs student |", "|---|---|" + "---|" * (len(seeds) + 1)]
    for (name, context), by_seed in advantages.items():
        cells = " | ".join(_pp(by_seed[s]) if s in by_seed else "–" for s in seeds)
        holds = _HOLDS["accuracy_diff"][holds_in_every_seed(by_seed, seeds, "accuracy_diff")]
        lines.append(f"| {name} | {context} | {cells} | {holds} |")
    return lines


def change_table(changes: dict, reference: str, label: str = "checkpoint") -> list[str]:
    lines = [f"| {label} | seed | Δacc vs {reference} [95% CI] | length change [95% CI] | AES |",
             "|---|---|---|---|---|"]
    for name, by_seed in changes.items():
        for seed, d in sorted(by_seed.items()):
            lines.append(f"| {name} | {seed} | {_pp(d)} | {_pct(d)} | {_fmt(d['aes'], '{:+.3f}')} |")
    return lines


def holds_table(changes: dict, seeds: list[int]) -> list[str]:
    """Per OPSD checkpoint: whether its accuracy and length change keep one sign, CI excluding 0, in
    every seed (a checkpoint missing in some seed holds nothing)."""
    lines = ["| checkpoint | seeds | accuracy: holds in every seed | length: holds in every seed |",
             "|---|---|---|---|"]
    for name, by_seed in changes.items():
        cells = " | ".join(_HOLDS[key][holds_in_every_seed(by_seed, seeds, key)]
                           for key in ("accuracy_diff", "length_change"))
        lines.append(f"| {name} | {len(by_seed)}/{len(seeds)} | {cells} |")
    return lines
