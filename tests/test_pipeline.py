"""End to end: a 2-step pipeline is killed during OPSD, rerun, finishes, and the report is built."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from opsdlab.config import load_config
from opsdlab.run.pipeline import run_pipeline
from opsdlab.report import write_report

TINY_RUN = {
    "sft": {"rows": 64, "max_steps": 3, "batch_size": 8, "save_steps": 100, "logging_steps": 1},
    "rlvr": {"max_steps": 2, "prompts_per_step": 2, "group_size": 2, "max_completion_length": 16,
             "train_problems": 16, "save_steps": 100, "logging_steps": 1},
    "opsd": {"max_steps": 8, "prompts_per_step": 2, "rollouts_per_prompt": 2, "max_completion_length": 16,
             "train_problems": 16, "save_steps": 2, "logging_steps": 1, "learning_rate": 1e-3},
    "arms": [{"name": "all", "gate": "all"}, {"name": "correct", "gate": "correct"}],
    "eval": {"problems": 4, "sampling": {"k": 2, "max_new_tokens": 16}},
}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_killed_during_opsd_then_rerun_finishes_without_touching_finished_work(tmp_path):
    run_dir = tmp_path / "run"
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({**TINY_RUN, "run_dir": str(run_dir)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "opsdlab.cli", "pipeline", "--config", str(config_path)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill once the first OPSD checkpoint is complete (the Trainer writes trainer_state.json last).
    checkpoint = run_dir / "opsd" / "all-s0" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    deadline = time.time() + 600
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.exists(), "the pipeline never reached its first OPSD checkpoint"
    assert not (run_dir / "opsd" / "all-s0" / "model" / "COMPLETE").exists(), "killed too late to test resuming"

    finished = {p: _digest(p) for p in [run_dir / "sft" / "model" / "model.safetensors",
                                        run_dir / "rlvr" / "model" / "model.safetensors",
                                        *run_dir.glob("eval/*/*/summary.json")]}
    run_pipeline(load_config(config_path))

    assert {p: _digest(p) for p in finished} == finished, "a finished stage or evaluation was rewritten"
    for arm in ("all-s0", "correct-s0"):
        assert (run_dir / "opsd" / arm / "model" / "COMPLETE").exists()
        state = json.loads(max((run_dir / "opsd" / arm / "checkpoints").glob("checkpoint-*"),
                               key=lambda p: int(p.name.split("-")[1])).joinpath("trainer_state.json").read_text())
        assert state["global_step"] == 8
    steps = [json.loads(line)["step"] for line in (run_dir / "opsd" / "all-s0" / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(1) == 1, "the resumed run restarted from scratch instead of its checkpoint"
    for name in ("base", "sft", "rlvr", "opsd-all-s0", "opsd-correct-s0"):
        summary = json.loads((run_dir / "eval" / name / "synthetic" / "summary.json").read_text())
        assert summary["num_problems"] == 4 and summary["verifier"]["compare"] == "exact"

    report = write_report(run_dir)
    text = report.read_text()
    for expected in ("opsd-correct-s0", "avg@k", "accuracy_length_synthetic.png", "correct→incorrect",
                     "What the teacher changes", "verifier", "AES", "changes_synthetic.png"):
        assert expected in text
    for picture in ("accuracy_length_synthetic.png", "training_curves.png", "kl_by_position.png",
                    "lengths_synthetic.png", "changes_synthetic.png"):
        assert (report.parent / picture).stat().st_size > 1000
    assert write_report(run_dir).read_text() == text  # a pure function of the run directory


def test_a_pipeline_without_opsd_evaluates_its_rlvr_checkpoint(tmp_path):
    config = load_config("tiny", [f"run_dir={tmp_path}", "stages=[sft, rlvr]",
                                  *(f"{key}={json.dumps(value)}" for key, value in TINY_RUN.items()),
                                  "eval.greedy=false", "eval.base=false"])
    run_pipeline(config)
    evaluated = sorted(p.parent.relative_to(tmp_path / "eval").as_posix()
                       for p in (tmp_path / "eval").glob("*/*/summary.json"))
    # The teacher check belongs to OPSD's starting checkpoint; without OPSD only SFT gets one.
    assert evaluated == ["rlvr/synthetic", "sft/synthetic", "sft/synthetic-teacher-solution"]


def test_resume_point_skips_and_removes_a_checkpoint_killed_while_saving(tmp_path):
    from opsdlab.modeling.runtime import resume_point

    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "checkpoint-2").mkdir(parents=True)
    (checkpoints / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (checkpoints / "checkpoint-10").mkdir()
    (checkpoints / "checkpoint-10" / "model.safetensors").write_text("partial")
    (checkpoints / "checkpoint-4").mkdir()
    (checkpoints / "checkpoint-4" / "trainer_state.json").write_text('{"global_st')  # cut mid-write
    assert resume_point(tmp_path) == str(checkpoints / "checkpoint-2")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2"]
    assert resume_point(tmp_path / "nothing") is None


def test_checkpoints_are_evaluated_in_eval_dtype_else_the_training_dtype(tmp_path, tiny_folder, task, loaded_dtypes):
    """`eval.dtype` (e.g. bfloat16 for a model trained from float32 weights) sets the evaluated weights'
    dtype, which summary.json records; left unset it is `model.dtype`."""
    from opsdlab.run import eval_steps, problems
    from opsdlab.config import load_config

    loaded = loaded_dtypes(eval_steps)
    small = ["eval.problems=2", "eval.greedy=false", "eval.sampling={k: 1, max_new_tokens: 4}"]
    for run, overrides in (("bf16", ["eval.dtype=bfloat16"]), ("default", [])):
        config = load_config("tiny", [f"run_dir={tmp_path / run}", *small, *overrides])
        sets = problems.eval_sets(config, task)
        eval_steps.evaluate_checkpoint(tmp_path / run, "start", tiny_folder, config, task, sets)
        summary = json.loads(next((tmp_path / run / "eval" / "start").glob("*/summary.json")).read_text())
        assert summary["dtype"] == ("bfloat16" if overrides else "float32")
    assert loaded == [torch.bfloat16, torch.float32]


def test_an_evaluation_file_without_solutions_skips_the_teacher_prompt_that_reads_them(tmp_path, tiny_folder, task,
                                                                                      capsys):
    """Evaluation sets may lack reference solutions: the student prompt is evaluated, and a teacher
    prompt that would show an empty reference is skipped with one line instead."""
    from opsdlab.run import eval_steps, problems
    from opsdlab.config import load_config

    data = tmp_path / "answers-only.jsonl"
    data.write_text('{"problem": "What is 2+3?", "answer": "5"}\n{"problem": "What is 4+4?", "answer": "8"}\n')
    config = load_config("tiny", [f"run_dir={tmp_path / 'run'}", f"eval.sets=[{data}]", "eval.problems=2",
                                  "eval.greedy=false", "eval.sampling={k: 1, max_new_tokens: 4}"])
    sets = problems.eval_sets(config, task)
    eval_steps.evaluate_checkpoint(tmp_path / "run", "start", tiny_folder, config, task, sets, teacher_context="solution")
    assert (tmp_path / "run" / "eval" / "start" / "answers-only" / "summary.json").exists()
    assert not (tmp_path / "run" / "eval" / "start" / "answers-only-teacher-solution").exists()
    assert "the teacher prompt (solution) reads each problem's solution" in capsys.readouterr().out
