"""An OPSD stage whose gate keeps no rollout in any step trains nothing: the stage command fails with
one line, the pipeline warns in its log and marks the arm in the report; skipped steps are counted
across a resume."""

import json

import yaml
from transformers import TrainerCallback

from opsdlab.cli import main
from opsdlab.modeling.runtime import read_updates

from opsd_helpers import ScriptedReward, make_trainer

# The tiny model starts random: with the exact verifier it solves nothing, so the `correct` gate keeps nothing.
NOTHING = ["--gate", "correct", "--teacher-check", "0", "max_steps=2", "prompts_per_step=2", "rollouts_per_prompt=2",
           "max_completion_length=8", "refill_max_rounds=1", "save_steps=100", "logging_steps=1"]


def test_the_stage_command_of_a_stage_that_trained_nothing_fails_with_one_line(tmp_path, tiny_folder, capsys):
    out = tmp_path / "opsd"
    assert main(["opsd", "--model", str(tiny_folder), "--out", str(out), *NOTHING]) == 2
    captured = capsys.readouterr()
    assert " done: " not in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("opsdlab opsd: error")]
    assert len(errors) == 1 and "Traceback" not in captured.err
    first = errors[0]
    assert first.startswith("opsdlab opsd: error: trained nothing: all 2 optimizer steps skipped (the correct gate "
                            "kept no rollout in them)")
    assert "--gate all" in first
    assert read_updates(out) == {"steps": 2, "skipped_steps": 2, "skipped_why": "the correct gate kept no rollout in them"}


def test_the_pipeline_warns_and_marks_an_arm_that_trained_nothing(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "stages": ["opsd"],
        "opsd": {"max_steps": 2, "prompts_per_step": 2, "rollouts_per_prompt": 2, "max_completion_length": 8,
                 "train_problems": 8, "save_steps": 100, "logging_steps": 1, "refill_max_rounds": 1},
        "arms": [{"name": "correct", "gate": "correct"}, {"name": "all", "gate": "all"}],
        "eval": {"problems": 2, "sampling": {"k": 1, "max_new_tokens": 8}, "greedy": False, "teacher_check": False,
                 "base": True},
    }))
    run_dir = tmp_path / "run"
    assert main(["pipeline", "--config", str(config), "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    warning = ("WARNING: trained nothing: all 2 optimizer steps skipped (the correct gate kept no rollout in them), "
               "so its model is the one it started from")
    done = [line for line in out.splitlines() if line.startswith("[opsd correct s0] done: ")]
    assert len(done) == 1 and done[0].endswith(warning)
    assert not any(line.startswith("[opsd all s0]") and "WARNING" in line for line in out.splitlines())
    log = [json.loads(line) for line in (run_dir / "summary.jsonl").read_text().splitlines()]
    assert [line.get("warning") for line in log if line.get("kind") == "stage"] == [
        None, "trained nothing: all 2 optimizer steps skipped (the correct gate kept no rollout in them)", None]
    assert any(line.startswith("opsd-correct-s0") and "WARNING: trained nothing" in line.strip()
               for line in [line.strip() for line in out.splitlines()])
    report = (run_dir / "report" / "report.md").read_text()
    assert "- **WARNING**: `opsd-correct-s0`: trained nothing" in report
    assert "| opsd-correct-s0 (**WARNING**: see Findings) |" in report
    assert "| opsd-all-s0 |" in report


def test_skipped_steps_before_a_resume_are_counted(tmp_path, tiny_folder, task):
    """Step 1 keeps nothing; the run is killed after step 2 and resumed: 1 of its 3 steps was skipped."""
    class Stop(TrainerCallback):
        def __init__(self, at):
            self.at = at

        def on_step_end(self, args, state, control, **kwargs):
            if self.at is not None and state.global_step >= self.at:
                control.should_training_stop = True

    def trainer(stop_at=None):
        reward = ScriptedReward(lambda call, n: [call != 1 or stop_at is None] * n)
        return make_trainer(tmp_path, tiny_folder, task, reward=reward, gate="correct", refill_max_rounds=1,
                            max_steps=3, save_steps=1, callbacks=[Stop(stop_at)])

    first = trainer(stop_at=2)
    first.train()
    assert first.skipped_steps == 1
    resumed = trainer()
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoints" / "checkpoint-2"))
    assert resumed.state.global_step == 3 and resumed.skipped_steps == 1


def test_a_stage_that_skipped_some_steps_says_how_many(tmp_path, tiny_folder, capsys, monkeypatch):
    """Only the first step's rollouts are graded correct: the second step is skipped, and the stage
    command still writes the model but warns with the count."""
    from opsdlab.stages import opsd

    class FirstStepCorrect(ScriptedReward):
        def __init__(self, verifier, eos_token_ids):
            super().__init__(lambda call, n: [call == 1] * n, eos_token_ids)

    monkeypatch.setattr(opsd, "VerifierReward", FirstStepCorrect)
    out = tmp_path / "opsd"
    assert main(["opsd", "--model", str(tiny_folder), "--out", str(out), *NOTHING]) == 0
    captured = capsys.readouterr()
    assert "WARNING: opsd: 1 of 2 optimizer steps skipped (the correct gate kept no rollout in them)" in captured.err
    assert "[opsd correct s0] done: wrote" in captured.out
