"""The report over the trace-length ladder: what each OPSD gate does to accuracy and length, per rung.

The ladder (`configs/ladder-*.yaml`, `LADDER_PRESETS`) is one task at four problem sizes, with thinking
off at the first rung, so that the mean trace length is the one variable. The paper's hypothesis is
that OPSD *corrects* short, thinking-disabled answers (accuracy rises) and *compresses* long thinking
traces (length falls). `opsdlab study --presets <the rungs> --arms ladder --ladder` runs every rung over
pipeline seeds and then calls `write_ladder_report(study_dir, presets)`, which reads only the rungs'
run directories (`<study_dir>/<rung>/seed-<n>/`) and writes `<study_dir>/ladder-report/report.md`
and `ladder.png`: per gate, Δaccuracy and Δlength against the seed's RLVR checkpoint, plotted against
that checkpoint's mean response length, one point per (rung, seed) with its paired 95% CI. A change
is a finding only where it keeps its sign with a CI excluding 0 in every seed of the rung.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as ticker  # noqa: E402

from opsdlab.report.changes import holds_in_every_seed, seed_changes  # noqa: E402
from opsdlab.report.figures import POINT_MARKERS, palette  # noqa: E402
from opsdlab.report.rundir import arm_of, checkpoint_order, is_main_set, opsd_seed_of, run_config, seed_dirs  # noqa: E402

LADDER_PRESETS = ("ladder-1-nothink", "ladder-2-short", "ladder-3-medium", "ladder-4-long")
# How a sign that holds in every seed reads, per quantity (0: not a finding).
_READS = {"accuracy_diff": {1: "higher", -1: "lower", 0: "no"},
          "length_change": {1: "longer", -1: "shorter", 0: "no"}}


def rung_set(seeds: dict[int, Path]) -> str | None:
    """The evaluation set a rung is compared on: its student-prompt, sampled set (the first by name
    when there are several); None before any evaluation."""
    names = sorted({p.name for d in seeds.values() for n in checkpoint_order(d)
                    for p in (d / "eval" / n).iterdir() if p.is_dir() and is_main_set(p.name)})
    return names[0] if names else None


def rung_changes(rung_dir: Path) -> dict:
    """One rung's results: its set, seeds, OPSD seeds, colours and, per gate (arm), draw -> the
    `paired_change` of that arm's checkpoint against the seed's starting checkpoint (RLVR), pooled
    over OPSD seeds as the report over seeds pools them (`report.opsd_comparisons`)."""
    seeds = seed_dirs(rung_dir)
    config = run_config(rung_dir)
    order = [int(s) for s in config.get("seeds") or []] or list(seeds)
    opsd_seeds = [int(s) for s in config.get("opsd_seeds") or []] or [0]
    set_name = rung_set(seeds) if seeds else None
    changes = seed_changes(seeds, set_name) if set_name else {}
    pooled = len(opsd_seeds) > 1  # as in the report over seeds: a finding must hold for every OPSD draw
    draws = [(s, o) for s in order for o in opsd_seeds] if pooled else order
    by_gate: dict[str, dict] = {}
    for name, by_seed in changes.items():
        for seed, d in by_seed.items():
            by_gate.setdefault(arm_of(name), {})[(seed, opsd_seed_of(name)) if pooled else seed] = d
    configured = [entry["name"] for entry in config.get("arms") or []]
    ordered = [g for g in configured if g in by_gate] + sorted(set(by_gate) - set(configured))
    gates = {gate: (by_gate[gate], draws) for gate in ordered}
    return {"set": set_name, "seeds": order, "opsd_seeds": opsd_seeds, "gates": gates,
            "colors": palette(config, list(changes))}


def _draw_label(draw) -> str:
    return f"s{draw}" if isinstance(draw, int) else f"s{draw[0]}/o{draw[1]}"


def ladder_points(rungs: dict[str, dict]) -> list[tuple[str, str, object, dict]]:
    """(rung, gate, draw, paired change) for every result, rungs in ladder order, gates in configured
    order; the x of a point is `change["mean_length_before"]`, its seed's RLVR mean response length."""
    return [(rung, gate, draw, d) for rung, found in rungs.items() for gate, (by_draw, _) in found["gates"].items()
            for draw, d in sorted(by_draw.items())]


def plot_ladder(points: list[tuple[str, str, object, dict]], colors: dict, out: Path) -> None:
    """Two panels against the RLVR checkpoint's mean response length (log scale): Δaccuracy (pp) and
    Δlength (%), one colour and marker per gate, one point per (rung, seed) with its paired 95% CI.
    Gates at one x are set slightly apart so that their bars stay readable."""
    found = set(gate for _, gate, _, _ in points)
    gates = [g for g in colors if g in found] + sorted(found - set(colors))  # configured order, as the colours
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "accuracy_diff", "Δaccuracy vs RLVR (pp)"),
                           (axes[1], "length_change", "Δlength vs RLVR (%)")):
        for _, gate, _, d in points:
            i = gates.index(gate)
            x = d["mean_length_before"] * (1 + 0.025 * (i - (len(gates) - 1) / 2))
            y, (lo, hi) = 100 * d[key], (100 * v for v in d[f"{key}_ci"])
            ax.errorbar(x, y, yerr=[[y - lo], [hi - y]], fmt=POINT_MARKERS[i % len(POINT_MARKERS)], capsize=2,
                        color=colors.get(gate, "tab:gray"), alpha=0.85, label=gate)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 1.5, 2, 3, 5, 7)))
        ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("mean response tokens of the seed's RLVR checkpoint (log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(sorted(zip(labels, handles), key=lambda item: gates.index(item[0])))
        ax.legend(unique.values(), unique.keys(), fontsize=7, title="gate", title_fontsize=7)
    axes[0].set_title("correction: accuracy change per gate", fontsize=9)
    axes[1].set_title("compression: length change per gate", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _cell(d: dict, key: str) -> str:
    lo, hi = d[f"{key}_ci"]
    if key == "accuracy_diff":
        return f"{100 * d[key]:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return f"{100 * d[key]:+.1f}% [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def ladder_table(rungs: dict[str, dict]) -> list[str]:
    """Per rung and gate: each draw's RLVR length, Δacc and Δlength with CIs, and what holds in every seed."""
    lines = ["| rung | gate | draw | RLVR mean tokens | Δacc vs RLVR (pp) [95% CI] | Δlength vs RLVR [95% CI] |",
             "|---|---|---|---|---|---|"]
    for rung, found in rungs.items():
        for gate, (by_draw, draws) in found["gates"].items():
            for draw, d in sorted(by_draw.items()):
                lines.append(f"| {rung} | {gate} | {_draw_label(draw)} | {d['mean_length_before']:.1f} | "
                             f"{_cell(d, 'accuracy_diff')} | {_cell(d, 'length_change')} |")
            acc, length = (_READS[key][holds_in_every_seed(by_draw, draws, key)]
                           for key in ("accuracy_diff", "length_change"))
            lines.append(f"| {rung} | {gate} | holds in every seed ({len(by_draw)}/{len(draws)}) | | "
                         f"**{acc}** | **{length}** |")
    return lines


def ladder_findings(rungs: dict[str, dict]) -> list[str]:
    """Per gate, the rungs where it corrects (accuracy higher in every seed) or damages (lower), and
    where it compresses (shorter in every seed) or lengthens, each with its range over seeds; what
    the `none` control (the student's own prompt as the teacher's) also does at that rung is named,
    since a change it shares does not come from the reference."""
    out = []
    gates = list(dict.fromkeys(gate for found in rungs.values() for gate in found["gates"]))
    for gate in gates:
        for key, what in (("accuracy_diff", "accurate"), ("length_change", "long")):
            for sign in (1, -1):
                hits = []
                for rung, found in rungs.items():
                    if gate not in found["gates"]:
                        continue
                    by_draw, draws = found["gates"][gate]
                    if holds_in_every_seed(by_draw, draws, key) != sign:
                        continue
                    values = [d[key] for d in by_draw.values()]
                    tokens = [d["mean_length_before"] for d in by_draw.values()]
                    unit = ("{:+.1f} pp", 100) if key == "accuracy_diff" else ("{:+.1f}%", 100)
                    span = f"{unit[0].format(unit[1] * min(values))} to {unit[0].format(unit[1] * max(values))}"
                    control = ""
                    if gate != "none" and "none" in found["gates"]:
                        control_by_draw, control_draws = found["gates"]["none"]
                        if holds_in_every_seed(control_by_draw, control_draws, key) == sign:
                            control = ", and so does the `none` control"
                    hits.append(f"`{rung}` (RLVR {min(tokens):.0f}–{max(tokens):.0f} tokens; {span}{control})")
                if hits:
                    word = {("accurate", 1): "more accurate", ("accurate", -1): "less accurate",
                            ("long", 1): "longer", ("long", -1): "shorter"}[(what, sign)]
                    out.append(f"- `{gate}` is {word} than RLVR in every seed at {'; '.join(hits)}.")
    return out or ["- None: no gate's change keeps its sign with a 95% CI excluding 0 in every seed of any rung."]


def write_ladder_report(study_dir: str | Path, presets=LADDER_PRESETS) -> Path:
    """Write `<study_dir>/ladder-report/report.md` and `ladder.png` from the rungs' run directories
    (`<study_dir>/<preset name>/`, in the order of `presets`); a rung not yet run is listed as such.
    A pure function of those directories: rerunning it on the same files writes the same report."""
    study_dir = Path(study_dir)
    names = [Path(preset).stem for preset in presets]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"ladder report: expected distinct rung presets, got {list(presets)}")
    if not study_dir.is_dir():
        raise FileNotFoundError(f"ladder report: no study directory {study_dir}")
    rungs, missing, colors = {}, [], {}
    for name in names:
        found = rung_changes(study_dir / name) if (study_dir / name).is_dir() else None
        if found and found["gates"]:
            rungs[name] = found
            colors = {**found["colors"], **colors}
        else:
            missing.append(name)
    out_dir = study_dir / "ladder-report"
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = sorted({s for found in rungs.values() for s in found["seeds"]})
    lines = ["# The trace-length ladder: OPSD's gates against trace length", "",
             f"Rungs (shortest first): {', '.join(f'`{n}`' for n in names)}. Pipeline seeds: "
             f"{', '.join(map(str, seeds)) or '–'}. Each OPSD arm is compared with its own seed's RLVR "
             "checkpoint on the same held-out problems (paired bootstrap 95% CI over problems); the x of "
             "each point is that RLVR checkpoint's mean response length in tokens.", "",
             "## Findings (hold in every seed of a rung)", "",
             "The hypothesis under test: OPSD *corrects* short answers (accuracy up) and *compresses* long "
             "traces (length down). A change is stated only where its CI excludes 0 with one sign in every "
             "seed of the rung.", "", *ladder_findings(rungs), ""]
    if missing:
        lines += [f"Not run yet (no OPSD results): {', '.join(f'`{n}`' for n in missing)}.", ""]
    if rungs:
        plot_ladder(ladder_points(rungs), colors, out_dir / "ladder.png")
        lines += ["## Δaccuracy and Δlength against trace length", "", "![ladder](ladder.png)", "",
                  "## Per rung, gate and seed", "", *ladder_table(rungs), ""]
    out = out_dir / "report.md"
    out.write_text("\n".join(lines))
    return out
