"""The compaction report: a pure function of a run directory (see `pipeline` for its layout).

`write_report(run_dir)` reads the resolved config, evaluation summaries and samples, training
metrics and OPSD token statistics, and writes `report/report.md` with PNG figures. It can be rerun
at any time, on a finished or a partial run. It opens with its findings (each change with its paired
95% CI, stated only when the CI excludes 0) and a short guide to its metrics. A run over pipeline
seeds (`seed-<n>/` directories, `pipeline.run_seeds`) gets each seed's own report plus one over
seeds: spread per checkpoint, the teacher advantage and every arm's paired change per seed, and as
findings only what holds in every seed.
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

from opsdlab.report.compare import method_rows, methods_section, seeds_methods_section  # noqa: E402
from opsdlab.evaluation.evaluate import read_samples  # noqa: E402
from opsdlab.evaluation.metrics.bootstrap import mean_ci  # noqa: E402
from opsdlab.evaluation.metrics.comparison import accuracy_efficiency_score, bootstrap_diff_ci, flips  # noqa: E402
from opsdlab.evaluation.metrics.diagnostics import (  # noqa: E402
    HESITATION_MARKERS, hesitation_density, per_position_mean, top_tokens_by_shift,
)
from opsdlab.modeling.runtime import read_jsonl, read_updates, skipped_note  # noqa: E402

MARKERS = HESITATION_MARKERS + ("let me add them again",)
STAGE_COLORS = {"base": "tab:gray", "sft": "tab:brown", "rlvr": "black"}
ARM_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:pink", "tab:olive", "tab:cyan")
POINT_MARKERS = "os^DvP*Xph"
SAMPLE_PROBLEMS = 4


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


def stage_folder(run_dir: Path, checkpoint: str) -> Path:
    """The stage folder that trained a checkpoint: `sft/`, `rlvr/`, `opsd/<arm>-s<seed>/`."""
    return run_dir / "opsd" / checkpoint.removeprefix("opsd-") if checkpoint.startswith("opsd-") else run_dir / checkpoint


def training_warning(run_dir: Path, checkpoint: str) -> str | None:
    """What a checkpoint's stage skipped (an OPSD arm whose gate kept no rollout in some steps), or None."""
    return skipped_note(read_updates(stage_folder(run_dir, checkpoint)))


def training_warnings(run_dirs: dict) -> list[str]:
    """One Findings line per checkpoint whose stage skipped steps, `run_dirs` labelled (a seed's "seed 0 ")."""
    return [f"- **WARNING**: {label}`{name}`: {note}" for label, run_dir in run_dirs.items()
            for name in checkpoint_order(run_dir) if (note := training_warning(run_dir, name))]


def is_main_set(folder_name: str) -> bool:
    """An evaluation folder of the student prompt with sampling (not -greedy, not a teacher prompt)."""
    return not folder_name.endswith("-greedy") and "-teacher-" not in folder_name


def load_eval(run_dir: Path, checkpoint: str, set_name: str) -> dict | None:
    path = run_dir / "eval" / checkpoint / set_name / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def _samples(run_dir: Path, checkpoint: str, folder: str):
    path = run_dir / "eval" / checkpoint / folder / "samples.jsonl"
    return read_samples(path) if path.exists() else None


def _fmt(value, pattern="{:.3f}") -> str:
    return "–" if value is None else pattern.format(value)


def palette(config: dict, names=()) -> dict[str, str]:
    """The one colour of each checkpoint in every figure of a report: fixed for base, sft and rlvr,
    one per OPSD arm in configured order, keyed by arm (`all`) and by checkpoint (`opsd-all-s0`;
    an arm's OPSD seeds share its colour)."""
    arms = [entry["name"] for entry in config.get("arms") or []]
    arms += sorted({arm_of(n) for n in names if n.startswith("opsd-")} - set(arms))
    colors = {**STAGE_COLORS, **{arm: ARM_COLORS[i % len(ARM_COLORS)] for i, arm in enumerate(arms)}}
    return {**colors, **{n: colors[arm_of(n)] for n in names if n.startswith("opsd-")}}


def k_of(run_dirs, set_name: str) -> int | str:
    """Samples per problem of the set's evaluations in these run directories (the k of avg@k); "k"
    when none is finished."""
    return next((s["samples_per_problem"] for d in run_dirs for n in checkpoint_order(d)
                 if (s := load_eval(d, n, set_name))), "k")


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


def _pp(d: dict) -> str:
    lo, hi = d["accuracy_diff_ci"]
    return f"{100 * d['accuracy_diff']:+.1f} pp [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _pct(d: dict) -> str:
    lo, hi = d["length_change_ci"]
    return f"{d['length_change']:+.1%} [{lo:+.1%}, {hi:+.1%}]"


def consistent_sign(intervals: list[tuple[float, float]]) -> int:
    """+1 if every interval lies above 0, −1 if every one lies below 0, else 0 (not a finding)."""
    if intervals and all(lo > 0 for lo, _ in intervals):
        return 1
    if intervals and all(hi < 0 for _, hi in intervals):
        return -1
    return 0


def change_finding(name: str, before: str, d: dict) -> str:
    """One paired change as a findings line: each of accuracy (pp) and length (%) with its CI, named
    as a change only when the CI excludes 0."""
    acc, length = _pp(d), _pct(d)
    acc_text = {1: f"more accurate, {acc}", -1: f"less accurate, {acc}",
                0: f"accuracy: no change detected ({acc})"}[consistent_sign([d["accuracy_diff_ci"]])]
    length_text = {1: f"longer, {length}", -1: f"shorter, {length}",
                   0: f"length: no change detected ({length})"}[consistent_sign([d["length_change_ci"]])]
    return f"- `{name}` against `{before}`: {acc_text}; {length_text}."


def paired_change(before, after) -> dict:
    """Paired bootstrap change of accuracy and length against the reference, the AES and the flips."""
    d = bootstrap_diff_ci(before, after)
    d["aes"] = (accuracy_efficiency_score(d["accuracy_before"], d["accuracy_after"], d["mean_length_before"],
                                          d["mean_length_after"])
                if d["accuracy_before"] > 0 and d["mean_length_before"] > 0 else None)
    d["flips"] = flips(before, after)
    return d


def run_changes(run_dir: Path, set_name: str) -> dict[tuple[str, str], dict]:
    """(checkpoint, the checkpoint it started from) -> `paired_change`: each of sft and rlvr against
    the stage before it, each OPSD arm against its starting checkpoint."""
    changes = {key: by_seed[0] for key, by_seed in stage_changes({0: run_dir}, set_name).items()}
    names = checkpoint_order(run_dir)
    reference = reference_of(names)
    return {**changes, **{(name, reference): d for name, d in arm_changes(run_dir, names, set_name, reference).items()}}


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


def arm_changes(run_dir: Path, names: list[str], set_name: str, reference: str | None) -> dict[str, dict]:
    """`paired_change` of every evaluated OPSD checkpoint against `reference`, by checkpoint name."""
    before = _samples(run_dir, str(reference), set_name) if reference else None
    if before is None:
        return {}
    return {name: paired_change(before, after) for name in names
            if name.startswith("opsd-") and (after := _samples(run_dir, name, set_name)) is not None}


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
    ax.set_title(title, fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, out)


def readable_token(text: str) -> str:
    """A token as a Markdown code span with its whitespace shown: ⏎ newline, ␣ space, ⇥ tab."""
    shown = text.replace("\n", "⏎").replace(" ", "␣").replace("\t", "⇥").replace("|", "\\|") or "∅"
    return f"`` {shown} ``" if "`" in shown else f"`{shown}`"


def token_shifts(run_dir: Path, config: dict, colors: dict, out: Path) -> list[str]:
    """Tokens whose log-probability the teacher lowers/raises most, per OPSD arm, and the per-token
    divergence by response position, both from the training rollouts `token_stats.jsonl` keeps."""
    stats = {f"opsd-{path.parent.name}": rows for path in sorted((run_dir / "opsd").glob("*/token_stats.jsonl"))
             if (rows := read_jsonl(path))}
    if not stats:
        return []
    tokenizer = _tokenizer(run_dir)
    lines = ["Per OPSD arm, over the training rollouts whose per-token numbers were kept: the tokens whose "
             "**shift** = log p_T − log p_S is most negative and most positive on average (teacher log-prob minus "
             "student log-prob of the sampled token; negative: the teacher wants the token less than the student "
             "does, so training lowers it; positive: the teacher prefers it more). ⏎ is a newline, ␣ a space; "
             "(×n) counts the token's occurrences (5 at least).", "",
             "| arm | teacher lowers most: token shift (×n) | teacher raises most: token shift (×n) |",
             "|---|---|---|"]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    divergences = set()
    for arm, rows in stats.items():
        records = [(tokenizer.decode([t]) if tokenizer else str(t), shift)
                   for row in rows for t, shift in zip(row["token_ids"], row["logp_shift"])]
        top = top_tokens_by_shift(records, n=8)
        cells = [", ".join(f"{readable_token(x['token'])} {x['mean_shift']:+.2f} (×{x['count']})" for x in top[side])
                 or "–" for side in ("lowered", "raised")]
        lines.append(f"| {arm} | {cells[0]} | {cells[1]} |")
        names = sorted({row.get("divergence", "?") for row in rows})
        divergences.update(names)
        steps = sorted({row["step"] for row in rows})
        curve = per_position_mean([row["loss"] for row in rows], bucket=4)
        ax.plot([4 * i for i in range(len(curve))], curve, lw=1.2, color=colors.get(arm, "tab:gray"),
                label=f"{arm}: {'/'.join(names)}, {len(steps)} steps, {len(rows)} rollouts, {len(records)} tokens")
    which = "/".join(sorted(divergences))
    ax.set_xlabel("response position (tokens, buckets of 4)")
    ax.set_ylabel(f"per-token {which} (teacher vs student)")
    ax.set_title(f"OPSD per-token {which} by response position (training rollouts)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, out)
    return lines


def _tokenizer(run_dir: Path):
    from opsdlab.modeling.models import load_tokenizer

    for folder in (run_dir / "rlvr" / "model", run_dir / "sft" / "model", run_dir / "base" / "model"):
        if (folder / "tokenizer_config.json").exists():
            return load_tokenizer(folder)
    return None


def held_out_problems(run_dir: Path, set_name: str) -> dict:
    """The evaluation set's problems by id (`data.Example`), rebuilt from the run's config the way the
    pipeline built them: evaluations keep only problem ids."""
    from opsdlab.config import load_config
    from opsdlab.run.pipeline import eval_sets
    from opsdlab.tasks import build_task

    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir / 'config.yaml'}: no such file")
    config = load_config(run_dir / "config.yaml")
    task = build_task(config.task.name, config.task.options, seed=config.seed)
    return {example.id: example for example in eval_sets(config, task).get(set_name, [])}


def sample_section(run_dir: Path, names: list[str], set_name: str, reference: str | None,
                   count: int = SAMPLE_PROBLEMS) -> list[str]:
    """`count` problems with their text and gold answer, and the first response of the starting
    checkpoint and of every OPSD arm: problems where those responses disagree on correctness first."""
    shown = [n for n in names if n == reference or n.startswith("opsd-")]
    firsts = {n: {s.problem_id: s for s in samples if s.sample_index == 0}
              for n in shown if (samples := _samples(run_dir, n, set_name))}
    if not firsts:
        return []
    ids = list(next(iter(firsts.values())))
    disagree = [p for p in ids if len({by_id[p].correct for by_id in firsts.values() if p in by_id}) > 1]
    chosen = (disagree + [p for p in ids if p not in disagree])[:count]
    try:
        problems, missing = held_out_problems(run_dir, set_name), "not in the evaluation set rebuilt from config.yaml"
    except Exception as error:  # an old or moved run still gets its report, saying why the text is missing
        problems, missing = {}, f"could not rebuild the evaluation set: {type(error).__name__}: {error}"
    lines = [f"The first response of `{reference}` and of each OPSD arm to {len(chosen)} of the {len(ids)} problems; "
             f"problems where these responses disagree on correctness come first ({len(disagree)} here).", ""]
    for pid in chosen:
        lines += [f"#### Problem `{pid}`", ""]
        if example := problems.get(pid):
            lines += [*(f"> {line}" for line in example.problem.strip().splitlines()), "",
                      f"Gold answer: `{example.answer}`", ""]
        else:
            lines += [f"(problem text and gold answer unavailable: {missing})", ""]
        for name, by_id in firsts.items():
            if s := by_id.get(pid):
                verdict = "correct" if s.correct else ("wrong, no answer found" if s.answer is None
                                                       else f"wrong (answer: `{s.answer}`)")
                lines += [f"**{name}**: {verdict}, {s.response_tokens} tokens{', truncated' if s.truncated else ''}",
                          "", "```text", s.text.strip(), "```", ""]
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
            if note := training_warning(run_dir, name):
                line += f"  WARNING: {note}"
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


# ---------------------------------------------------------------- held-out checks during training

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
    from opsdlab.stages.checks import CHECKS, SELECTION, STOP  # the file names the stages write

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


def checks_table(checks: dict[str, dict]) -> list[str]:
    """Per stage with checks: its selection and stop, and avg@k and mean tokens at the start, the
    selected check and the last check, with the selected check's length change against the last."""
    k = next(iter(checks.values()))["records"][0].get("k", "k")
    lines = ["| stage | selection rule | selected step | why | stop | "
             f"avg@{k}: start · selected · last | mean tokens: start · selected · last | length: selected vs last |",
             "|---|---|---|---|---|---|---|---|"]
    for name, stage in checks.items():
        c, selection = check_changes(stage), stage["selection"] or {}
        points = [c["start"], c["selected"], c["last"]]
        acc = " · ".join(_fmt(p and p["avg_at_k"]) for p in points)
        tokens = " · ".join(_fmt(p and p["mean_response_tokens"], "{:.1f}") for p in points)
        lines.append(f"| {name} | {selection.get('rule', '–')} | {_fmt(selection.get('step'), '{}')} | "
                     f"{selection.get('why', '–')} | {_stop_cell(stage)} | {acc} | {tokens} | "
                     f"{_fmt(c['length_vs_last'], '{:+.1%}')} |")
    return lines


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
            if stage["selection"] and (chosen := _check_at(stage, stage["selection"]["step"])):
                ax.plot(chosen["step"], chosen[key], marker="*", ms=15, color=color, mec="black", mew=0.7, zorder=5)
            if stage["stop"] and (stopped := _check_at(stage, stage["stop"]["step"])):
                ax.plot(stopped["step"], stopped[key], marker="x", ms=11, mew=2.2, color=color, zorder=6)
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
    return ["## Held-out checks during training", "",
            f"During training a stage graded its model on held-out problems ({_check_measure(checks)}) every few "
            "steps; a stopping rule may have ended it early, and a selection rule chose which check's weights the "
            "stage's `model/` holds (and the later stages and evaluations use). *Start* is the first check (before "
            "the first step); *length: selected vs last* is the selected check's mean tokens against the last "
            "check's.", "", *checks_table(checks), "", *stops, *[""] * bool(stops), "![held-out checks](checks.png)",
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


def _spread_cell(values: list[float], pattern: str) -> str:
    """mean ± sd (min–max) over seeds; the plain value when there is one seed (no spread to show)."""
    s = spread(values)
    if s["n"] == 1:
        return pattern.format(s["mean"])
    return (f"{pattern.format(s['mean'])} ± {pattern.format(s['sd'])} "
            f"({pattern.format(s['min'])}–{pattern.format(s['max'])})")


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


def _union_order(orders: list[list[str]]) -> list[str]:
    names = {n for order in orders for n in order}
    fixed = [n for n in ("base", "sft", "rlvr") if n in names]
    return fixed + sorted(names - set(fixed))


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


def draw_lead_vs_change(points: list[tuple[str, int, dict, dict]], reference: str, colors: dict, title: str,
                        out: Path) -> None:
    """The arm's accuracy change (pp) against its teacher's advantage at the start (pp), with paired
    CI bars; one colour per arm, each point labelled with its pipeline seed."""
    draw_ci_scatter([(arm, f"s{seed}", _scaled(lead, "accuracy_diff"), _scaled(change, "accuracy_diff"))
                     for arm, seed, lead, change in points],
                    f"teacher prompt − student prompt accuracy at {reference} (pp)",
                    f"arm's accuracy change vs {reference} (pp)", colors, title, out)


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
    if probe := probe_seed_table(seeds):
        md += ["## The teacher prompt during SFT", "", *probe, ""]
    md += ["## Settings", "", f"- pipeline seeds: {order}, present: {list(seeds)}",
           f"- OPSD arms: `{json.dumps(config.get('arms', []))}`, OPSD seeds {config.get('opsd_seeds')}", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(md))
    return path


def set_description(run_dir: Path, names: list[str], set_name: str) -> str:
    """What a set's evaluation is: problems, samples per problem, temperature, token limit."""
    s = next((s for n in names if (s := load_eval(run_dir, n, set_name))), None)
    if s is None:
        return f"`{set_name}`: no finished evaluation yet."
    sampling = s.get("sampling", {})
    return (f"`{set_name}`: {s['num_problems']} held-out problems, {s['samples_per_problem']} sampled responses "
            f"each at temperature {sampling.get('temperature', '?')}, at most {sampling.get('max_new_tokens', '?')} "
            f"tokens.")


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
