"""The report over pipeline seeds, and `write_report`, the report of any run directory.

`write_report(run_dir)` writes the report over seeds for a run with `seed-<n>/` folders (each seed's
own report, then the aggregate in `run_dir/report/`, computed from the seed directories alone:
spread per checkpoint, the teacher advantage and every arm's paired change per seed, and as findings
only what holds in every seed), and the one-run report (`run.write_run_report`) otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

from opsdlab.report.changes import (against_all_arm, lead_and_change, seed_changes, stage_changes, teacher_advantages,
                                    teacher_stage_changes)
from opsdlab.report.checks import plot_seed_checks, seed_checks_table
from opsdlab.report.compare import method_rows, seeds_methods_section
from opsdlab.report.figures import draw_changes, draw_lead_vs_change, palette
from opsdlab.report.findings import findings, opsd_comparisons, reading_guide
from opsdlab.report.probe import probe_seed_table
from opsdlab.report.rundir import (_samples, _union_order, arm_of, checkpoint_order, is_main_set, k_of, reference_of,
                                   run_config, seed_dirs, training_warnings)
from opsdlab.report.run import write_run_report
from opsdlab.report.tables import change_table, holds_table, seed_checkpoint_table, teacher_advantage_table


def write_seeds_report(run_dir: Path, seeds: dict[int, Path]) -> Path:
    """The report of a run over pipeline seeds: each seed's own report, then the aggregate in
    `run_dir/report/`, computed from the seed directories alone."""
    for seed_dir in seeds.values():
        write_report(seed_dir)
    out_dir = run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    config = run_config(run_dir)
    order = [int(seed) for seed in config.get("seeds") or []] or list(seeds)  # a seed still to run holds nothing
    opsd_order = [int(seed) for seed in config.get("opsd_seeds") or []]
    names = _union_order([checkpoint_order(d) for d in seeds.values()])
    colors = palette(config, names)
    set_names = sorted({p.name for d in seeds.values() for n in checkpoint_order(d)
                        for p in (d / "eval" / n).iterdir() if is_main_set(p.name)})
    references = {reference_of(checkpoint_order(d)) for d in seeds.values()} - {None}
    reference = " / ".join(sorted(references)) or "–"
    n_seeds = f"{len(seeds)} pipeline seed{'s' if len(seeds) != 1 else ''}"
    found, sections = training_warnings({f"seed {seed} ": d for seed, d in seeds.items()}), []
    for set_name in set_names:
        advantages = teacher_advantages(seeds, set_name)
        stages = stage_changes(seeds, set_name)
        teacher_stages = teacher_stage_changes(seeds, set_name)
        changes = seed_changes(seeds, set_name)
        versus_all = against_all_arm(seeds, set_name)
        comparisons = ([(f"`{name}`", f"`{before}`", by_seed, order, "in every seed")
                        for (name, before), by_seed in stages.items()]
                       + [(f"`{name}` on the teacher prompt (`{context}`)", f"`{before}` on the same prompt", by_seed,
                           order, "in every seed")
                          for context, by_stage in teacher_stages.items()
                          for (name, before), by_seed in by_stage.items()]
                       + opsd_comparisons(changes, f"`{reference}`", order, opsd_order)
                       + opsd_comparisons(versus_all, "the `all` arm", order, opsd_order))
        seed_rows = {seed: method_rows(d, run_config(d), {name: by_seed[seed] for name, by_seed in changes.items()
                                                          if seed in by_seed}, set_name)
                     for seed, d in seeds.items()}
        front_found, methods_md = seeds_methods_section(
            seed_rows, {seed: reference_of(checkpoint_order(d)) for seed, d in seeds.items()},
            lambda seed, name: _samples(seeds[seed], name, set_name), order, colors, set_name, out_dir)
        found += [f"`{set_name}`:", ""] * (len(set_names) > 1) + [*findings(advantages, comparisons, order),
                                                                   *front_found, ""]
        md = [f"## {set_name}", "", "### Checkpoints over seeds", "", *seed_checkpoint_table(seeds, set_name), ""]
        for (name, before), by_seed in stages.items():
            md += [f"### `{name}` against `{before}` per seed", "", *change_table({name: by_seed}, before, "stage"),
                   "", *holds_table({name: by_seed}, order), ""]
        if advantages:
            md += ["### Teacher advantage per seed (teacher prompt avg@k − student prompt avg@k, paired 95% CI)",
                   "", *teacher_advantage_table(advantages, order), ""]
        for context, by_stage in teacher_stages.items():
            for (name, before), by_seed in by_stage.items():
                md += [f"### The teacher prompt (`{context}`): `{name}` against `{before}` per seed", "",
                       "The same model read through the teacher's prompt at both stages: whether the stage kept "
                       "what OPSD's teacher relies on.", "",
                       *change_table({name: by_seed}, before, "stage"), "", *holds_table({name: by_seed}, order), ""]
        if changes:
            md += [f"### OPSD arms against their seed's `{reference}`", "", *change_table(changes, reference),
                   "", *holds_table(changes, order), ""]
            points = [(arm_of(name), f"s{seed}", d) for name, by_seed in changes.items()
                      for seed, d in sorted(by_seed.items())]
            per = "pipeline seed and OPSD seed" if len(opsd_order) > 1 else "pipeline seed"
            draw_changes(points, reference, colors, f"OPSD arms against {reference}, one point per {per}\n"
                         f"({n_seeds}, paired 95% CI over problems): {set_name}", out_dir / f"changes_{set_name}.png")
            md += [f"![changes](changes_{set_name}.png)", ""]
            if leads := lead_and_change(seeds, config, advantages, changes):
                draw_lead_vs_change(leads, reference, colors, "Teacher's lead vs the arm's accuracy change, one "
                                    f"point per seed and arm\n({n_seeds}, paired 95% CI over problems): {set_name}",
                                    out_dir / f"lead_vs_change_{set_name}.png")
                md += [f"### The teacher's lead at `{reference}` against each arm's accuracy change", "",
                       "Whether what an arm does to accuracy follows how much better its teacher prompt is than the "
                       "student prompt at the checkpoint OPSD starts from (the teacher advantage table's row for the "
                       "arm's teacher context). A descriptive figure: no finding is drawn from it.", "",
                       f"![lead vs change](lead_vs_change_{set_name}.png)", ""]
        md += methods_md
        if versus_all:
            md += ["### OPSD arms against the `all` arm (same pipeline seed and OPSD seed)", "",
                   "Whether the gate or the teacher's context made a difference, paired on the same problems.", "",
                   *change_table(versus_all, "all"), "", *holds_table(versus_all, order), ""]
        sections += md
    md = [f"# opsdlab report over pipeline seeds: `{run_dir.name}`", "",
          "## Findings (hold in every seed)", "",
          "A **finding** is a change whose paired 95% CI excludes 0 with the same sign in every seed; an OPSD arm "
          "trained with several OPSD seeds states a finding only if it holds for every pipeline seed and every OPSD "
          "seed. Everything else is in the tables below and is not stated as a result.", "", *found,
          *reading_guide(k_of(seeds.values(), set_names[0]) if set_names else "k", None, with_flips=False),
          "## The seeds", "",
          f"Seeds {order} ({len(seeds)} present): each is a whole pipeline run (SFT, RLVR, OPSD arms) in `seed-<n>/`, "
          "with its own report (" + ", ".join(f"[seed {s}](../{d.name}/report/report.md)" for s, d in seeds.items())
          + "). Each seed draws its own training data and, for a generated task, its own held-out problems; OPSD arms "
          f"are compared with their own seed's starting checkpoint (`{reference}`). Per-seed values are shown as "
          "mean ± sd (min–max) over seeds.", "", *sections]
    if checked := seed_checks_table(seeds):
        md += ["## Held-out checks during training", "",
               "Per stage and seed: the check whose weights the stage kept (its selection rule's pick), the step a "
               "stopping rule ended training at, and the kept check's held-out mean length against the stage's start "
               "and its last check, and its avg@k against the start. Each seed's own report shows every check.", "",
               *checked, ""]
        if plot_seed_checks(seeds, colors, out_dir / "checks_over_seeds.png"):
            md += ["Every check of every seed (line style: seed; x: a stopping rule ended training; star: the check "
                   "`model/` holds):", "", "![checks over seeds](checks_over_seeds.png)", ""]
    if probe := probe_seed_table(seeds):
        md += ["## The teacher prompt during SFT", "", *probe, ""]
    md += ["## Settings", "", f"- pipeline seeds: {order}, present: {list(seeds)}",
           f"- OPSD arms: `{json.dumps(config.get('arms', []))}`, OPSD seeds {config.get('opsd_seeds')}", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(md))
    return path


def write_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report/report.md` and its figures; a run over pipeline seeds gets the aggregate."""
    run_dir = Path(run_dir)
    if seeds := seed_dirs(run_dir):
        return write_seeds_report(run_dir, seeds)
    return write_run_report(run_dir)
