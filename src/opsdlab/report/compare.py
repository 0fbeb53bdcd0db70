"""Which compaction to pick: every arm's method side by side against the checkpoint it started from.

A report section built from a run directory (or the seed directories of a run over seeds) alone:

- the method table: per arm (a budget arm: per budget), its method, the paired change of accuracy
  and length against the start with 95% CIs, the tokens spent after the correct answer first
  appeared (overthinking), the accuracy-efficiency score, and what its training cost (the rollout
  tokens it generated, its optimizer steps, wall seconds);
- budget curves: accuracy within a token budget B (correct, finished, at most B tokens) against B,
  on one grid of budgets shared by every checkpoint of the set;
- the accuracy-length plane's Pareto front: the checkpoints (the start among them) that no other one
  beats on both avg@k and mean length. Over seeds, a method is stated as on the front only when it is
  on it in every seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from opsdlab.evaluation.metrics.efficiency import accuracy_at_budget  # noqa: E402
from opsdlab.modeling.runtime import read_jsonl  # noqa: E402
from opsdlab.stages.rollout_budget import read_stage_tokens  # noqa: E402

GRID_POINTS = 12


def arm_methods(config: dict) -> dict[str, str]:
    """Arm name -> its compaction method, from a run's config.yaml (an arm without `method` takes the
    `opsd` section's, and that defaults to "opsd")."""
    default = (config.get("opsd") or {}).get("method", "opsd")
    return {entry["name"]: entry.get("method", default) for entry in config.get("arms") or []}


def arm_and_method(config: dict, label: str) -> tuple[str, str]:
    """The arm and method behind a checkpoint's arm label: `correct` -> (correct, opsd); a budget arm's
    evaluation `forced-q50` -> (forced, budget). Unknown labels are their own arm, method "opsd"."""
    methods = arm_methods(config)
    if label in methods:
        return label, methods[label]
    arm = label.rsplit("-", 1)[0]
    if methods.get(arm) == "budget":
        return arm, "budget"
    return label, "opsd"


def training_cost(run_dir: Path, checkpoint: str) -> dict:
    """What training a checkpoint's arm took: wall seconds (summary.jsonl's stage line), and the rollout
    tokens it generated and optimizer steps it took (its stage's `rollout_budget.ROLLOUT_TOKENS_FILE`:
    response tokens of every generation round, refills and dropped rollouts included). None where not
    recorded (a run from before the count was kept); a budget arm trains nothing (its rows show 0)."""
    stages = [r for r in read_jsonl(run_dir / "summary.jsonl")
              if r.get("kind") == "stage" and r.get("stage") == checkpoint]
    spent = read_stage_tokens(run_dir / "opsd" / checkpoint.removeprefix("opsd-")) or {}
    return {"seconds": stages[-1].get("seconds") if stages else None, "tokens": spent.get("rollout_tokens"),
            "steps": spent.get("steps")}


def pareto_front(points: dict[str, tuple[float, float]]) -> set[str]:
    """The names whose (accuracy, length) no other point dominates: at least as accurate and at most as
    long, and strictly better in one of the two."""
    def dominated(a: tuple[float, float]) -> bool:
        return any(b[0] >= a[0] and b[1] <= a[1] and (b[0] > a[0] or b[1] < a[1]) for b in points.values())

    return {name for name, point in points.items() if not dominated(point)}


def budget_grid(lengths: list[int], points: int = GRID_POINTS) -> list[int]:
    """One grid of budgets for every curve of a set: `points` evenly spaced token counts from the
    shortest response to the longest (deduplicated, so fewer for a narrow range)."""
    if not lengths:
        return []
    return sorted({int(round(b)) for b in np.linspace(min(lengths), max(lengths), points)})


def method_rows(run_dir: Path, config: dict, changes: dict[str, dict], set_name: str) -> list[dict]:
    """One row per arm checkpoint: its arm, method, paired change (`report.paired_change` against the
    start), overthinking and training cost."""
    rows = []
    for name, d in changes.items():
        label = name.removeprefix("opsd-").rsplit("-s", 1)[0]
        arm, method = arm_and_method(config, label)
        summary_path = run_dir / "eval" / name / set_name / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        rows.append({"checkpoint": name, "label": label, "arm": arm, "method": method, "change": d,
                     "overthinking": summary.get("tokens_after_first_correct"),
                     "overthinking_share": summary.get("tokens_after_first_correct_share"),
                     "budget": summary.get("budget"), **training_cost(run_dir, name)})
    order = list(arm_methods(config))  # the configured arm order; a budget arm's budgets in ascending order
    return sorted(rows, key=lambda row: (order.index(row["arm"]) if row["arm"] in order else len(order),
                                         row["budget"] or 0, row["checkpoint"]))


def _cell(value, pattern: str) -> str:
    return "–" if value is None else pattern.format(value)


def _spent(row: dict, key: str):
    """A row's training cost `key` (`training_cost`): 0 for a budget arm, which trains nothing."""
    return 0 if row["method"] == "budget" else row.get(key)


def method_table(rows: list[dict], reference: str) -> list[str]:
    lines = [f"| arm | method | Δacc vs {reference} [95% CI] | length change [95% CI] | tokens after first correct "
             "(share) | AES | rollout tokens | steps | train seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        d = row["change"]
        lo, hi = d["accuracy_diff_ci"]
        llo, lhi = d["length_change_ci"]
        over = (f"{row['overthinking']:.1f} ({row['overthinking_share']:.0%})"
                if row["overthinking"] is not None and row["overthinking_share"] is not None else "–")
        budget = f" (B={row['budget']})" if row.get("budget") else ""
        lines.append(f"| {row['label']}{budget} | {row['method']} | {100 * d['accuracy_diff']:+.1f} pp "
                     f"[{100 * lo:+.1f}, {100 * hi:+.1f}] | {d['length_change']:+.1%} [{llo:+.1%}, {lhi:+.1%}] | "
                     f"{over} | {_cell(d.get('aes'), '{:+.3f}')} | "
                     f"{_cell(_spent(row, 'tokens'), '{:,.0f}')} | {_cell(_spent(row, 'steps'), '{:.0f}')} | "
                     f"{_cell(_spent(row, 'seconds'), '{:.0f}')} |")
    return lines


def plane_points(reference: str, rows: list[dict]) -> dict[str, tuple[float, float]]:
    """(avg@k, mean length) of the start and of every arm checkpoint, from the paired changes."""
    if not rows:
        return {}
    first = rows[0]["change"]
    points = {reference: (first["accuracy_before"], first["mean_length_before"])}
    points.update({row["label"]: (row["change"]["accuracy_after"], row["change"]["mean_length_after"]) for row in rows})
    return points


def budget_curves(samples_by_name: dict[str, list]) -> tuple[list[int], dict[str, dict[str, float]]]:
    """The shared grid and each checkpoint's accuracy within every budget of it."""
    lengths = [s.response_tokens for samples in samples_by_name.values() for s in samples]
    grid = budget_grid(lengths)
    if not grid:
        return [], {}
    return grid, {name: accuracy_at_budget(samples, grid) for name, samples in samples_by_name.items() if samples}


def plot_budget_curves(grid: list[int], curves: dict[str, list[dict[str, float]]], colors: dict, title: str,
                       out: Path) -> None:
    """Accuracy within budget against the budget, one line per checkpoint (the mean over the seeds
    given, each seed's curve faint behind it)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, per_seed in curves.items():
        color = colors.get(name, "tab:gray")
        values = np.array([[curve[str(b)] for b in grid] for curve in per_seed])
        if len(per_seed) > 1:
            for row in values:
                ax.plot(grid, row, color=color, alpha=0.2, lw=0.8)
        ax.plot(grid, values.mean(axis=0), color=color, lw=1.8, label=name, marker=".")
    ax.set_xlabel("token budget B")
    ax.set_ylabel("accuracy within B (correct, finished, ≤ B tokens)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def front_line(front: set[str], points: dict[str, tuple[float, float]]) -> str:
    ordered = sorted(front, key=lambda name: points[name][1])
    return ", ".join(f"`{name}` ({points[name][0]:.3f}, {points[name][1]:.1f} tokens)" for name in ordered)


def methods_section(run_dir: Path, config: dict, changes: dict[str, dict], reference: str, set_name: str,
                    samples_of, colors: dict, out_dir: Path) -> list[str]:
    """The single-run section: method table, Pareto front, budget curves (`samples_of(name)`: a
    checkpoint's samples on the set, or None)."""
    rows = method_rows(run_dir, config, changes, set_name)
    if not rows:
        return []
    points = plane_points(reference, rows)
    names = [reference, *[row["checkpoint"] for row in rows]]
    grid, curves = budget_curves({name: samples_of(name) for name in names})
    md = ["### Compaction methods against the start", "",
          "Each arm against the checkpoint it started from on the same problems. *Tokens after first correct*: in "
          "correct responses, the tokens that follow the first appearance of the correct answer (overthinking), "
          "with its share of the response. *Rollout tokens*: the response tokens the arm generated while it trained "
          "(every generation round, refills and dropped rollouts included; prompts not counted) and *steps* its "
          "optimizer steps: under a rollout-token budget (`max_rollout_tokens`) an arm ends at the step that "
          "reaches it, so arms of equal budget show equal tokens and the steps each bought. A budget arm trains "
          "nothing.", "", *method_table(rows, reference), "",
          f"On the accuracy–length Pareto front (avg@k, mean tokens; no other checkpoint as accurate and as short, "
          f"better in one): {front_line(pareto_front(points), points)}.", ""]
    if grid:
        plot_budget_curves(grid, {name: [curve] for name, curve in curves.items()}, colors,
                           f"accuracy within a token budget: {set_name}", out_dir / f"budgets_{set_name}.png")
        md += [f"![budget curves](budgets_{set_name}.png)", ""]
    return md


def seeds_methods_section(seed_rows: dict[int, list[dict]], references: dict[int, str], samples_of,
                          seeds: list[int], colors: dict, set_name: str, out_dir: Path) -> tuple[list[str], list[str]]:
    """Over seeds: (findings lines, section lines). `seed_rows`: each seed's `method_rows`;
    `samples_of(seed, name)`: a checkpoint's samples in a seed. A method is on the front in every seed
    when every seed has it and it is on that seed's front. A seed with no reference checkpoint yet
    (its run still going) has nothing to compare and is left out."""
    references = {seed: name for seed, name in references.items() if name is not None}
    seed_rows = {seed: rows for seed, rows in seed_rows.items() if seed in references}
    if not any(seed_rows.values()):
        return [], []
    fronts, labels = {}, []
    for seed, rows in seed_rows.items():
        points = plane_points(references[seed], rows)
        fronts[seed] = pareto_front(points)
        labels += [row["label"] for row in rows if row["label"] not in labels]
    reference = " / ".join(sorted(set(references.values())))
    on_front = [label for label in [*sorted(set(references.values())), *labels]
                if all(seed in fronts and label in fronts[seed] for seed in seeds)]
    findings = [f"- On the accuracy–length Pareto front in every seed: {', '.join(f'`{n}`' for n in on_front)}."
                if on_front else "- No checkpoint is on the accuracy–length Pareto front in every seed."]
    md = ["### Compaction methods over seeds", "",
          f"Per arm: its change against its seed's `{reference}` (mean ± sd over seeds of the point estimates), "
          "how often it is on its seed's accuracy–length Pareto front, the overthinking tokens and the training "
          "cost (rollout tokens, optimizer steps, seconds). Each seed's own report has the CIs.", "",
          "| arm | method | Δacc (pp) | length change | on the front | tokens after first correct | AES | "
          "rollout tokens | steps | train seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label in labels:
        per_seed = {seed: next(r for r in rows if r["label"] == label) for seed, rows in seed_rows.items()
                    if any(r["label"] == label for r in rows)}
        first = next(iter(per_seed.values()))

        def stat(values, pattern):
            values = [v for v in values if v is not None]
            if not values:
                return "–"
            sd = np.std(values, ddof=1) if len(values) > 1 else 0.0
            return f"{pattern.format(np.mean(values))} ± {pattern.replace('+', '').format(sd)}"

        cost = (lambda key: [_spent(r, key) for r in per_seed.values()])
        changes = [r["change"] for r in per_seed.values()]
        md.append(f"| {label} | {first['method']} | {stat([100 * d['accuracy_diff'] for d in changes], '{:+.1f}')} | "
                  f"{stat([100 * d['length_change'] for d in changes], '{:+.1f}')} % | "
                  f"{sum(label in fronts[s] for s in per_seed)}/{len(seeds)} | "
                  f"{stat([r['overthinking'] for r in per_seed.values()], '{:.1f}')} | "
                  f"{stat([d.get('aes') for d in changes], '{:+.3f}')} | "
                  f"{stat(cost('tokens'), '{:,.0f}')} | {stat(cost('steps'), '{:.1f}')} | "
                  f"{stat(cost('seconds'), '{:.0f}')} |")
    md.append("")
    samples = {(seed, name): found for seed, rows in seed_rows.items()
               for name in [references[seed], *[row["checkpoint"] for row in rows]]
               if (found := samples_of(seed, name))}
    grid = budget_grid([sample.response_tokens for found in samples.values() for sample in found])
    if grid:
        curves: dict[str, list] = {}
        for (seed, name), found in samples.items():
            curves.setdefault(name, []).append(accuracy_at_budget(found, grid))
        plot_budget_curves(grid, curves, colors, f"accuracy within a token budget, mean over seeds: {set_name}",
                           out_dir / f"budgets_{set_name}.png")
        md += [f"![budget curves](budgets_{set_name}.png)", ""]
    return findings, md

