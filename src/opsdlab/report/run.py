"""One run's report: `write_run_report(run_dir)` writes `report/report.md` and its figures for a
pipeline run without `seed-<n>/` folders (a run over seeds gets this for each seed, see `seeds`), and
`stage_summary` is the one-line-per-evaluation summary the commands print after a run.
"""

from __future__ import annotations

import json
from pathlib import Path

from opsdlab.report.changes import run_changes
from opsdlab.report.checks import checks_section
from opsdlab.report.compare import methods_section
from opsdlab.report.figures import (draw_changes, palette, plot_accuracy_length, plot_length_distributions,
                                    plot_training_curves)
from opsdlab.report.findings import change_finding, reading_guide
from opsdlab.report.probe import probe_table
from opsdlab.report.rundir import (_samples, arm_of, checkpoint_order, is_main_set, k_of, load_eval, opsd_seed_of,
                                   reference_of, run_config, training_warning, training_warnings)
from opsdlab.report.samples import sample_section
from opsdlab.report.tables import MARKERS, arm_summary, changes_table, results_table
from opsdlab.report.token_shifts import token_shifts


def set_description(run_dir: Path, names: list[str], set_name: str) -> str:
    """What a set's evaluation is: problems, samples per problem, temperature, token limit."""
    s = next((s for n in names if (s := load_eval(run_dir, n, set_name))), None)
    if s is None:
        return f"`{set_name}`: no finished evaluation yet."
    sampling = s.get("sampling", {})
    return (f"`{set_name}`: {s['num_problems']} held-out problems, {s['samples_per_problem']} sampled responses "
            f"each at temperature {sampling.get('temperature', '?')}, at most {sampling.get('max_new_tokens', '?')} "
            f"tokens.")


def stage_summary(run_dir: Path) -> list[str]:
    """One line per evaluated checkpoint and set: sampled and greedy accuracy, length, teacher prompts."""
    lines = []
    for name in checkpoint_order(run_dir):
        folder = run_dir / "eval" / name
        for set_name in sorted(p.name for p in folder.iterdir() if is_main_set(p.name)):
            main = load_eval(run_dir, name, set_name)
            lo, hi = main["avg_at_k_ci"]
            line = f"{name:>20} {set_name}: avg@{main['samples_per_problem']} {main['avg_at_k']:.3f} [{lo:.3f}, {hi:.3f}]"
            if greedy := load_eval(run_dir, name, f"{set_name}-greedy"):
                line += f"  greedy {greedy['avg_at_k']:.3f}"
            line += f"  mean tokens {main['mean_response_tokens']:.1f}"
            for teacher in sorted(folder.glob(f"{set_name}-teacher-*")):
                t = load_eval(run_dir, name, teacher.name)
                line += f"  teacher prompt ({t['context']}) {t['avg_at_k']:.3f}"
            if note := training_warning(run_dir, name):
                line += f"  WARNING: {note}"
            lines.append(line)
    return lines


def write_run_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report/report.md` and its figures for one pipeline run (`seeds.write_report` picks
    it for a run directory without `seed-<n>/` folders)."""
    run_dir = Path(run_dir)
    out_dir = run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    config = run_config(run_dir)
    names = checkpoint_order(run_dir)
    reference = reference_of(names)
    colors = palette(config, names)
    set_names = sorted({p.name for n in names for p in (run_dir / "eval" / n).iterdir() if is_main_set(p.name)})
    first = (load_eval(run_dir, names[0], set_names[0]) or {}) if names and set_names else {}

    found, sections = training_warnings({"": run_dir}), []
    for set_name in set_names:
        k = k_of([run_dir], set_name)
        changes = run_changes(run_dir, set_name)
        found += [f"`{set_name}`:", ""] * (len(set_names) > 1)
        found += [change_finding(name, before, d) for (name, before), d in changes.items()] or \
            ["- None yet: no two evaluated checkpoints to compare."]
        found.append("")
        md = [f"## {set_name}", "", set_description(run_dir, names, set_name), "",
              "### Checkpoints", "", *results_table(run_dir, names, set_name, k), ""]
        if arms := arm_summary(run_dir, names, set_name, k):
            md += ["### OPSD arms over OPSD seeds", "", *arms, ""]
        plot_accuracy_length(run_dir, names, set_name, colors, k, out_dir / f"accuracy_length_{set_name}.png")
        md += ["### Accuracy against length", "", f"![accuracy vs length](accuracy_length_{set_name}.png)", ""]
        if changes:
            md += ["### Each checkpoint against the one it started from", "",
                   *changes_table(run_dir, changes, set_name), "",
                   f"Hesitation markers counted: {', '.join(repr(m) for m in MARKERS)}.", ""]
        several = len(config.get("opsd_seeds") or []) > 1  # then each point is labelled with its OPSD seed
        if arm_points := [(arm_of(name), f"s{opsd_seed_of(name)}" * several, d) for (name, _), d in changes.items()
                          if name.startswith("opsd-")]:
            draw_changes(arm_points, reference, colors, f"OPSD arms against {reference}, one point per arm"
                         f"{' and OPSD seed' * several} (paired 95% CI over problems): {set_name}",
                         out_dir / f"changes_{set_name}.png")
            md += [f"![changes](changes_{set_name}.png)", ""]
        arm_ds = {name: d for (name, _), d in changes.items() if name.startswith("opsd-")}
        md += methods_section(run_dir, config, arm_ds, reference, set_name,
                              lambda name: _samples(run_dir, name, set_name), colors, out_dir)
        if plot_length_distributions(run_dir, names, set_name, colors, out_dir / f"lengths_{set_name}.png"):
            md += ["### Length of correct and incorrect responses", "", f"![lengths](lengths_{set_name}.png)", ""]
        md += ["### Sample responses", "", *sample_section(run_dir, names, set_name, reference)]
        sections += md

    md = [f"# opsdlab report: `{run_dir.name}`", "",
          f"Checkpoints evaluated: {', '.join(f'`{n}`' for n in names) or 'none yet'}. Each OPSD arm starts from "
          f"`{reference}`; each stage is compared with the checkpoint it started from.", "",
          "## Findings", "",
          "Each line: the paired change of accuracy (pp) and length (%) with its 95% CI; a change is stated only "
          "when its CI excludes 0, else \"no change detected\".", "", *found,
          *reading_guide(k_of([run_dir], set_names[0]) if set_names else "k",
                         first.get("sampling", {}).get("max_new_tokens")),
          *sections]
    md += checks_section(run_dir, config, names, out_dir)
    if plot_training_curves(run_dir, config, colors, out_dir / "training_curves.png"):
        md += ["## Training curves", "", "![training curves](training_curves.png)", ""]
    if probe := probe_table(run_dir):
        md += ["## The teacher prompt during SFT", "", *probe, ""]
    if shifts := token_shifts(run_dir, config, colors, out_dir / "kl_by_position.png"):
        md += ["## What the teacher changes", "", *shifts, "", "![divergence by position](kl_by_position.png)", ""]
    stage_lines = [json.loads(line)["message"] for line in (run_dir / "summary.jsonl").read_text().splitlines()
                   if line.strip()] if (run_dir / "summary.jsonl").exists() else []
    md += ["## Settings", "", f"- verifier: `{json.dumps(first.get('verifier', {}))}`",
           f"- sampling: `{json.dumps(first.get('sampling', {}))}`, thinking: {first.get('thinking')}",
           f"- OPSD arms: `{json.dumps(config.get('arms', []))}`, seeds {config.get('opsd_seeds')}", "",
           "## Run log", "", *[f"- {line}" for line in stage_lines], ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(md))
    return path
