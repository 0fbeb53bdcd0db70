"""The single-run report on a fabricated run directory: findings, tables and samples with hand-computed values."""

from pathlib import Path

import pytest
import yaml

from opsdlab.config import dump_config, load_config
from opsdlab.evaluation.evaluate import write_eval
from opsdlab.evaluation.metrics.samples import Sample
from opsdlab.evaluation.metrics.summary import summarize
from opsdlab.report import write_report
from opsdlab.report.figures import palette
from opsdlab.report.token_shifts import readable_token
from opsdlab.tasks import build_task

PROBLEMS, K = 4, 2


def _eval(run_dir: Path, checkpoint: str, problems, correct: int | list[int], tokens: int) -> None:
    """Every problem gets K samples, the first `correct` correct (or `correct[i]` for problem i), each `tokens`
    long. With one `correct` for all, every problem changes by the same amount and each paired CI is a point."""
    counts = correct if isinstance(correct, list) else [correct] * len(problems)
    samples = [Sample(problem_id=p.id, sample_index=i, correct=i < c, answer=p.answer if i < c else "0",
                      response_tokens=tokens, thinking_tokens=0, truncated=False,
                      text=f"{checkpoint}: wait, the answer is {p.answer}")
               for p, c in zip(problems, counts) for i in range(K)]
    summary = {**summarize(samples, k=K), "checkpoint": checkpoint,
               "sampling": {"k": K, "temperature": 0.6, "max_new_tokens": 64}}
    write_eval(run_dir / "eval" / checkpoint / "synthetic", samples, summary)


def fabricate(run_dir: Path) -> list:
    """sft 0.5 at 40 tokens -> rlvr 1.0 at 20; from rlvr, the all arm 1.0 at 15 and the correct arm 0.5 at 20.
    The config is the pipeline's own, so the report rebuilds the held-out problems from it."""
    config = load_config("tiny", [f"run_dir={run_dir}", f"eval.problems={PROBLEMS}"])
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, run_dir / "config.yaml")
    problems = build_task("synthetic", config.task.options, seed=config.seed).examples("test", PROBLEMS)
    for checkpoint, correct, tokens in (("sft", 1, 40), ("rlvr", 2, 20), ("opsd-all-s0", 2, 15),
                                        ("opsd-correct-s0", 1, 20)):
        _eval(run_dir, checkpoint, problems, correct, tokens)
    return problems


def section(text: str, title: str) -> str:
    return text.split(f"{title}\n")[1].split("\n## ")[0]


def test_findings_state_each_change_with_its_paired_ci(tmp_path):
    fabricate(tmp_path)
    text = write_report(tmp_path).read_text()
    assert text.index("## Findings") < text.index("## How to read this report") < text.index("## synthetic")
    findings = section(text, "## Findings")
    assert ("- `rlvr` against `sft`: more accurate, +50.0 pp [+50.0, +50.0]; shorter, -50.0% [-50.0%, -50.0%]."
            in findings)
    # The all arm is as accurate as rlvr on every problem: a CI of [0, 0] does not exclude 0.
    assert ("- `opsd-all-s0` against `rlvr`: accuracy: no change detected (+0.0 pp [+0.0, +0.0]); shorter, "
            "-25.0% [-25.0%, -25.0%]." in findings)
    assert ("- `opsd-correct-s0` against `rlvr`: less accurate, -50.0 pp [-50.0, -50.0]; length: no change detected "
            "(+0.0% [+0.0%, +0.0%])." in findings)
    # The change table in pp. AES: rlvr 50% shorter with a 100% relative gain, 0.5 + 3·1; the all arm 25%
    # shorter at equal accuracy, 0.25; the correct arm 0 − 5·0.5. Flips: sft solves no problem (more than
    # half of 2 responses must be correct), rlvr all 4.
    assert "| rlvr | sft | +50.0 pp [+50.0, +50.0] | -50.0% [-50.0%, -50.0%] | +3.500 | 0 | 4 |" in text
    assert "| opsd-all-s0 | rlvr | +0.0 pp [+0.0, +0.0] | -25.0% [-25.0%, -25.0%] | +0.250 | 0 | 0 |" in text
    assert "| opsd-correct-s0 | rlvr | -50.0 pp [-50.0, -50.0] | +0.0% [+0.0%, +0.0%] | -2.500 | 4 | 0 |" in text
    for term in ("**avg@2** (avg@k with k = 2)", "**pass@2**", "**maj@2**", "**length**", "**truncated**", "**pp**",
                 "**paired 95% CI**", "**AES**", "generation limit (64 tokens here)"):
        assert term in section(text, "## How to read this report")
    assert "| checkpoint | avg@2 [95% CI] | pass@2 | maj@2 |" in text
    assert write_report(tmp_path).read_text() == text  # a pure function of the run directory


def test_a_finding_follows_the_ci_not_the_point_estimate(tmp_path):
    problems = fabricate(tmp_path)
    _eval(tmp_path, "opsd-all-s0", problems, 1, 30)  # −50 pp and +50% against rlvr on every problem
    findings = section(write_report(tmp_path).read_text(), "## Findings")
    assert ("- `opsd-all-s0` against `rlvr`: less accurate, -50.0 pp [-50.0, -50.0]; longer, +50.0% [+50.0%, +50.0%]."
            in findings)
    # Only the first problem is lost: −25 pp, yet a bootstrap draw of 4 problems misses it with probability
    # (3/4)^4 = 32%, so the CI reaches 0; it holds it 3 times with 4.7%, 4 times with 0.4%: the 2.5th
    # percentile is −75 pp. A CI that does not exclude 0 is no finding, whatever the point estimate.
    _eval(tmp_path, "opsd-all-s0", problems, [0, 2, 2, 2], 20)
    findings = section(write_report(tmp_path).read_text(), "## Findings")
    assert ("- `opsd-all-s0` against `rlvr`: accuracy: no change detected (-25.0 pp [-75.0, +0.0]); length: no "
            "change detected (+0.0% [+0.0%, +0.0%])." in findings)


def test_one_opsd_seed_shows_plain_values_not_a_spread(tmp_path):
    problems = fabricate(tmp_path)
    text = write_report(tmp_path).read_text()
    assert "OPSD arms over OPSD seeds" not in text  # one seed per arm: the checkpoint table holds it
    _eval(tmp_path, "opsd-all-s1", problems, 1, 25)
    text = write_report(tmp_path).read_text()
    # mean ± sample sd (min–max) of 1.0 and 0.5; of 15 and 25 tokens; the one-seed arm a plain value.
    assert "| all | 2 | 0.750 ± 0.354 (0.500–1.000) | 20.0 ± 7.1 (15.0–25.0) |" in text
    assert "| correct | 1 | 0.500 | 20.0 |" in text


def test_a_one_seed_run_over_seeds_shows_plain_values(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"seeds": [0], "opsd_seeds": [0]}))
    fabricate(tmp_path / "seed-0")
    text = write_report(tmp_path).read_text()
    assert "| rlvr | 1 | 1.000 | 20.0 |" in text and "| opsd-all-s0 | 1 | 1.000 | 15.0 |" in text


def test_samples_show_problem_gold_answer_and_each_checkpoints_response(tmp_path):
    problems = fabricate(tmp_path)
    samples = section(write_report(tmp_path).read_text(), "### Sample responses")
    for problem in problems:  # all 4 problems, each with its text and gold answer
        assert f"#### Problem `{problem.id}`\n\n> {problem.problem}\n\nGold answer: `{problem.answer}`" in samples
        block = samples.split(f"#### Problem `{problem.id}`")[1].split("#### Problem")[0]
        assert "**rlvr**: correct, 20 tokens" in block
        assert "**opsd-all-s0**: correct, 15 tokens" in block
        assert f"opsd-correct-s0: wait, the answer is {problem.answer}" in block
    assert "**sft**" not in samples  # the starting checkpoint and the arms only


def test_samples_without_a_config_say_why_the_problem_text_is_missing(tmp_path):
    fabricate(tmp_path)
    (tmp_path / "config.yaml").unlink()
    samples = section(write_report(tmp_path).read_text(), "### Sample responses")
    assert ("(problem text and gold answer unavailable: could not rebuild the evaluation set: FileNotFoundError"
            in samples)


def test_tokens_are_shown_with_visible_whitespace():
    assert readable_token("\n") == "`⏎`"
    assert readable_token(" Wait") == "`␣Wait`"
    assert readable_token("a|b") == "`a\\|b`"  # a pipe would end the table cell
    assert readable_token("`") == "`` ` ``"


def test_one_colour_per_checkpoint_in_every_figure():
    config = {"arms": [{"name": "all"}, {"name": "correct"}]}
    colors = palette(config, ["sft", "rlvr", "opsd-correct-s0", "opsd-all-s1", "opsd-extra-s0"])
    assert colors["rlvr"] == "black" and colors["sft"] == "tab:brown"
    assert colors["opsd-all-s1"] == colors["all"] == "tab:blue" and colors["opsd-correct-s0"] == "tab:orange"
    assert colors["opsd-extra-s0"] == "tab:green"  # an arm the config does not name comes after its arms
    assert palette(config, ["opsd-all-s0"])["correct"] == "tab:orange"  # independent of which ran
