"""The report's figures and colours: one colour per checkpoint in every figure, accuracy against
length, length histograms, training curves and the paired-change scatters with CI bars.
"""

from __future__ import annotations

import textwrap
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from opsdlab.evaluation.metrics.bootstrap import mean_ci  # noqa: E402
from opsdlab.modeling.runtime import read_jsonl  # noqa: E402
from opsdlab.report.rundir import _samples, arm_of, load_eval  # noqa: E402


STAGE_COLORS = {"base": "tab:gray", "sft": "tab:brown", "rlvr": "black"}
ARM_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:pink", "tab:olive", "tab:cyan")
POINT_MARKERS = "os^DvP*Xph"


def palette(config: dict, names=()) -> dict[str, str]:
    """The one colour of each checkpoint in every figure of a report: fixed for base, sft and rlvr,
    one per OPSD arm in configured order, keyed by arm (`all`) and by checkpoint (`opsd-all-s0`;
    an arm's OPSD seeds share its colour)."""
    arms = [entry["name"] for entry in config.get("arms") or []]
    arms += sorted({arm_of(n) for n in names if n.startswith("opsd-")} - set(arms))
    colors = {**STAGE_COLORS, **{arm: ARM_COLORS[i % len(ARM_COLORS)] for i, arm in enumerate(arms)}}
    return {**colors, **{n: colors[arm_of(n)] for n in names if n.startswith("opsd-")}}


def _save(fig, out: Path) -> None:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_accuracy_length(run_dir: Path, names: list[str], set_name: str, colors: dict, k, out: Path) -> None:
    """avg@k against mean length per checkpoint, both with 95% CIs over problems; each point labelled,
    the labels stacked in a column beside the points so that close points stay readable."""
    points = []
    for name in names:
        s, samples = load_eval(run_dir, name, set_name), _samples(run_dir, name, set_name)
        if s is None or samples is None:
            continue
        lengths = defaultdict(list)
        for sample in samples:
            lengths[sample.problem_id].append(sample.response_tokens)
        _, x_lo, x_hi = mean_ci([np.mean(v) for v in lengths.values()])
        points.append((name, s["mean_response_tokens"], x_lo, x_hi, s["avg_at_k"], *s["avg_at_k_ci"]))
    if not points:
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (name, x, x_lo, x_hi, y, y_lo, y_hi) in enumerate(points):
        ax.errorbar(x, y, xerr=[[x - x_lo], [x_hi - x]], yerr=[[y - y_lo], [y_hi - y]], fmt=POINT_MARKERS[i % 10],
                    ms=7, capsize=3, color=colors.get(name, "tab:gray"), alpha=0.85, label=name)
    x_left, x_right = min(p[2] for p in points), max(p[3] for p in points)
    x_span = x_right - x_left or 1.0
    y_span = max(p[6] for p in points) - min(p[5] for p in points) or 0.1
    label_ys = _spread_apart(sorted(p[4] for p in points), 0.07 * y_span)
    for (name, x, _, _, y, _, _), label_y in zip(sorted(points, key=lambda p: p[4]), label_ys):
        ax.annotate(name, (x, y), xytext=(x_right + 0.08 * x_span, label_y), fontsize=8, va="center",
                    color=colors.get(name, "tab:gray"), arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.6"})
    ax.set_xlim(x_left - 0.05 * x_span, x_right + 0.45 * x_span)  # room for the labels' column
    ax.set_xlabel("mean response tokens (95% CI over problems)")
    ax.set_ylabel(f"avg@{k} accuracy (95% CI over problems)")
    ax.set_title(f"accuracy vs length: {set_name}")
    ax.grid(alpha=0.3)
    _save(fig, out)


def _spread_apart(values: list[float], gap: float) -> list[float]:
    """Sorted `values` moved apart to at least `gap` from each other, centred on where they were."""
    moved = list(values)
    for i in range(1, len(moved)):
        moved[i] = max(moved[i], moved[i - 1] + gap)
    shift = (sum(moved) - sum(values)) / len(values) if values else 0.0
    return [v - shift for v in moved]


def plot_length_distributions(run_dir: Path, names: list[str], set_name: str, colors: dict, out: Path) -> bool:
    """Per checkpoint, response-length histograms of correct and incorrect responses as outlines on
    shared bins, so neither hides the other."""
    loaded = {n: s for n in names if n != "base" and (s := _samples(run_dir, n, set_name))}
    if not loaded:
        return False
    tokens = [s.response_tokens for samples in loaded.values() for s in samples]
    bins = np.linspace(min(tokens), max(max(tokens), min(tokens) + 1), 25)  # shared by every panel
    fig, axes = plt.subplots(1, len(loaded), figsize=(3.2 * len(loaded), 3.2), sharey=True, squeeze=False)
    for ax, (name, samples) in zip(axes[0], loaded.items()):
        for correct, color, label in ((True, "tab:green", "correct"), (False, "tab:red", "incorrect")):
            tokens = [s.response_tokens for s in samples if s.correct == correct]
            ax.hist(tokens, bins=bins, histtype="step", lw=1.6, color=color, label=f"{label} ({len(tokens)})")
        ax.set_title(name, fontsize=9, color=colors.get(name, "black"))
        ax.set_xlabel("response tokens")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("responses")
    _save(fig, out)
    return True


def plot_training_curves(run_dir: Path, config: dict, colors: dict, out: Path) -> bool:
    """Rollout accuracy and length (RLVR and OPSD arms), then each stage's own loss on its own axis:
    SFT cross-entropy, the RLVR policy loss and the OPSD divergence are different quantities."""
    files = {s: run_dir / s / "metrics.jsonl" for s in ("sft", "rlvr")}
    files.update({f"opsd-{p.parent.name}": p for p in sorted((run_dir / "opsd").glob("*/metrics.jsonl"))})
    records = {name: read_jsonl(path) for name, path in files.items() if path.exists()}
    opsd = config.get("opsd") or {}
    divergence = "/".join(sorted({arm.get("divergence", opsd.get("divergence", "divergence"))
                                  for arm in config.get("arms") or [{}]}))
    panels = [("rollouts/accuracy", "rollout accuracy", lambda n: n != "sft"),
              ("rollouts/mean_length", "rollout length (tokens)", lambda n: n != "sft"),
              ("loss", "SFT loss (cross-entropy)", lambda n: n == "sft"),
              ("loss", f"RLVR loss ({(config.get('rlvr') or {}).get('loss_type', 'policy')})", lambda n: n == "rlvr"),
              ("loss", f"OPSD loss (per-token {divergence})", lambda n: n.startswith("opsd-"))]
    panels = [p for p in panels if any(p[2](n) and any(p[0] in r for r in rs) for n, rs in records.items())]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (key, label, shown) in zip(axes[0], panels):
        for name, rows in records.items():
            points = sorted({r["step"]: r[key] for r in rows if key in r}.items())  # a resumed run relogs steps
            if shown(name) and points:
                ax.plot(*zip(*points), label=name, lw=1.2, marker=".", color=colors.get(name, "tab:gray"))
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    _save(fig, out)
    return True


def draw_changes(points: list[tuple[str, str, dict]], reference: str, colors: dict, title: str, out: Path) -> None:
    """Accuracy change (pp) against length change (%) with paired CI bars; one colour per arm.

    `points` are (arm, note, paired_change); a non-empty note is written next to its point.
    """
    draw_ci_scatter([(arm, note, _scaled(d, "length_change"), _scaled(d, "accuracy_diff")) for arm, note, d in points],
                    f"length change vs {reference} (%)", f"accuracy change vs {reference} (pp)", colors, title, out)


def _scaled(d: dict, key: str) -> tuple[float, float, float]:
    """(value, CI low, CI high) of `key` in a paired change, in percent / percentage points."""
    low, high = d[f"{key}_ci"]
    return 100 * d[key], 100 * low, 100 * high


def draw_ci_scatter(points: list[tuple[str, str, tuple, tuple]], xlabel: str, ylabel: str, colors: dict, title: str,
                    out: Path) -> None:
    """One point per (arm, note, (x, x low, x high), (y, y low, y high)) with its CI bars on both axes,
    in the arm's colour and marker, the note written next to its point; grey lines at 0."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    arms = list(dict.fromkeys(arm for arm, *_ in points))
    for arm, note, (x, xl, xh), (y, yl, yh) in points:
        color = colors.get(arm, "tab:gray")
        ax.errorbar(x, y, xerr=[[x - xl], [xh - x]], yerr=[[y - yl], [yh - y]], fmt=POINT_MARKERS[arms.index(arm) % 10],
                    capsize=2, color=color, alpha=0.85, label=arm)
        if note:
            ax.annotate(note, (x, y), textcoords="offset points", xytext=(4, 4 + 8 * arms.index(arm)), fontsize=7,
                        color=color)  # one row per arm, so that notes of coinciding points stay apart
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, 90), fontsize=9)  # a long title wraps instead of leaving the figure
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, out)


def draw_lead_vs_change(points: list[tuple[str, int, dict, dict]], reference: str, colors: dict, title: str,
                        out: Path) -> None:
    """The arm's accuracy change (pp) against its teacher's advantage at the start (pp), with paired
    CI bars; one colour per arm, each point labelled with its pipeline seed."""
    draw_ci_scatter([(arm, f"s{seed}", _scaled(lead, "accuracy_diff"), _scaled(change, "accuracy_diff"))
                     for arm, seed, lead, change in points],
                    f"teacher prompt − student prompt accuracy at {reference} (pp)",
                    f"arm's accuracy change vs {reference} (pp)", colors, title, out)
