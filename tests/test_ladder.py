"""The trace-length ladder: its presets, its arm set, and its report over rungs on fabricated run
directories with hand-computed values (no training)."""

from pathlib import Path

import matplotlib.image
import pytest
import yaml

from opsdlab import cli
from opsdlab.config import load_config, to_dict
from opsdlab.evaluation.evaluate import write_eval
from opsdlab.report.ladder import LADDER_PRESETS, ladder_points, rung_changes, write_ladder_report
from opsdlab.evaluation.metrics.samples import Sample
from opsdlab.evaluation.metrics.summary import summarize
from opsdlab.run.study import STUDY_ARM_SETS, study_config

PROBLEMS = 4
GATES = ("correct", "incorrect", "all", "none")


def _eval(run_dir: Path, checkpoint: str, correct_per_problem: int, tokens: int) -> None:
    """Every problem gets the same 2 samples, `correct_per_problem` of them correct, `tokens` long each,
    so every bootstrap replicate sees the same change and each CI is a point."""
    samples = [Sample(problem_id=f"p{p}", sample_index=i, correct=i < correct_per_problem, answer="1",
                      response_tokens=tokens, thinking_tokens=tokens, truncated=False, text="1 + 1 = 2")
               for p in range(PROBLEMS) for i in range(2)]
    write_eval(run_dir / "eval" / checkpoint / "synthetic", samples,
               {**summarize(samples, k=2), "context": "none", "checkpoint": checkpoint})


def fabricate_rung(root: Path, rlvr_tokens: dict[int, int], arms: dict[str, dict[int, tuple[int, int]]],
                   opsd_seeds=(0,)) -> Path:
    """One rung over seeds 0 and 1: RLVR answers 1 of 2 samples right at `rlvr_tokens[seed]` tokens;
    `arms[gate][seed]` = (correct of 2, tokens) of that gate's OPSD checkpoint (OPSD seed 0)."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({
        "seeds": [0, 1], "opsd_seeds": list(opsd_seeds),
        "arms": [{"name": g, "gate": "all" if g == "none" else g} for g in GATES]}))
    for seed, tokens in rlvr_tokens.items():
        _eval(root / f"seed-{seed}", "rlvr", 1, tokens)
        for gate, by_seed in arms.items():
            _eval(root / f"seed-{seed}", f"opsd-{gate}-s0", *by_seed[seed])
    return root


def fabricate_study(study: Path) -> Path:
    """Rung `short` (RLVR 20 and 24 tokens): `correct` right on every sample at unchanged length in both
    seeds (+50 pp, 0%); `all` +50 pp in seed 0 only; `none` unchanged. Rung `long` (RLVR 100 and 120
    tokens): `correct` and `none` half as long at unchanged accuracy (−50%); `incorrect` never right
    (−50 pp) at unchanged length; `all` unchanged."""
    fabricate_rung(study / "short", {0: 20, 1: 24}, {
        "correct": {0: (2, 20), 1: (2, 24)}, "all": {0: (2, 20), 1: (1, 24)}, "none": {0: (1, 20), 1: (1, 24)}})
    fabricate_rung(study / "long", {0: 100, 1: 120}, {
        "correct": {0: (1, 50), 1: (1, 60)}, "incorrect": {0: (0, 100), 1: (0, 120)},
        "all": {0: (1, 100), 1: (1, 120)}, "none": {0: (1, 50), 1: (1, 60)}})
    return study


def findings_of(text: str) -> str:
    return text.split("## Findings (hold in every seed of a rung)")[1].split("\n## ")[0]


def test_the_rungs_differ_only_in_problem_size_thinking_and_response_caps():
    from opsdlab.config.tasks import SyntheticConfig

    base = to_dict(load_config("ladder-2-short"))
    free = {("task", "thinking"), ("task", "options", "min_terms"), ("task", "options", "max_terms"),
            ("task", "options", "max_term"),
            ("eval", "sampling", "max_new_tokens"), ("rlvr", "max_completion_length"),
            ("opsd", "max_completion_length"), ("sft", "max_length"), ("run_dir",)}

    def flat(d, prefix=()):
        return {k: v for key, value in d.items()
                for k, v in (flat(value, prefix + (key,)) if isinstance(value, dict) else {prefix + (key,): value}).items()}

    sizes = []
    for preset in LADDER_PRESETS:
        config = to_dict(load_config(preset))
        differing = {key for key in flat(base).keys() | flat(config).keys()
                     if flat(base).get(key) != flat(config).get(key)}
        assert differing <= free, f"{preset} differs from ladder-2-short in {sorted(differing - free)}"
        options = config["task"]["options"]
        max_term = options.get("max_term", SyntheticConfig.max_term)
        sizes.append((config["task"]["thinking"], options["min_terms"], options["max_terms"], max_term))
        # More terms, smaller ones: every rung's largest total is about the same (60-65).
        assert 60 <= options["max_terms"] * max_term <= 65, preset
        # Each rung's caps are the same on every stage, and the demo's task is the short rung.
        assert config["rlvr"]["max_completion_length"] == config["opsd"]["max_completion_length"] \
            == config["eval"]["sampling"]["max_new_tokens"]
        assert [arm["name"] for arm in config["arms"]] == list(GATES)
    assert sizes == [(False, 3, 5, 13), (True, 3, 5, 13), (True, 8, 10, 6), (True, 16, 20, 3)]
    tiny = to_dict(load_config("tiny"))
    assert tiny["task"]["options"] == base["task"]["options"] and tiny["sft"] == base["sft"]


def test_the_ladder_arm_set_is_the_gates_and_the_none_control(tmp_path):
    config = study_config("ladder-3-medium", tmp_path, arms="ladder")
    assert [(arm.name, arm.overrides.get("gate"), arm.overrides.get("teacher_context")) for arm in config.arms] == [
        ("correct", "correct", None), ("incorrect", "incorrect", None), ("all", "all", None), ("none", "all", "none")]
    assert config.run_dir == str(tmp_path / "ladder-3-medium")
    assert set(STUDY_ARM_SETS) >= {"gates", "methods", "ladder"}


def test_each_gate_per_rung_and_seed_hand_computed(tmp_path):
    study = fabricate_study(tmp_path)
    found = rung_changes(study / "long")
    assert list(found["gates"]) == ["correct", "incorrect", "all", "none"]  # configured order
    by_draw, draws = found["gates"]["correct"]
    assert draws == [0, 1]
    assert {s: d["length_change"] for s, d in by_draw.items()} == pytest.approx({0: -0.5, 1: -0.5})
    assert {s: d["accuracy_diff"] for s, d in by_draw.items()} == pytest.approx({0: 0.0, 1: 0.0})
    assert found["gates"]["incorrect"][0][1]["accuracy_diff_ci"] == pytest.approx([-0.5, -0.5])
    points = ladder_points({"short": rung_changes(study / "short"), "long": found})
    # One point per (rung, gate, seed); its x is that seed's RLVR mean length.
    assert [(rung, gate, seed, d["mean_length_before"]) for rung, gate, seed, d in points][:6] == [
        ("short", "correct", 0, 20), ("short", "correct", 1, 24), ("short", "all", 0, 20), ("short", "all", 1, 24),
        ("short", "none", 0, 20), ("short", "none", 1, 24)]
    assert len(points) == 6 + 8


def test_the_report_states_per_gate_what_holds_in_every_seed_of_a_rung(tmp_path):
    study = fabricate_study(tmp_path)
    text = write_ladder_report(study, ["short", "long"]).read_text()
    findings = findings_of(text)
    assert ("- `correct` is more accurate than RLVR in every seed at `short` (RLVR 20–24 tokens; "
            "+50.0 pp to +50.0 pp).") in findings
    assert ("- `correct` is shorter than RLVR in every seed at `long` (RLVR 100–120 tokens; -50.0% to -50.0%, "
            "and so does the `none` control).") in findings
    assert "- `incorrect` is less accurate than RLVR in every seed at `long` (RLVR 100–120 tokens; " in findings
    assert "- `none` is shorter than RLVR in every seed at `long`" in findings
    assert "`all` is" not in findings  # +50 pp in one seed, 0 in the other: not a finding
    assert "| short | all | s0 | 20.0 | +50.0 [+50.0, +50.0] | +0.0% [+0.0, +0.0] |" in text
    assert "| short | all | holds in every seed (2/2) | | **no** | **no** |" in text
    assert "| long | correct | holds in every seed (2/2) | | **no** | **shorter** |" in text
    assert text.index("| short |") < text.index("| long |")  # rungs in the order given
    image = matplotlib.image.imread(study / "ladder-report" / "ladder.png")
    assert image.shape[1] > 1.8 * image.shape[0]  # two panels side by side
    assert write_ladder_report(study, ["short", "long"]).read_text() == text  # a pure function of the runs


def test_a_finding_needs_every_seed_and_every_opsd_draw(tmp_path):
    # Seed 1 lacks its `correct` arm: nothing about `correct` holds in every seed.
    study = fabricate_study(tmp_path)
    for path in (study / "short" / "seed-1" / "eval" / "opsd-correct-s0").rglob("*"):
        if path.is_file():
            path.unlink()
    text = write_ladder_report(study, ["short", "long"]).read_text()
    assert "`correct` is more accurate" not in findings_of(text)
    assert "| short | correct | holds in every seed (1/2) | | **no** | **no** |" in text
    # With two OPSD seeds configured, OPSD seed 1 never ran: no draw set is complete, nothing holds.
    pooled = fabricate_rung(tmp_path / "pooled" / "long", {0: 100, 1: 120},
                            {"correct": {0: (1, 50), 1: (1, 60)}}, opsd_seeds=(0, 1))
    found = rung_changes(pooled)
    assert found["gates"]["correct"][1] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert "None: no gate's change" in findings_of(write_ladder_report(pooled.parent, ["long"]).read_text())


def test_rungs_not_run_are_named_and_bad_input_is_an_error(tmp_path):
    study = fabricate_study(tmp_path)
    text = write_ladder_report(study, ["short", "long", "ladder-4-long"]).read_text()
    assert "Not run yet (no OPSD results): `ladder-4-long`." in text
    with pytest.raises(ValueError, match="distinct rung presets"):
        write_ladder_report(study, ["short", "short"])
    with pytest.raises(FileNotFoundError, match="no study directory"):
        write_ladder_report(tmp_path / "missing", ["short"])


def test_opsdlab_study_ladder_writes_the_ladder_report(tmp_path, monkeypatch, capsys):
    """The CLI's --ladder switch: after the study (here a stand-in that trains nothing), the report over
    the given rungs, in their order."""
    study = fabricate_study(tmp_path / "study")
    calls = []
    monkeypatch.setattr("opsdlab.run.study.run_study", lambda *args, **kwargs: calls.append((args, kwargs)) or {})
    code = cli.main(["study", "--presets", "short,long", "--arms", "ladder", "--ladder", "--run-dir", str(study)])
    assert code == 0 and calls[0][1]["arms"] == "ladder" and calls[0][0][1] == ["short", "long"]
    assert f"ladder: {study / 'ladder-report' / 'report.md'}" in capsys.readouterr().out
    assert "`correct` is more accurate" in (study / "ladder-report" / "report.md").read_text()
