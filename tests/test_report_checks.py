"""The report's held-out checks during training: per-stage table, figure and the table over seeds,
on a fabricated run directory with hand-chosen checks."""

import json
from pathlib import Path

import pytest
import yaml
from test_report import fabricate, section

from opsdlab.report import write_report

WHY = "the shortest (24.0 tokens) of the 3 checks with avg@k >= the start's 0.500 - select_tolerance 0.05"


def _check(step: int, acc: float, tokens: float, **extra) -> dict:
    return {"step": step, "avg_at_k": acc, "avg_at_k_ci": [acc - 0.2, acc + 0.2], "mean_response_tokens": tokens,
            "truncation_rate": 0.0, "problems": 4, "k": 2, "seconds": 0.1, **extra}


def add_checks(run_dir: Path) -> None:
    """The all arm: 0.50 at 40 tokens, 0.55 at 30, 0.45 at 24, then 0.30 at 20, where accuracy_drop
    stopped it; shortest_within_tolerance kept step 20. RLVR: 0.40 at 50 -> 0.45 at 45, kept its last."""
    arm = run_dir / "opsd" / "all-s0"
    arm.mkdir(parents=True)
    looping = dict(repetition_rate=0.0, mean_token_entropy=1.5)
    records = [_check(0, 0.5, 40.0, **looping), _check(10, 0.55, 30.0, **looping), _check(20, 0.45, 24.0, **looping),
               _check(30, 0.3, 20.0, stop="accuracy_drop", truncation_rate=0.25, repetition_rate=0.5,
                      mean_token_entropy=0.25)]
    (arm / "checks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (arm / "stop.json").write_text(json.dumps({"rule": "accuracy_drop", "step": 30, "why": "avg@k 0.300 is low"}))
    (arm / "selection.json").write_text(json.dumps({"rule": "shortest_within_tolerance", "step": 20, "why": WHY,
                                                    "checkpoint": "checkpoints/checkpoint-20",
                                                    "candidates": records,
                                                    "excluded": [{"step": 30, "signs": {"truncation": "...",
                                                                                        "repetition": "..."}}]}))
    rlvr = run_dir / "rlvr"
    rlvr.mkdir(parents=True)
    (rlvr / "checks.jsonl").write_text(json.dumps(_check(0, 0.4, 50.0)) + "\n" + json.dumps(_check(5, 0.45, 45.0)))
    (rlvr / "selection.json").write_text(json.dumps({"rule": "last", "step": 5, "why": "the last check",
                                                     "checkpoint": "checkpoints/checkpoint-5", "candidates": []}))


def test_each_checked_stage_gets_its_selection_stop_and_length_change(tmp_path):
    fabricate(tmp_path)
    add_checks(tmp_path)
    text = section(write_report(tmp_path).read_text(), "## Held-out checks during training")
    assert "avg@2 on 4 held-out problems" in text
    # Selected 24 tokens against the last check's 20: 24 / 20 − 1 = +20%.
    assert (f"| opsd-all-s0 | shortest_within_tolerance | 20 | {WHY} | accuracy_drop at step 30 | "
            "0.500 · 0.450 · 0.300 | 40.0 · 24.0 · 20.0 | +20.0% | 0% → 25% · 0% → 50% · 1.50 → 0.25 |") in text
    # RLVR's checks predate the repetition and entropy fields.
    assert ("| rlvr | last | 5 | the last check | ran to max_steps | 0.400 · 0.450 · 0.450 | 50.0 · 45.0 · 45.0 | "
            "+0.0% | 0% → 0% · – → – · – → – |") in text
    assert "- `opsd-all-s0` stopped at step 30 (accuracy_drop): avg@k 0.300 is low" in text
    assert "- `opsd-all-s0`: no selection rule may pick step 30 or later (collapse sign: truncation, repetition)" in text
    assert "![held-out checks](checks.png)" in text
    assert (tmp_path / "report" / "checks.png").stat().st_size > 10_000


def test_a_stage_still_training_has_no_selection_yet(tmp_path):
    fabricate(tmp_path)
    add_checks(tmp_path)
    (tmp_path / "rlvr" / "selection.json").unlink()
    text = write_report(tmp_path).read_text()
    assert ("| rlvr | – | – | – | – (no selection yet: still training?) | 0.400 · – · 0.450 | 50.0 · – · 45.0 | – | "
            "0% → 0% · – → – · – → – |" in text)


def test_a_run_without_checks_has_no_checks_section(tmp_path):
    fabricate(tmp_path)
    text = write_report(tmp_path).read_text()
    assert "Held-out checks during training" not in text
    assert not (tmp_path / "report" / "checks.png").exists()


def test_a_bad_check_line_names_its_file_line_and_field(tmp_path):
    fabricate(tmp_path)
    add_checks(tmp_path)
    path = tmp_path / "opsd" / "all-s0" / "checks.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = json.dumps({"step": 10, "avg_at_k": 0.5, "avg_at_k_ci": [0.3, 0.7]})
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=rf"^{path}: line 2: no 'mean_response_tokens' field$"):
        write_report(tmp_path)
    path.write_text(json.dumps(_check(0, 0.5, 40.0)))
    with pytest.raises(ValueError, match=r"selection.json: step 20 is not a step of .*checks.jsonl$"):
        write_report(tmp_path)


def test_the_report_over_seeds_shows_each_seeds_selected_and_stop_step(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"seeds": [0, 1], "opsd_seeds": [0]}))
    fabricate(tmp_path / "seed-0")
    fabricate(tmp_path / "seed-1")
    add_checks(tmp_path / "seed-0")
    text = section(write_report(tmp_path).read_text(), "## Held-out checks during training")
    # all arm: 24 / 40 − 1 = −40% against the start, 24 / 20 − 1 = +20% against the last; 0.45 − 0.50 = −5 pp.
    # rlvr: 45 / 50 − 1 = −10%, its last check itself, 0.45 − 0.40 = +5 pp. Seed 1 ran without checks.
    rows = [line for line in text.splitlines() if line.startswith("| ") and "seed |" not in line]
    assert rows == ["| rlvr | 0 | 5 | — | -10.0% | +0.0% | +5.0 pp |",
                    "| opsd-all-s0 | 0 | 20 | 30 (accuracy_drop) | -40.0% | +20.0% | -5.0 pp |"]
    assert (tmp_path / "seed-0" / "report" / "checks.png").exists()
    assert "Held-out checks" not in (tmp_path / "seed-1" / "report" / "report.md").read_text()


def test_the_report_over_seeds_draws_every_seeds_checks(tmp_path):
    """The figure over seeds is drawn when a seed checked, and is absent from a study without checks."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"seeds": [0, 1], "opsd_seeds": [0]}))
    fabricate(tmp_path / "seed-0")
    fabricate(tmp_path / "seed-1")
    report = tmp_path / "report"
    write_report(tmp_path)
    assert not (report / "checks_over_seeds.png").exists()
    add_checks(tmp_path / "seed-0")
    add_checks(tmp_path / "seed-1")
    text = write_report(tmp_path).read_text()
    assert (report / "checks_over_seeds.png").stat().st_size > 0
    assert "![checks over seeds](checks_over_seeds.png)" in text
