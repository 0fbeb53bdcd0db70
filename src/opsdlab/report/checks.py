"""Held-out checks during training: the checks, stop and selection files an RLVR or OPSD stage
writes (`stages.checks`), read and validated, and shown as a table and a figure per run and as a
table of each seed's selected and stop step over seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from opsdlab.report.figures import _save, palette  # noqa: E402
from opsdlab.report.rundir import _union_order, arm_of  # noqa: E402
from opsdlab.report.tables import _fmt  # noqa: E402
from opsdlab.stages.checks import CHECKS, SELECTION, STOP  # noqa: E402  # the file names the stages write


CHECK_FIELDS = ("step", "avg_at_k", "avg_at_k_ci", "mean_response_tokens")


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def stage_checks(run_dir: Path) -> dict[str, dict]:
    """Stage -> {records, stop, selection} for every RLVR or OPSD stage of the run with held-out checks
    (`checks.STOP` etc. in its folder), keyed by checkpoint name (`rlvr`, `opsd-all-s0`). `stop` and
    `selection` are None while the stage runs (or when no rule stopped it). Raises a ValueError naming
    the file and line of a check without a field the report reads, or a selection of an unchecked step."""
    folders = {"rlvr": run_dir / "rlvr", **{f"opsd-{p.name}": p for p in sorted((run_dir / "opsd").glob("*"))
                                             if p.is_dir()}}
    found = {}
    for name, folder in folders.items():
        path = folder / CHECKS
        if not path.exists():
            continue
        records = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path}: line {number}: not valid JSON ({error})") from None
            if missing := [f for f in CHECK_FIELDS if f not in record]:
                raise ValueError(f"{path}: line {number}: no {missing[0]!r} field")
            records.append(record)
        if not records:
            continue
        selection = _read_json(folder / SELECTION)
        if selection is not None and selection.get("step") not in {r["step"] for r in records}:
            raise ValueError(f"{folder / SELECTION}: step {selection.get('step')!r} is not a step of {path}")
        found[name] = {"records": records, "stop": _read_json(folder / STOP), "selection": selection}
    return found


def _check_at(stage: dict, step) -> dict | None:
    return next((r for r in stage["records"] if r["step"] == step), None)


def check_changes(stage: dict) -> dict:
    """The selected check against the start (the first check) and the last one: length changes
    (relative) and the avg@k change (absolute); None where there is no selection yet."""
    start, last = stage["records"][0], stage["records"][-1]
    chosen = _check_at(stage, stage["selection"]["step"]) if stage["selection"] else None

    def rel(after, before):
        return None if chosen is None or before == 0 else after / before - 1

    tokens = "mean_response_tokens"
    return {"start": start, "selected": chosen, "last": last,
            "length_vs_start": rel(chosen and chosen[tokens], start[tokens]),
            "length_vs_last": rel(chosen and chosen[tokens], last[tokens]),
            "accuracy_vs_start": None if chosen is None else chosen["avg_at_k"] - start["avg_at_k"]}


def _stop_cell(stage: dict) -> str:
    if stage["stop"]:
        return f"{stage['stop']['rule']} at step {stage['stop']['step']}"
    return "ran to max_steps" if stage["selection"] else "– (no selection yet: still training?)"


def _check_measure(checks: dict[str, dict]) -> str:
    """"avg@k on n held-out problems" as the checks recorded them."""
    first = next(iter(checks.values()))["records"][0]
    problems = f" on {first['problems']} held-out problems" if "problems" in first else " on held-out problems"
    return f"avg@{first.get('k', 'k')}{problems}"


def _collapse_cell(stage: dict) -> str:
    """The collapse signs the checks record (`checks.COLLAPSE_SIGNS`), start → last: truncation and
    looping rates and mean token entropy; – where the checks predate a field."""
    start, last = stage["records"][0], stage["records"][-1]
    cells = []
    for key, form in (("truncation_rate", "{:.0%}"), ("repetition_rate", "{:.0%}"), ("mean_token_entropy", "{:.2f}")):
        cells.append(f"{_fmt(start.get(key), form)} → {_fmt(last.get(key), form)}")
    return " · ".join(cells)


def checks_table(checks: dict[str, dict]) -> list[str]:
    """Per stage with checks: its selection and stop, avg@k and mean tokens at the start, the selected
    check and the last check, the selected check's length change against the last, and the collapse
    signs from the start to the last check."""
    k = next(iter(checks.values()))["records"][0].get("k", "k")
    lines = ["| stage | selection rule | selected step | why | stop | "
             f"avg@{k}: start · selected · last | mean tokens: start · selected · last | length: selected vs last | "
             "truncated · looping · entropy: start → last |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, stage in checks.items():
        c, selection = check_changes(stage), stage["selection"] or {}
        points = [c["start"], c["selected"], c["last"]]
        acc = " · ".join(_fmt(p and p["avg_at_k"]) for p in points)
        tokens = " · ".join(_fmt(p and p["mean_response_tokens"], "{:.1f}") for p in points)
        lines.append(f"| {name} | {selection.get('rule', '–')} | {_fmt(selection.get('step'), '{}')} | "
                     f"{selection.get('why', '–')} | {_stop_cell(stage)} | {acc} | {tokens} | "
                     f"{_fmt(c['length_vs_last'], '{:+.1%}')} | {_collapse_cell(stage)} |")
    return lines


def _mark_selected_and_stop(ax, stage: dict, key: str, color: str, *, star: float, cross: float) -> dict | None:
    """A star at the selected check's `key` and an x at the check a stopping rule ended training at (where
    the record has the field); returns that stop's record, or None."""
    marked = None
    for rule, marker in (("selection", dict(marker="*", ms=star, mec="black", mew=0.7, zorder=5)),
                         ("stop", dict(marker="x", ms=cross, mew=2.2, zorder=6))):
        record = _check_at(stage, stage[rule]["step"]) if stage[rule] else None
        if record is not None and record.get(key) is not None:
            ax.plot(record["step"], record[key], color=color, **marker)
            marked = record if rule == "stop" else marked
    return marked


def plot_checks(checks: dict[str, dict], colors: dict, out: Path) -> None:
    """Held-out avg@k (95% CI band) and mean response tokens against step, one line per stage in its
    colour; an x where a stopping rule ended training, a star at the selected check."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, stage in checks.items():
        color = colors.get(name, "tab:gray")
        steps = [r["step"] for r in stage["records"]]
        acc = [r["avg_at_k"] for r in stage["records"]]
        axes[0].fill_between(steps, [r["avg_at_k_ci"][0] for r in stage["records"]],
                             [r["avg_at_k_ci"][1] for r in stage["records"]], color=color, alpha=0.12, lw=0)
        axes[0].plot(steps, acc, marker=".", lw=1.3, color=color, label=name)
        axes[1].plot(steps, [r["mean_response_tokens"] for r in stage["records"]], marker=".", lw=1.3, color=color,
                     label=name)
        for ax, key in zip(axes, ("avg_at_k", "mean_response_tokens")):
            stopped = _mark_selected_and_stop(ax, stage, key, color, star=15, cross=11)
            if stopped:
                ax.annotate(f"stop: {stage['stop']['rule']}", (stopped["step"], stopped[key]), fontsize=7,
                            color=color, textcoords="offset points", xytext=(5, 6))
    measure = _check_measure(checks)
    axes[0].set_title(f"{measure} during training (band: 95% CI)", fontsize=9)
    axes[0].set_ylabel(measure.split(" on ")[0])
    axes[1].set_title(f"mean response tokens{measure.removeprefix(measure.split(' on ')[0])}", fontsize=9)
    axes[1].set_ylabel("mean response tokens")
    markers = [plt.Line2D([], [], ls="", marker="*", ms=12, color="0.6", mec="black", label="selected check (model/)"),
               plt.Line2D([], [], ls="", marker="x", ms=9, mew=2, color="0.4", label="a stop rule ended training")
               ][:1 + any(stage["stop"] for stage in checks.values())]
    for ax in axes:
        ax.set_xlabel("training step (of each stage)")
        ax.margins(x=0.15)  # room for the stop note
        ax.grid(alpha=0.3)
        ax.legend(handles=ax.get_legend_handles_labels()[0] + markers, fontsize=7)
    _save(fig, out)


def checks_section(run_dir: Path, config: dict, names: list[str], out_dir: Path) -> list[str]:
    """The report's "Held-out checks during training" section (empty when no stage checked)."""
    if not (checks := stage_checks(run_dir)):
        return []
    plot_checks(checks, palette(config, [*names, *checks]), out_dir / "checks.png")
    stops = [f"- `{name}` stopped at step {s['stop']['step']} ({s['stop']['rule']}): {s['stop'].get('why', '')}"
             for name, s in checks.items() if s["stop"]]
    stops += [f"- `{name}`: no selection rule may pick step {excluded[0]['step']} or later (collapse sign: "
              f"{', '.join(excluded[0]['signs'])})" for name, s in checks.items()
              if (excluded := (s["selection"] or {}).get("excluded"))]
    return ["## Held-out checks during training", "",
            f"During training a stage graded its model on held-out problems ({_check_measure(checks)}) every few "
            "steps; a stopping rule may have ended it early, and a selection rule chose which check's weights the "
            "stage's `model/` holds (and the later stages and evaluations use). *Start* is the first check (before "
            "the first step); *length: selected vs last* is the selected check's mean tokens against the last "
            "check's; *truncated · looping · entropy* are the shares of responses cut at the cap and caught in a "
            "loop, and the mean token entropy (nats), signs of a collapse: no rule selects a check at or after "
            "one that shows a sign.", "", *checks_table(checks), "", *stops, *[""] * bool(stops),
            "![held-out checks](checks.png)",
            ""]


def seed_checks_table(seeds: dict[int, Path]) -> list[str]:
    """Per stage with checks and per seed: the selected and the stop step, and the selected check's
    held-out length change against the start and the last check, and its accuracy change (pp)."""
    rows = [(name, seed, stage) for seed, d in seeds.items() for name, stage in stage_checks(d).items()]
    if not rows:
        return []
    lines = ["| stage | seed | selected step | stop step | length: selected vs start | length: selected vs last | "
             "avg@k: selected vs start |", "|---|---|---|---|---|---|---|"]
    order = _union_order([[name for name, _, _ in rows]])
    for name, seed, stage in sorted(rows, key=lambda r: (order.index(r[0]), r[1])):
        c = check_changes(stage)
        stop = f"{stage['stop']['step']} ({stage['stop']['rule']})" if stage["stop"] else "—"
        acc = None if c["accuracy_vs_start"] is None else 100 * c["accuracy_vs_start"]
        lines.append(f"| {name} | {seed} | {_fmt(stage['selection'] and stage['selection']['step'], '{}')} | {stop} | "
                     f"{_fmt(c['length_vs_start'], '{:+.1%}')} | {_fmt(c['length_vs_last'], '{:+.1%}')} | "
                     f"{_fmt(acc, '{:+.1f} pp')} |")
    return lines


# The collapse figure's panels: the check field each draws and its title.
SEED_CHECK_PANELS = (("avg_at_k", "held-out avg@k"), ("mean_response_tokens", "mean response tokens"),
                     ("truncation_rate", "share truncated at the cap"))


def plot_seed_checks(seeds: dict[int, Path], colors: dict, out: Path) -> bool:
    """Every seed's checks of every checked stage, one line per (stage, seed) in the stage's colour and a
    line style per seed, panels from `SEED_CHECK_PANELS`: where a stopping rule ended training (x) and
    which check the selection kept (star), so that a run that collapses can be read against its guard
    over seeds. False (nothing drawn) when no stage checked."""
    rows = [(name, seed, stage) for seed, d in seeds.items() for name, stage in stage_checks(d).items()]
    if not rows:
        return False
    styles = ("-", "--", ":", "-.")
    fig, axes = plt.subplots(1, len(SEED_CHECK_PANELS), figsize=(5 * len(SEED_CHECK_PANELS), 4))
    for index, (name, seed, stage) in enumerate(rows):
        color = colors.get(name, colors.get(arm_of(name), "tab:gray"))
        style = styles[list(seeds).index(seed) % len(styles)]
        records = stage["records"]
        for ax, (key, _) in zip(axes, SEED_CHECK_PANELS):
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if not points:
                continue
            ax.plot(*zip(*points), ls=style, lw=1.2, color=color, label=f"{name} s{seed}")
            _mark_selected_and_stop(ax, stage, key, color, star=13, cross=10)
    for ax, (_, title) in zip(axes, SEED_CHECK_PANELS):
        ax.set_title(f"{title} at each check", fontsize=9)
        ax.set_xlabel("training step (of each stage)")
        ax.grid(alpha=0.3)
    markers = [plt.Line2D([], [], ls="", marker="*", ms=11, color="0.6", mec="black", label="selected check (model/)"),
               plt.Line2D([], [], ls="", marker="x", ms=9, mew=2, color="0.4", label="a stop rule ended training")]
    axes[0].legend(handles=axes[0].get_legend_handles_labels()[0] + markers, fontsize=6, ncol=2)
    _save(fig, out)
    return True
