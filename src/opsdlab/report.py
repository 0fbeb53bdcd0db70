"""The compaction report: a pure function of a run directory (see `pipeline` for its layout).

`write_report(run_dir)` reads the resolved config, evaluation summaries and samples, training
metrics and OPSD token statistics, and writes `report/report.md` with PNG figures. It can be rerun
at any time, on a finished or a partial run. A run over pipeline seeds (`seed-<n>/` directories,
`pipeline.run_seeds`) gets each seed's own report plus one over seeds: spread per checkpoint, the
teacher advantage and every arm's paired change per seed, and as findings only what holds in every
seed.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from opsdlab.evaluate import read_samples  # noqa: E402
from opsdlab.metrics import (  # noqa: E402
    HESITATION_MARKERS, accuracy_efficiency_score, bootstrap_diff_ci, flips, hesitation_density, mean_ci,
    per_position_mean, top_tokens_by_shift,
)
from opsdlab.runtime import read_jsonl  # noqa: E402

MARKERS = HESITATION_MARKERS + ("let me add them again",)
CURVES = (("rollouts/accuracy", "rollout accuracy"), ("rollouts/mean_length", "rollout length (tokens)"),
          ("loss", "loss"))


def checkpoint_order(run_dir: Path) -> list[str]:
    """Evaluated checkpoints in pipeline order: base, sft, rlvr, then OPSD arms as configured."""
    names = [p.name for p in (run_dir / "eval").iterdir() if p.is_dir()] if (run_dir / "eval").is_dir() else []
    fixed = [n for n in ("base", "sft", "rlvr") if n in names]
    return fixed + sorted(n for n in names if n.startswith("opsd-"))


def arm_of(checkpoint: str) -> str:
    """The OPSD arm of a checkpoint name: `opsd-correct-s1` -> `correct`."""
    return checkpoint.removeprefix("opsd-").rsplit("-s", 1)[0]


def opsd_seed_of(checkpoint: str) -> int:
    """The OPSD seed of a checkpoint name: `opsd-correct-s1` -> 1."""
    return int(checkpoint.rsplit("-s", 1)[1])


def reference_of(names: list[str]) -> str | None:
    """The checkpoint OPSD arms are compared with: their starting point, RLVR (else SFT)."""
    return "rlvr" if "rlvr" in names else ("sft" if "sft" in names else None)


def is_main_set(folder_name: str) -> bool:
    """An evaluation folder of the student prompt with sampling (not -greedy, not a teacher prompt)."""
    return not folder_name.endswith("-greedy") and "-teacher-" not in folder_name


def load_eval(run_dir: Path, checkpoint: str, set_name: str) -> dict | None:
    path = run_dir / "eval" / checkpoint / set_name / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def _fmt(value, pattern="{:.3f}") -> str:
    return "–" if value is None else pattern.format(value)


def results_table(run_dir: Path, names: list[str], set_name: str, reference: str | None) -> list[str]:
    ref = load_eval(run_dir, reference, set_name) if reference else None
    lines = ["| checkpoint | avg@k [95% CI] | maj@k | greedy | mean tokens | median | thinking | truncated "
             f"| length vs {reference} | teacher prompt |", "|" + "---|" * 10]
    for name in names:
        s = load_eval(run_dir, name, set_name)
        if s is None:
            continue
        greedy = load_eval(run_dir, name, f"{set_name}-greedy")
        teacher = [load_eval(run_dir, name, p.name) for p in sorted((run_dir / "eval" / name).glob(f"{set_name}-teacher-*"))]
        change = ((s["mean_response_tokens"] - ref["mean_response_tokens"]) / ref["mean_response_tokens"]
                  if ref and name.startswith("opsd-") else None)
        teacher_text = ", ".join(f"{t['context']}: {t['avg_at_k']:.3f}" for t in teacher if t) or "–"
        lines.append(
            f"| {name} | {s['avg_at_k']:.3f} [{s['avg_at_k_ci'][0]:.3f}, {s['avg_at_k_ci'][1]:.3f}] | "
            f"{s['maj_at_k']:.3f} | {_fmt(greedy and greedy['avg_at_k'])} | {s['mean_response_tokens']:.1f} | "
            f"{s['median_response_tokens']:.0f} | {s['mean_thinking_tokens']:.1f} | {s['truncation_rate']:.1%} | "
            f"{_fmt(change, '{:+.1%}')} | {teacher_text} |")
    return lines


def arm_summary(run_dir: Path, names: list[str], set_name: str, reference: str | None) -> list[str]:
    """Per OPSD arm, over seeds: mean accuracy and length change with bootstrap CIs over seeds."""
    by_arm = defaultdict(list)
    for name in names:
        if name.startswith("opsd-") and (s := load_eval(run_dir, name, set_name)):
            by_arm[arm_of(name)].append(s)
    ref = load_eval(run_dir, reference, set_name) if reference else None
    if not by_arm:
        return []
    lines = [f"| arm | seeds | avg@k (mean [CI] over seeds) | mean tokens | length vs {reference} |",
             "|---|---|---|---|---|"]
    for arm, runs in by_arm.items():
        acc = mean_ci([r["avg_at_k"] for r in runs])
        tokens = mean_ci([r["mean_response_tokens"] for r in runs])
        change = f"{(tokens[0] - ref['mean_response_tokens']) / ref['mean_response_tokens']:+.1%}" if ref else "–"
        lines.append(f"| {arm} | {len(runs)} | {acc[0]:.3f} [{acc[1]:.3f}, {acc[2]:.3f}] | {tokens[0]:.1f} | {change} |")
    return lines


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
            lines.append(line)
    return lines


def probe_records(run_dir: Path) -> list[dict]:
    """The SFT teacher probe's records (`sft/probe.jsonl`); empty when SFT ran without the probe."""
    return read_jsonl(run_dir / "sft" / "probe.jsonl")


def probe_by_step(records: list[dict]) -> dict[int, dict[str, float]]:
    """Probe records as step -> context -> accuracy ("none" is the student prompt)."""
    by_step: dict[int, dict[str, float]] = {}
    for record in records:
        by_step.setdefault(record["step"], {})[record["context"]] = record["accuracy"]
    return by_step


def probe_measure(records: list[dict]) -> str:
    """What the probe's accuracy is, e.g. "Greedy accuracy on 100 held-out problems"."""
    first = records[0]
    k, temperature = first.get("k", 1), first.get("temperature", 0.0)
    measure = "Greedy accuracy" if temperature == 0 else f"avg@{k} at temperature {temperature}"
    return f"{measure} on {first['problems']} held-out problems"


def _lead(row: dict[str, float], context: str) -> str:
    if context not in row or "none" not in row:
        return "–"
    return f"{100 * (row[context] - row['none']):+.1f} pp"


def probe_table(run_dir: Path) -> list[str]:
    """Per probed SFT step: the student prompt's and each teacher context's accuracy, and the lead."""
    records = probe_records(run_dir)
    if not records:
        return []
    by_step = probe_by_step(records)
    contexts = sorted({c for row in by_step.values() for c in row} - {"none"})
    lines = [f"{probe_measure(records)} during SFT.", "",
             "| step | student prompt | " + " | ".join(f"teacher ({c}) | lead ({c})" for c in contexts) + " |",
             "|---|---|" + "---|---|" * len(contexts)]
    for step, row in sorted(by_step.items()):
        cells = [str(step), _fmt(row.get("none"))]
        for context in contexts:
            cells += [_fmt(row.get(context)), _lead(row, context)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def probe_seed_table(seeds: dict[int, Path]) -> list[str]:
    """The SFT teacher probe side by side over seeds: per step and seed, student / teacher (lead)."""
    records = {seed: probe_records(d) for seed, d in seeds.items()}
    records = {seed: seed_records for seed, seed_records in records.items() if seed_records}
    if not records:
        return []
    probes = {seed: probe_by_step(seed_records) for seed, seed_records in records.items()}
    steps = sorted({step for by_step in probes.values() for step in by_step})
    lines = [f"{probe_measure(next(iter(records.values())))}, per seed.", "",
             "| step | " + " | ".join(f"seed {seed}: student / teacher (lead)" for seed in probes) + " |",
             "|---|" + "---|" * len(probes)]
    for step in steps:
        cells = [str(step)]
        for by_step in probes.values():
            row = by_step.get(step, {})
            teachers = sorted(set(row) - {"none"})
            cells.append(" · ".join(f"{_fmt(row.get('none'))} / {_fmt(row[c])} ({_lead(row, c)})" for c in teachers)
                         or "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_accuracy_length(run_dir: Path, names: list[str], set_name: str, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name in names:
        s = load_eval(run_dir, name, set_name)
        if s is None:
            continue
        lo, hi = s["avg_at_k_ci"]
        ax.errorbar(s["mean_response_tokens"], s["avg_at_k"], yerr=[[s["avg_at_k"] - lo], [hi - s["avg_at_k"]]],
                    fmt="o", capsize=3, label=name)
    ax.set_xlabel("mean response tokens")
    ax.set_ylabel("avg@k accuracy (95% CI)")
    ax.set_title(f"accuracy vs length: {set_name}")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def stage_metric_files(run_dir: Path) -> dict[str, Path]:
    files = {s: run_dir / s / "metrics.jsonl" for s in ("sft", "rlvr")}
    files.update({f"opsd-{p.parent.name}": p for p in sorted((run_dir / "opsd").glob("*/metrics.jsonl"))})
    return {name: path for name, path in files.items() if path.exists()}


def plot_training_curves(run_dir: Path, out: Path) -> bool:
    files = stage_metric_files(run_dir)
    if not files:
        return False
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.8))
    for name, path in files.items():
        records = read_jsonl(path)
        for ax, (key, label) in zip(axes, CURVES):
            points = sorted({r["step"]: r[key] for r in records if key in r}.items())  # a resumed run relogs steps
            if points:
                ax.plot(*zip(*points), label=name, lw=1.2)
            ax.set_title(label)
            ax.set_xlabel("step")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def plot_length_distributions(run_dir: Path, names: list[str], set_name: str, out: Path) -> None:
    shown = [n for n in names if (run_dir / "eval" / n / set_name / "samples.jsonl").exists() and n != "base"]
    if not shown:
        return
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], shown):
        samples = read_samples(run_dir / "eval" / name / set_name / "samples.jsonl")
        ax.hist([s.response_tokens for s in samples if s.correct], bins=20, alpha=0.6, label="correct")
        ax.hist([s.response_tokens for s in samples if not s.correct], bins=20, alpha=0.6, label="incorrect")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("tokens")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def flips_and_hesitation(run_dir: Path, names: list[str], set_name: str, reference: str | None) -> list[str]:
    lines = [f"| checkpoint | correct→incorrect | incorrect→correct | Δacc vs {reference} [95% CI] | length change "
             "[95% CI] | AES | hesitation markers / 1k tokens |", "|---|---|---|---|---|---|---|"]
    ref_path = run_dir / "eval" / str(reference) / set_name / "samples.jsonl"
    before = read_samples(ref_path) if reference and ref_path.exists() else None
    for name in names:
        path = run_dir / "eval" / name / set_name / "samples.jsonl"
        if not path.exists() or name == "base":
            continue
        after = read_samples(path)
        density = hesitation_density([s.text for s in after], MARKERS, token_counts=[s.response_tokens for s in after])
        flip_cells, diff_cells, aes = "– | –", "– | –", "–"
        if before is not None and name.startswith("opsd-"):
            f = flips(before, after)
            d = paired_change(before, after)
            flip_cells = f"{f['correct_to_incorrect']} | {f['incorrect_to_correct']}"
            diff_cells = (f"{d['accuracy_diff']:+.3f} [{d['accuracy_diff_ci'][0]:+.3f}, {d['accuracy_diff_ci'][1]:+.3f}] | "
                          f"{d['length_change']:+.1%} [{d['length_change_ci'][0]:+.1%}, {d['length_change_ci'][1]:+.1%}]")
            aes = _fmt(d["aes"], "{:+.3f}")
        lines.append(f"| {name} | {flip_cells} | {diff_cells} | {aes} | {density['density']:.1f} |")
    return lines


def paired_change(before, after) -> dict:
    """Paired bootstrap change of accuracy and length against the reference, plus the AES."""
    d = bootstrap_diff_ci(before, after)
    d["aes"] = (accuracy_efficiency_score(d["accuracy_before"], d["accuracy_after"], d["mean_length_before"],
                                          d["mean_length_after"])
                if d["accuracy_before"] > 0 and d["mean_length_before"] > 0 else None)
    return d


def plot_changes(run_dir: Path, names: list[str], set_name: str, reference: str | None, out: Path) -> bool:
    """The paper's two axes per OPSD arm: accuracy change vs length change against the reference, one
    point per seed with its paired 95% CIs."""
    changes = arm_changes(run_dir, names, set_name, reference)
    if not changes:
        return False
    draw_changes([(arm_of(name), "", d) for name, d in changes.items()], reference,
                 f"OPSD arms vs {reference}, one point per seed (95% CI): {set_name}", out)
    return True


def arm_changes(run_dir: Path, names: list[str], set_name: str, reference: str | None) -> dict[str, dict]:
    """`paired_change` of every evaluated OPSD checkpoint against `reference`, by checkpoint name."""
    ref_path = run_dir / "eval" / str(reference) / set_name / "samples.jsonl"
    arms = [n for n in names if n.startswith("opsd-") and (run_dir / "eval" / n / set_name / "samples.jsonl").exists()]
    if not reference or not ref_path.exists():
        return {}
    before = read_samples(ref_path)
    return {name: paired_change(before, read_samples(run_dir / "eval" / name / set_name / "samples.jsonl"))
            for name in arms}


def draw_changes(points: list[tuple[str, str, dict]], reference: str, title: str, out: Path) -> None:
    """Accuracy change (pp) against length change (%) with paired CI bars; one colour per arm.

    `points` are (arm, note, paired_change); a non-empty note is written next to its point.
    """
    draw_ci_scatter([(arm, note, _scaled(d, "length_change"), _scaled(d, "accuracy_diff")) for arm, note, d in points],
                    f"length change vs {reference} (%)", f"accuracy change vs {reference} (pp)", title, out)


def _scaled(d: dict, key: str) -> tuple[float, float, float]:
    """(value, CI low, CI high) of `key` in a paired change, in percent / percentage points."""
    low, high = d[f"{key}_ci"]
    return 100 * d[key], 100 * low, 100 * high


def draw_ci_scatter(points: list[tuple[str, str, tuple, tuple]], xlabel: str, ylabel: str, title: str,
                    out: Path) -> None:
    """One point per (arm, note, (x, x low, x high), (y, y low, y high)) with its CI bars on both axes,
    one colour per arm, the note written next to its point; grey lines at 0."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors, labeled = {}, set()
    for arm, note, (x, xl, xh), (y, yl, yh) in points:
        color = colors.setdefault(arm, f"C{len(colors)}")
        ax.errorbar(x, y, xerr=[[x - xl], [xh - x]], yerr=[[y - yl], [yh - y]], fmt="o", capsize=2, color=color,
                    label=None if arm in labeled else arm)
        if note:
            ax.annotate(note, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
        labeled.add(arm)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def token_shifts(run_dir: Path, out: Path) -> list[str]:
    """Tokens the teacher lowers/raises most, per OPSD arm, and KL by response position."""
    paths = sorted((run_dir / "opsd").glob("*/token_stats.jsonl"))
    if not paths:
        return []
    tokenizer = _tokenizer(run_dir)
    lines = []
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for path in paths:
        rows = read_jsonl(path)
        if not rows:
            continue
        records = [(tokenizer.convert_ids_to_tokens(t) if tokenizer else str(t), shift)
                   for row in rows for t, shift in zip(row["token_ids"], row["logp_shift"])]
        top = top_tokens_by_shift(records, n=8)
        lowered = ", ".join(f"`{x['token']}` {x['mean_shift']:+.2f}" for x in top["lowered"])
        raised = ", ".join(f"`{x['token']}` {x['mean_shift']:+.2f}" for x in top["raised"])
        lines.append(f"| {path.parent.name} | {lowered or '–'} | {raised or '–'} |")
        curve = per_position_mean([row["loss"] for row in rows], bucket=4)
        ax.plot([4 * i for i in range(len(curve))], curve, label=path.parent.name, lw=1.2)
    ax.set_xlabel("response position (tokens)")
    ax.set_ylabel("per-token divergence")
    ax.set_title("divergence by response position (training rollouts)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    header = ["| arm | teacher lowers most (mean log p_T − log p_S) | teacher raises most |", "|---|---|---|"]
    return header + lines


def _tokenizer(run_dir: Path):
    from opsdlab.models import load_tokenizer

    for folder in (run_dir / "rlvr" / "model", run_dir / "sft" / "model", run_dir / "base" / "model"):
        if (folder / "tokenizer_config.json").exists():
            return load_tokenizer(folder)
    return None


def sample_texts(run_dir: Path, names: list[str], set_name: str, per_row: int = 2) -> list[str]:
    lines, problem_ids = [], None
    for name in names:
        path = run_dir / "eval" / name / set_name / "samples.jsonl"
        if not path.exists() or name == "base":
            continue
        samples = [s for s in read_samples(path) if s.sample_index == 0]
        if problem_ids is None:
            problem_ids = [s.problem_id for s in samples[:per_row]]
        for s in samples:
            if s.problem_id in problem_ids:
                verdict = "correct" if s.correct else "wrong"
                lines += [f"**{name}**, problem `{s.problem_id}` ({verdict}, {s.response_tokens} tokens)", "",
                          "```text", s.text.strip(), "```", ""]
    return lines


# ---------------------------------------------------------------- runs over pipeline seeds


def run_config(run_dir: Path) -> dict:
    """The run's config.yaml as a dict (empty when the folder has none)."""
    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def seed_dirs(run_dir: Path) -> dict[int, Path]:
    """The `seed-<n>/` run directories of a run over pipeline seeds, by seed; empty for a single run."""
    found = {}
    for path in run_dir.glob("seed-*"):
        if path.is_dir() and (match := re.fullmatch(r"seed-(\d+)", path.name)):
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max of per-seed values."""
    arr = np.asarray(values, dtype=float)
    return {"n": len(arr), "mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
            "min": float(arr.min()), "max": float(arr.max())}


def consistent_sign(intervals: list[tuple[float, float]]) -> int:
    """+1 if every interval lies above 0, −1 if every one lies below 0, else 0 (not a finding)."""
    if intervals and all(lo > 0 for lo, _ in intervals):
        return 1
    if intervals and all(hi < 0 for _, hi in intervals):
        return -1
    return 0


def _spread_cell(values: list[float], pattern: str) -> str:
    s = spread(values)
    return (f"{pattern.format(s['mean'])} ± {pattern.format(s['sd'])} "
            f"({pattern.format(s['min'])}–{pattern.format(s['max'])})")


def seed_checkpoint_table(seeds: dict[int, Path], set_name: str) -> list[str]:
    """Per checkpoint, over seeds: avg@k and mean response tokens as mean ± sd (min–max)."""
    names = _union_order([checkpoint_order(d) for d in seeds.values()])
    lines = ["| checkpoint | seeds | avg@k: mean ± sd (min–max) | mean tokens: mean ± sd (min–max) |",
             "|---|---|---|---|"]
    for name in names:
        runs = [s for d in seeds.values() if (s := load_eval(d, name, set_name))]
        if runs:
            lines.append(f"| {name} | {len(runs)} | {_spread_cell([r['avg_at_k'] for r in runs], '{:.3f}')} | "
                         f"{_spread_cell([r['mean_response_tokens'] for r in runs], '{:.1f}')} |")
    return lines


def _union_order(orders: list[list[str]]) -> list[str]:
    names = {n for order in orders for n in order}
    fixed = [n for n in ("base", "sft", "rlvr") if n in names]
    return fixed + sorted(names - set(fixed))


def _samples(run_dir: Path, checkpoint: str, folder: str):
    path = run_dir / "eval" / checkpoint / folder / "samples.jsonl"
    return read_samples(path) if path.exists() else None


def teacher_advantages(seeds: dict[int, Path], set_name: str) -> dict[tuple[str, str], dict[int, dict]]:
    """(checkpoint, teacher context) -> seed -> paired bootstrap of teacher prompt vs student prompt
    (`accuracy_diff` = teacher avg@k − student avg@k, with its CI), where the teacher check ran."""
    found: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for seed, run_dir in seeds.items():
        for name in checkpoint_order(run_dir):
            student = _samples(run_dir, name, set_name)
            for folder in sorted((run_dir / "eval" / name).glob(f"{set_name}-teacher-*")):
                teacher = _samples(run_dir, name, folder.name)
                if student and teacher:
                    context = folder.name.removeprefix(f"{set_name}-teacher-")
                    found[(name, context)][seed] = bootstrap_diff_ci(student, teacher)
    return dict(found)


def seed_changes(seeds: dict[int, Path], set_name: str) -> dict[str, dict[int, dict]]:
    """OPSD checkpoint -> seed -> `paired_change` against that seed's own starting checkpoint."""
    found: dict[str, dict[int, dict]] = defaultdict(dict)
    for seed, run_dir in seeds.items():
        names = checkpoint_order(run_dir)
        for name, d in arm_changes(run_dir, names, set_name, reference_of(names)).items():
            found[name][seed] = d
    return dict(found)


def stage_changes(seeds: dict[int, Path], set_name: str, folder: str | None = None
                  ) -> dict[tuple[str, str], dict[int, dict]]:
    """(stage, stage before it) -> seed -> `paired_change`, for consecutive evaluated stages of base,
    sft, rlvr: what each stage did to accuracy and length, within each seed. `folder` picks another
    evaluation of each stage than the student prompt's, e.g. `<set>-teacher-solution`."""
    found: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for seed, run_dir in seeds.items():
        loaded = {n: samples for n in ("base", "sft", "rlvr")
                  if (samples := _samples(run_dir, n, folder or set_name)) is not None}
        names = list(loaded)
        for before, after in zip(names, names[1:]):
            found[(after, before)][seed] = paired_change(loaded[before], loaded[after])
    return dict(found)


def teacher_stage_changes(seeds: dict[int, Path], set_name: str) -> dict[str, dict[tuple[str, str], dict[int, dict]]]:
    """Teacher context -> `stage_changes` of the teacher prompt's own evaluations: what each stage did
    to the model's accuracy *when it reads the privileged context*. RLVR never shows that context, so
    this is whether it keeps, or erodes, the skill OPSD's teacher relies on."""
    contexts = sorted({folder.name.removeprefix(f"{set_name}-teacher-") for run_dir in seeds.values()
                       for folder in (run_dir / "eval").glob(f"*/{set_name}-teacher-*")})
    found = {context: stage_changes(seeds, set_name, f"{set_name}-teacher-{context}") for context in contexts}
    return {context: changes for context, changes in found.items() if changes}


def all_arm_of(checkpoint: str) -> str:
    """The `all`-gate arm with the same OPSD seed: `opsd-unrelated-s0` -> `opsd-all-s0`."""
    return f"opsd-all-s{opsd_seed_of(checkpoint)}"


def against_all_arm(seeds: dict[int, Path], set_name: str) -> dict[str, dict[int, dict]]:
    """OPSD checkpoint -> seed -> `paired_change` against the `all` arm of the same OPSD seed: whether
    the gate or the teacher's context changed anything, compared directly rather than through RLVR."""
    found: dict[str, dict[int, dict]] = defaultdict(dict)
    for seed, run_dir in seeds.items():
        all_arms: dict[str, list | None] = {}  # each `all` arm read once per seed
        for name in checkpoint_order(run_dir):
            if not name.startswith("opsd-") or arm_of(name) == "all":
                continue
            reference = all_arm_of(name)
            if reference not in all_arms:
                all_arms[reference] = _samples(run_dir, reference, set_name)
            after = _samples(run_dir, name, set_name)
            if after is not None and all_arms[reference] is not None:
                found[name][seed] = paired_change(all_arms[reference], after)
    return dict(found)


def arm_teacher_context(config: dict, arm: str) -> str | None:
    """The teacher context arm `arm` trained with, from a run's resolved config: the arm's own
    `teacher_context`, else the OPSD stage's; None for an arm the config does not name."""
    for entry in config.get("arms") or []:
        if entry.get("name") == arm:
            return entry.get("teacher_context") or (config.get("opsd") or {}).get("teacher_context")
    return None


def lead_and_change(seeds: dict[int, Path], config: dict, advantages: dict, changes: dict
                    ) -> list[tuple[str, int, dict, dict]]:
    """(arm, seed, its teacher's advantage over the student prompt at the starting checkpoint, the
    arm's paired change against that checkpoint) for every seed-arm whose teacher context was
    checked there: whether what OPSD does to accuracy follows how much better its teacher is."""
    starts = {seed: reference_of(checkpoint_order(run_dir)) for seed, run_dir in seeds.items()}
    points = []
    for name, by_seed in changes.items():
        context = arm_teacher_context(config, arm_of(name))
        for seed, change in sorted(by_seed.items()):
            if (lead := advantages.get((starts[seed], context), {}).get(seed)) is not None:
                points.append((arm_of(name), seed, lead, change))
    return points


def draw_lead_vs_change(points: list[tuple[str, int, dict, dict]], reference: str, title: str, out: Path) -> None:
    """The arm's accuracy change (pp) against its teacher's advantage at the start (pp), with paired
    CI bars; one colour per arm, each point labelled with its pipeline seed."""
    draw_ci_scatter([(arm, f"s{seed}", _scaled(lead, "accuracy_diff"), _scaled(change, "accuracy_diff"))
                     for arm, seed, lead, change in points],
                    f"teacher prompt − student prompt accuracy at {reference} (pp)",
                    f"arm's accuracy change vs {reference} (pp)", title, out)


def _pp(d: dict) -> str:
    lo, hi = d["accuracy_diff_ci"]
    return f"{100 * d['accuracy_diff']:+.1f} pp [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _pct(d: dict) -> str:
    lo, hi = d["length_change_ci"]
    return f"{d['length_change']:+.1%} [{lo:+.1%}, {hi:+.1%}]"


def holds_in_every_seed(by_seed: dict[int, dict], seeds: list[int], key: str) -> int:
    """`consistent_sign` of the `<key>_ci` intervals over seeds; 0 when some seed lacks the result."""
    if set(by_seed) != set(seeds):
        return 0
    return consistent_sign([tuple(d[f"{key}_ci"]) for d in by_seed.values()])


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
    set_names = sorted({p.name for d in seeds.values() for n in checkpoint_order(d)
                        for p in (d / "eval" / n).iterdir() if is_main_set(p.name)})
    references = {reference_of(checkpoint_order(d)) for d in seeds.values()} - {None}
    reference = " / ".join(sorted(references)) or "–"
    md = [f"# opsdlab report over pipeline seeds: `{run_dir.name}`", "",
          f"Seeds {order} ({len(seeds)} present): each is a whole pipeline run (SFT, RLVR, OPSD arms) in `seed-<n>/`, with its own "
          "report (" + ", ".join(f"[seed {s}](../{d.name}/report/report.md)" for s, d in seeds.items()) + "). "
          "Each seed draws its own training data and, for a generated task, its own held-out problems; "
          f"OPSD arms are compared with their own seed's starting checkpoint (`{reference}`). A **finding** is a "
          "change whose paired 95% CI excludes 0 with the same sign in every seed; an OPSD arm trained with "
          "several OPSD seeds states a finding only if it holds for every pipeline seed and every OPSD seed.", ""]
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
        md += [f"## {set_name}", "", "### Findings (hold in every seed)", "",
               *findings(advantages, comparisons, order), "",
               "### Checkpoints over seeds", "", *seed_checkpoint_table(seeds, set_name), ""]
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
            draw_changes(points, reference, f"OPSD arms, one point per {per} (95% CI): {set_name}",
                         out_dir / f"changes_{set_name}.png")
            md += [f"![changes](changes_{set_name}.png)", ""]
            if leads := lead_and_change(seeds, config, advantages, changes):
                draw_lead_vs_change(leads, reference, f"Teacher's lead vs the arm's Δacc, per seed-arm (95% CI): "
                                    f"{set_name}", out_dir / f"lead_vs_change_{set_name}.png")
                md += [f"### The teacher's lead at `{reference}` against each arm's accuracy change", "",
                       "Whether what an arm does to accuracy follows how much better its teacher prompt is than the "
                       "student prompt at the checkpoint OPSD starts from (the teacher advantage table's row for the "
                       "arm's teacher context). A descriptive figure: no finding is drawn from it.", "",
                       f"![lead vs change](lead_vs_change_{set_name}.png)", ""]
        if versus_all:
            md += ["### OPSD arms against the `all` arm (same pipeline seed and OPSD seed)", "",
                   "Whether the gate or the teacher's context made a difference, paired on the same problems.", "",
                   *change_table(versus_all, "all"), "", *holds_table(versus_all, order), ""]
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
    out_dir = run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    config = run_config(run_dir)
    names = checkpoint_order(run_dir)
    reference = reference_of(names)
    set_names = sorted({p.name for n in names for p in (run_dir / "eval" / n).iterdir() if is_main_set(p.name)})

    md = [f"# opsdlab report: `{run_dir.name}`", ""]
    stage_lines = [json.loads(line)["message"] for line in (run_dir / "summary.jsonl").read_text().splitlines()
                   if line.strip()] if (run_dir / "summary.jsonl").exists() else []
    for set_name in set_names:
        md += [f"## {set_name}", "", *results_table(run_dir, names, set_name, reference), ""]
        arms = arm_summary(run_dir, names, set_name, reference)
        if arms:
            md += ["### OPSD arms over seeds", "", *arms, ""]
        plot_accuracy_length(run_dir, names, set_name, out_dir / f"accuracy_length_{set_name}.png")
        md += [f"![accuracy vs length](accuracy_length_{set_name}.png)", ""]
        plot_length_distributions(run_dir, names, set_name, out_dir / f"lengths_{set_name}.png")
        md += ["### Length of correct and incorrect responses", "", f"![lengths](lengths_{set_name}.png)", ""]
        if plot_changes(run_dir, names, set_name, reference, out_dir / f"changes_{set_name}.png"):
            md += [f"### Accuracy change vs length change against `{reference}`", "",
                   f"![changes](changes_{set_name}.png)", ""]
        md += [f"### Per-problem flips and hesitation versus `{reference}`", "",
               *flips_and_hesitation(run_dir, names, set_name, reference), "",
               f"Hesitation markers counted: {', '.join(repr(m) for m in MARKERS)}. AES: accuracy-efficiency "
               "score against the reference (ΔL + 3·ΔAcc, or ΔL − 5·|ΔAcc| when accuracy drops; relative "
               "changes; O1-Pruner).", ""]
        md += ["### Sample responses", "", *sample_texts(run_dir, names, set_name)]
    if plot_training_curves(run_dir, out_dir / "training_curves.png"):
        md += ["## Training curves", "", "![training curves](training_curves.png)", ""]
    if probe := probe_table(run_dir):
        md += ["## The teacher prompt during SFT", "", *probe, ""]
    shifts = token_shifts(run_dir, out_dir / "kl_by_position.png")
    if shifts:
        md += ["## What the teacher changes", "", *shifts, "", "![KL by position](kl_by_position.png)", ""]
    settings = (load_eval(run_dir, names[0], set_names[0]) or {}) if names and set_names else {}
    md += ["## Settings", "", f"- verifier: `{json.dumps(settings.get('verifier', {}))}`",
           f"- sampling: `{json.dumps(settings.get('sampling', {}))}`, thinking: {settings.get('thinking')}",
           f"- OPSD arms: `{json.dumps(config.get('arms', []))}`, seeds {config.get('opsd_seeds')}", "",
           "## Run log", "", *[f"- {line}" for line in stage_lines], ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(md))
    return path
