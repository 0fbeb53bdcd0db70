"""Training data is read whole before any model loads: RL and the `answer` teacher train on problems
and answers alone, a reference solution is asked only where something reads it, a bad row is named
by file, line and field, and a rerun after the data changed says so."""

import json

import pytest
import yaml

from opsdlab.run import budget_steps, eval_steps, outputs, train_steps
from opsdlab.cli import main
from opsdlab.config import load_config
from opsdlab.config.methods import METHODS
from opsdlab.run.provenance import write_record

SMALL = {"max_steps": 1, "prompts_per_step": 2, "max_completion_length": 8, "train_problems": 8,
         "save_steps": 100, "logging_steps": 1}


def _problems_file(path, examples):
    """A JSONL of problems and answers alone, as the usual RL math sets come: no solution, no id."""
    path.write_text("".join(json.dumps({"problem": e.problem, "answer": e.answer}) + "\n" for e in examples))
    return path


@pytest.fixture
def problems_and_answers(tmp_path, task):
    """An RL training file: 12 training problems."""
    return _problems_file(tmp_path / "rl.jsonl", task.examples("train", 12))


@pytest.fixture
def held_out(tmp_path, task):
    """An evaluation file of problems that are not training problems (sets differ by text)."""
    return _problems_file(tmp_path / "held_out.jsonl", task.examples("test", 4))


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if the pipeline loads or builds a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the training data was checked")

    for module, name in ((train_steps, "load_policy"), (train_steps, "build_tiny_model"),
                         (eval_steps, "load_for_eval"), (budget_steps, "load_for_eval")):
        monkeypatch.setattr(module, name, refuse)


def _config(tmp_path, model, data, arms, eval_set=None, **extra) -> str:
    """A pipeline config file of the file task on `data`, RLVR then OPSD, at tiny step counts."""
    config = {"run_dir": str(tmp_path / "run"), "stages": ["rlvr", "opsd"], "model": {"init": str(model)},
              "task": {"name": "file", "options": {"train": str(data)}},
              "rlvr": {**SMALL, "group_size": 2}, "opsd": {**SMALL, "rollouts_per_prompt": 2},
              "arms": arms, "workers": 1,
              "eval": {"sets": [str(eval_set or data)], "problems": 2, "greedy": False, "base": False,
                       "sampling": {"k": 1, "max_new_tokens": 8}},
              **extra}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_problem_and_answer_file_runs_through_rlvr_and_an_answer_arm(tmp_path, tiny_folder, problems_and_answers,
                                                                       held_out, capsys):
    config = _config(tmp_path, tiny_folder, problems_and_answers,
                     [{"name": "answer", "teacher_context": "answer", "gate": "all"}], eval_set=held_out)
    assert main(["pipeline", "--config", config]) == 0, capsys.readouterr().err
    run = tmp_path / "run"
    for stage in ("rlvr", "opsd/answer-s0"):
        assert (run / stage / "model" / "COMPLETE").exists()
    # The teacher check of the answer context ran on the RLVR checkpoint: the data has what it reads.
    assert (run / "eval" / "rlvr" / "held_out-teacher-answer" / "summary.json").exists()


def test_an_arm_that_reads_solutions_is_refused_before_any_model_loads(tmp_path, tiny_folder, problems_and_answers,
                                                                        capsys, no_model_loads):
    config = _config(tmp_path, tiny_folder, problems_and_answers,
                     [{"name": "answer", "teacher_context": "answer"}, {"name": "ref", "teacher_context": "solution"},
                      {"name": "crisp", "method": "crisp"}])
    assert main(["pipeline", "--config", config]) == 2
    error = capsys.readouterr().err.splitlines()[0]
    assert error.startswith(f"opsdlab pipeline: error: task.options.train: {problems_and_answers} line 1: missing "
                            "field 'solution' (columns present: problem, answer)")
    assert "arms.ref.teacher_context=solution reads each problem's reference solution" in error
    assert "arms.answer" not in error and "arms.crisp" not in error
    assert not (tmp_path / "run").exists()


def test_the_rlvr_command_trains_on_problems_and_answers(tmp_path, tiny_folder, problems_and_answers):
    assert main(["rlvr", "--model", str(tiny_folder), "--out", str(tmp_path / "rlvr"),
                 "--data", str(problems_and_answers), "group_size=2",
                 *(f"{key}={value}" for key, value in SMALL.items())]) == 0
    assert (tmp_path / "rlvr" / "model" / "model.safetensors").exists()


def test_the_opsd_command_says_which_context_reads_the_missing_solutions(tmp_path, problems_and_answers, capsys):
    """Before the model loads (the folder does not even exist)."""
    assert main(["opsd", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                 "--data", str(problems_and_answers)]) == 2
    error = capsys.readouterr().err.splitlines()[0]
    assert error.startswith(f"opsdlab opsd: error: {problems_and_answers} line 1: missing field 'solution'")
    assert ("opsd.teacher_context=solution reads each problem's reference solution; give one in every row, or train "
            "without what reads it (RLVR and the teacher contexts answer, concise and none need none)") in error


def test_each_method_names_what_its_teacher_reads():
    from opsdlab.run.preflight import solution_readers
    from opsdlab.config.choices import CONTEXT_READS
    from opsdlab.tasks.prompts import TEACHER_CONTEXTS

    assert set(CONTEXT_READS) == set(TEACHER_CONTEXTS)
    arms = [{"name": name, "method": name} for name in METHODS]
    config = load_config("tiny", ["stages=[rlvr, opsd]", f"arms={json.dumps(arms)}"])
    assert solution_readers(config) == ["arms.opsd.teacher_context=solution",
                                        "arms.contrastive.teacher_context=solution",
                                        "arms.contrastive.contrast_context=unrelated"]
    answer = [{**arm, "teacher_context": "answer"} for arm in arms]
    config = load_config("tiny", [f"arms={json.dumps(answer)}"])
    assert solution_readers(config) == ["sft (its targets are the solutions)",
                                        "arms.contrastive.contrast_context=unrelated"]


def test_a_malformed_row_is_named_before_any_worker_starts(tmp_path, tiny_folder, problems_and_answers, capsys):
    lines = problems_and_answers.read_text().splitlines()
    lines[2] = '{"problem": "What is 1 + 2?", "answer": }'
    problems_and_answers.write_text("\n".join(lines) + "\n")
    config = _config(tmp_path, tiny_folder, problems_and_answers, [{"name": "answer", "teacher_context": "answer"}],
                     workers=2)
    assert main(["pipeline", "--config", config]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith(f"opsdlab pipeline: error: task.options.train: {problems_and_answers} "
                                          "line 3: not valid JSON")
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_rerun_after_the_training_data_changed_names_the_change(tmp_path, tiny_folder, problems_and_answers, held_out,
                                                                 capsys):
    """A stage that started on one version of the file (its record written, nothing finished) and a
    rerun on another: the refusal names the changed input, not a remade model."""
    arms = [{"name": "answer", "teacher_context": "answer"}]
    config_file = _config(tmp_path, tiny_folder, problems_and_answers, arms, eval_set=held_out)
    config = load_config(config_file)
    rlvr = next(output for output in outputs.run_outputs(config) if output.step == "train rlvr")
    write_record(rlvr.folder, rlvr.expected())
    with problems_and_answers.open("a") as handle:
        handle.write(json.dumps({"problem": "What is 2 + 2?", "answer": "4"}) + "\n")
    assert main(["pipeline", "--config", config_file]) == 2
    error = capsys.readouterr().err
    assert "holds results made with other settings (its input train_data changed)" in error
    assert "  its input train_data changed  (in train rlvr)" in error
    assert "a model they read was remade" not in error


def test_an_rlcsd_plugin_arm_reads_no_reference_solution():
    """Its teachers read sibling rollouts on both sides; a group with no correct rollout falls back to the
    reference in the teacher prompt, but that row has no contrast pair and carries no loss."""
    from opsdlab.run.preflight import solution_readers

    arms = [{"name": "rlcsd", "method": "contrastive", "contrast_variant": "rlcsd_plugin"},
            {"name": "sibling", "teacher_context": "sibling"}]
    config = load_config("tiny", ["stages=[rlvr, opsd]", f"arms={json.dumps(arms)}"])
    # a plain OPSD arm on the sibling context still trains the fallback rows against the reference
    assert solution_readers(config) == ["arms.sibling.teacher_context=sibling"]
