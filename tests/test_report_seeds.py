"""The report over pipeline seeds, on a fabricated run directory with hand-computed values."""

import shutil
from pathlib import Path

import pytest
import yaml

from opsdlab.evaluation.evaluate import write_eval
from opsdlab.evaluation.metrics.samples import Sample
from opsdlab.evaluation.metrics.summary import summarize
from opsdlab.report import write_report
from opsdlab.report.changes import (against_all_arm, arm_teacher_context, consistent_sign, lead_and_change, seed_changes,
                                    stage_changes, teacher_advantages, teacher_stage_changes)
from opsdlab.report.rundir import run_config, seed_dirs
from opsdlab.report.tables import spread

PROBLEMS = 4


def _eval(run_dir: Path, checkpoint: str, folder: str, correct_per_problem: int, tokens: int,
          context: str = "none") -> None:
    """Every problem gets the same 2 samples: `correct_per_problem` of them correct, `tokens` long each,
    so every bootstrap replicate sees the same change and each CI is a point."""
    samples = [Sample(problem_id=f"p{p}", sample_index=i, correct=i < correct_per_problem, answer="1",
                      response_tokens=tokens, thinking_tokens=0, truncated=False, text="wait, 1 + 1 = 2")
               for p in range(PROBLEMS) for i in range(2)]
    summary = {**summarize(samples, k=2), "context": context, "checkpoint": checkpoint}
    write_eval(run_dir / "eval" / checkpoint / folder, samples, summary)


def fabricate(root: Path) -> Path:
    """Two seeds. avg@k and tokens (rlvr -> opsd-all-s0): seed 0 0.5, 10 -> 1.0, 5; seed 1 0.5, 20 -> 0.5, 10.
    The teacher prompt at rlvr reads 1.0 against the student's 0.5 in both seeds."""
    (root / "config.yaml").write_text(yaml.safe_dump({"seeds": [0, 1], "arms": [{"name": "all", "gate": "all"}],
                                                     "opsd_seeds": [0], "opsd": {"teacher_context": "solution"}}))
    for seed, (rlvr_tokens, opsd_correct) in {0: (10, 2), 1: (20, 1)}.items():
        run_dir = root / f"seed-{seed}"
        _eval(run_dir, "rlvr", "synthetic", 1, rlvr_tokens)
        _eval(run_dir, "rlvr", "synthetic-teacher-solution", 2, rlvr_tokens, context="solution")
        _eval(run_dir, "opsd-all-s0", "synthetic", opsd_correct, rlvr_tokens // 2)
    return root


def findings_of(text: str) -> str:
    """The findings section, which opens the report over seeds."""
    assert text.index("## Findings (hold in every seed)") < text.index("## How to read this report")
    return text.split("## Findings (hold in every seed)")[1].split("\n## ")[0]


def test_spread_and_consistent_sign_hand_computed():
    # sample sd (ddof=1) of 0.5 and 1.0: sqrt((0.25² + 0.25²) / 1) = 0.25·√2
    assert spread([0.5, 1.0]) == pytest.approx({"n": 2, "mean": 0.75, "sd": 0.25 * 2 ** 0.5, "min": 0.5, "max": 1.0})
    assert spread([3.0]) == {"n": 1, "mean": 3.0, "sd": 0.0, "min": 3.0, "max": 3.0}
    assert consistent_sign([(0.1, 0.3), (0.01, 0.2)]) == 1
    assert consistent_sign([(-0.3, -0.1), (-0.2, -0.01)]) == -1
    assert consistent_sign([(0.1, 0.3), (-0.01, 0.2)]) == 0  # one CI includes 0: not a finding
    assert consistent_sign([(0.1, 0.3), (-0.3, -0.1)]) == 0  # signs differ
    assert consistent_sign([(0.0, 0.2), (0.1, 0.3)]) == 0  # a CI touching 0 does not exclude it
    assert consistent_sign([]) == 0


def test_paired_changes_and_teacher_advantage_per_seed(tmp_path):
    seeds = seed_dirs(fabricate(tmp_path))
    assert list(seeds) == [0, 1]
    changes = seed_changes(seeds, "synthetic")["opsd-all-s0"]
    assert changes[0]["accuracy_diff"] == pytest.approx(0.5) and changes[0]["accuracy_diff_ci"] == pytest.approx([0.5, 0.5])
    assert changes[1]["accuracy_diff"] == pytest.approx(0.0) and changes[1]["accuracy_diff_ci"] == pytest.approx([0.0, 0.0])
    for d in changes.values():
        assert d["length_change"] == pytest.approx(-0.5) and d["length_change_ci"] == pytest.approx([-0.5, -0.5])
    # AES: seed 0 is 50% shorter and 100% more accurate: 0.5 + 3 * 1.0; seed 1 only shorter: 0.5.
    assert [changes[s]["aes"] for s in (0, 1)] == pytest.approx([3.5, 0.5])
    advantage = teacher_advantages(seeds, "synthetic")[("rlvr", "solution")]
    assert {s: d["accuracy_diff"] for s, d in advantage.items()} == pytest.approx({0: 0.5, 1: 0.5})


def test_the_report_states_only_what_holds_in_every_seed(tmp_path):
    root = fabricate(tmp_path)
    text = write_report(root).read_text()
    assert "| rlvr | 2 | 0.500 ± 0.000 (0.500–0.500) | 15.0 ± 7.1 (10.0–20.0) |" in text
    assert "| opsd-all-s0 | 2 | 0.750 ± 0.354 (0.500–1.000) | 7.5 ± 3.5 (5.0–10.0) |" in text
    assert "| rlvr | solution | +50.0 pp [+50.0, +50.0] | +50.0 pp [+50.0, +50.0] | higher in every seed |" in text
    assert "| opsd-all-s0 | 0 | +50.0 pp [+50.0, +50.0] | -50.0% [-50.0%, -50.0%] | +3.500 |" in text
    assert "| opsd-all-s0 | 1 | +0.0 pp [+0.0, +0.0] | -50.0% [-50.0%, -50.0%] | +0.500 |" in text
    assert "| opsd-all-s0 | 2/2 | no | shorter in every seed |" in text
    findings = findings_of(text)
    assert "`opsd-all-s0` is shorter than `rlvr` in every seed (-50.0% to -50.0%)" in findings
    assert "teacher prompt (`solution`) is more accurate than the student prompt in every seed" in findings
    assert "accurate than `rlvr`" not in findings  # +50 pp in one seed, 0 in the other: not a finding
    assert (root / "report" / "changes_synthetic.png").stat().st_size > 1000
    for seed in (0, 1):  # each seed keeps its own single-run report
        assert "opsd-all-s0" in (root / f"seed-{seed}" / "report" / "report.md").read_text()
    assert write_report(root).read_text() == text  # a pure function of the run directory


def test_an_arms_teacher_context_is_its_own_else_the_opsd_stages():
    config = {"opsd": {"teacher_context": "solution"},
              "arms": [{"name": "all", "gate": "all"}, {"name": "blind", "gate": "all", "teacher_context": "none"}]}
    assert arm_teacher_context(config, "all") == "solution"
    assert arm_teacher_context(config, "blind") == "none"
    assert arm_teacher_context(config, "missing") is None


def test_each_arm_against_its_teachers_lead_at_the_start(tmp_path):
    root = fabricate(tmp_path)
    _eval(root / "seed-1", "rlvr", "synthetic-teacher-solution", 1, 20, context="solution")  # seed 1: no lead
    seeds = seed_dirs(root)
    advantages, changes = teacher_advantages(seeds, "synthetic"), seed_changes(seeds, "synthetic")
    # The solution teacher leads by 0.5 at rlvr in seed 0 and by 0 in seed 1; the all arm gains 0.5 and 0.
    points = lead_and_change(seeds, run_config(root), advantages, changes)
    assert [(arm, seed) for arm, seed, _, _ in points] == [("all", 0), ("all", 1)]
    assert [lead["accuracy_diff"] for _, _, lead, _ in points] == pytest.approx([0.5, 0.0])
    assert [change["accuracy_diff"] for _, _, _, change in points] == pytest.approx([0.5, 0.0])
    # An arm trained with a context never checked at the start has no lead to plot.
    other = {**run_config(root), "arms": [{"name": "all", "gate": "all", "teacher_context": "concise"}]}
    assert lead_and_change(seeds, other, advantages, changes) == []
    text = write_report(root).read_text()
    assert "![lead vs change](lead_vs_change_synthetic.png)" in text
    assert (root / "report" / "lead_vs_change_synthetic.png").stat().st_size > 1000


def fabricate_with_sft_and_control(root: Path) -> Path:
    """`fabricate` plus an SFT evaluation and an `unrelated` arm per seed. avg@k and tokens:
    sft: seed 0 0.5, 20; seed 1 0.0, 40 (so rlvr is 50% shorter in both, and +0 / +50 pp).
    opsd-unrelated-s0: 0.0 and rlvr's length in both seeds (against the all arm: seed 0 1.0, 5 ->
    −100 pp, +100%; seed 1 0.5, 10 -> −50 pp, +100%)."""
    fabricate(root)
    for seed, (sft_correct, sft_tokens, rlvr_tokens) in {0: (1, 20, 10), 1: (0, 40, 20)}.items():
        _eval(root / f"seed-{seed}", "sft", "synthetic", sft_correct, sft_tokens)
        _eval(root / f"seed-{seed}", "opsd-unrelated-s0", "synthetic", 0, rlvr_tokens)
    return root


def test_each_stage_against_the_one_before_it_hand_computed(tmp_path):
    seeds = seed_dirs(fabricate_with_sft_and_control(tmp_path))
    rlvr = stage_changes(seeds, "synthetic")[("rlvr", "sft")]
    assert [rlvr[s]["accuracy_diff"] for s in (0, 1)] == pytest.approx([0.0, 0.5])
    assert [rlvr[s]["length_change"] for s in (0, 1)] == pytest.approx([-0.5, -0.5])
    assert rlvr[0]["aes"] == pytest.approx(0.5) and rlvr[1]["aes"] is None  # no AES from accuracy 0
    control = against_all_arm(seeds, "synthetic")
    assert list(control) == ["opsd-unrelated-s0"]  # the all arm is not compared with itself
    assert [control["opsd-unrelated-s0"][s]["accuracy_diff"] for s in (0, 1)] == pytest.approx([-1.0, -0.5])
    assert [control["opsd-unrelated-s0"][s]["length_change"] for s in (0, 1)] == pytest.approx([1.0, 1.0])

    text = write_report(tmp_path).read_text()
    assert "| rlvr | 0 | +0.0 pp [+0.0, +0.0] | -50.0% [-50.0%, -50.0%] | +0.500 |" in text
    assert "| rlvr | 1 | +50.0 pp [+50.0, +50.0] | -50.0% [-50.0%, -50.0%] | – |" in text
    assert "| opsd-unrelated-s0 | 0 | -100.0 pp [-100.0, -100.0] | +100.0% [+100.0%, +100.0%] |" in text
    findings = findings_of(text)
    assert "`rlvr` is shorter than `sft` in every seed (-50.0% to -50.0%)" in findings
    assert "`rlvr` is more accurate than `sft`" not in findings  # +0 pp in seed 0
    assert "`opsd-unrelated-s0` is less accurate than the `all` arm in every seed (-100.0 to -50.0 pp)" in findings
    assert "`opsd-unrelated-s0` is longer than the `all` arm in every seed (+100.0% to +100.0%)" in findings
    assert "`opsd-unrelated-s0` is less accurate than `rlvr` in every seed (-50.0 to -50.0 pp)" in findings


def test_the_teacher_prompt_across_stages_hand_computed(tmp_path):
    """The teacher prompt reads 1.0 at sft and 0.5 at rlvr in both seeds, at the same length: RLVR
    eroded the reading, −50 pp in every seed, a finding of its own beside the student prompt's."""
    root = fabricate_with_sft_and_control(tmp_path)
    for seed, tokens in {0: 10, 1: 20}.items():
        _eval(root / f"seed-{seed}", "sft", "synthetic-teacher-solution", 2, tokens, context="solution")
        _eval(root / f"seed-{seed}", "rlvr", "synthetic-teacher-solution", 1, tokens, context="solution")
    changes = teacher_stage_changes(seed_dirs(root), "synthetic")
    assert list(changes) == ["solution"] and list(changes["solution"]) == [("rlvr", "sft")]
    by_seed = changes["solution"][("rlvr", "sft")]
    assert [by_seed[s]["accuracy_diff"] for s in (0, 1)] == pytest.approx([-0.5, -0.5])
    assert [by_seed[s]["length_change"] for s in (0, 1)] == pytest.approx([0.0, 0.0])
    text = write_report(root).read_text()
    assert "### The teacher prompt (`solution`): `rlvr` against `sft` per seed" in text
    findings = findings_of(text)
    assert ("- `rlvr` on the teacher prompt (`solution`) is less accurate than `sft` on the same prompt in every "
            "seed (-50.0 to -50.0 pp).") in findings
    assert "`rlvr` is shorter than `sft` in every seed" in findings  # the student prompt's own change stays


def test_a_checkpoint_missing_in_one_seed_is_no_finding(tmp_path):
    root = fabricate(tmp_path)
    _eval(root / "seed-1", "opsd-extra-s0", "synthetic", 2, 10)  # only seed 1 has this arm
    text = write_report(root).read_text()
    assert "| opsd-extra-s0 | 1/2 | no | no |" in text
    assert "`opsd-extra-s0`" not in findings_of(text)


def test_a_configured_seed_still_to_run_means_no_finding_yet(tmp_path):
    root = fabricate(tmp_path)
    (root / "config.yaml").write_text(yaml.safe_dump({"seeds": [0, 1, 2]}))
    text = write_report(root).read_text()
    assert "| opsd-all-s0 | 2/3 | no | no |" in text and "| rlvr | solution |" in text
    assert "- None:" in findings_of(text)


def test_a_single_seed_run_directory_keeps_its_report(tmp_path):
    _eval(tmp_path, "rlvr", "synthetic", 1, 10)
    _eval(tmp_path, "opsd-all-s0", "synthetic", 2, 5)
    text = write_report(tmp_path).read_text()
    assert seed_dirs(tmp_path) == {} and "over pipeline seeds" not in text and "opsd-all-s0" in text


def test_an_arm_with_several_opsd_seeds_states_a_finding_only_if_every_draw_holds(tmp_path):
    """OPSD seeds 0 and 1. `opsd-all-s1` is +50 pp and 50% shorter in both pipeline seeds, a finding on
    its own; `opsd-all-s0` is +50 pp in seed 0 but +0 in seed 1 (`fabricate`). Pooled over the four
    (pipeline seed, OPSD seed) draws, only the length holds."""
    root = fabricate(tmp_path)
    config = yaml.safe_load((root / "config.yaml").read_text())
    (root / "config.yaml").write_text(yaml.safe_dump({**config, "opsd_seeds": [0, 1]}))
    for seed, rlvr_tokens in {0: 10, 1: 20}.items():
        _eval(root / f"seed-{seed}", "opsd-all-s1", "synthetic", 2, rlvr_tokens // 2)
    findings = findings_of(write_report(root).read_text())
    assert ("- `opsd-all` (OPSD seeds 0, 1) is shorter than `rlvr` in every pipeline seed and OPSD seed "
            "(-50.0% to -50.0%).") in findings
    assert "more accurate than `rlvr`" not in findings
    assert "`opsd-all-s1`" not in findings  # no per-draw statement beside the pooled one

    shutil.rmtree(root / "seed-1" / "eval" / "opsd-all-s1")  # a draw still to run: no finding yet
    findings = findings_of(write_report(root).read_text())
    assert "`opsd-all`" not in findings


def test_a_seed_still_to_run_leaves_the_report_over_the_others_intact(tmp_path):
    """A seed directory with nothing evaluated yet (its run still going, beside another study process)
    holds no checkpoint: the report over seeds is written from the seeds that have one."""
    root = fabricate(tmp_path)
    config = yaml.safe_load((root / "config.yaml").read_text())
    (root / "config.yaml").write_text(yaml.safe_dump({**config, "seeds": [0, 1, 2]}))
    (root / "seed-2").mkdir()
    text = write_report(root).read_text()
    assert "`opsd-all` is shorter than `rlvr` in every seed" not in findings_of(text)  # seed 2 has not run
    checkpoints = text.split("### Checkpoints over seeds")[1].split("\n### ")[0]
    assert "| rlvr | 2 | 0.500 ± 0.000" in checkpoints  # over the two seeds that ran
