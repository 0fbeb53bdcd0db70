"""The SFT teacher probe (`sft/probe.jsonl`) as tables: per probed step, the student prompt's and
each teacher context's accuracy and the teacher's lead, for one run and side by side over seeds.
"""

from __future__ import annotations

from pathlib import Path

from opsdlab.modeling.runtime import read_jsonl
from opsdlab.report.tables import _fmt


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
