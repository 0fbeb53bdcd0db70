"""A run's missing pieces (model folder, data files, optional extras) are named all at once,
before any model loads."""

import pytest

from opsdlab.run import preflight
from opsdlab.cli import main
from opsdlab.config import ConfigError, load_config
from opsdlab.run.preflight import check_inputs


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if the pipeline loads or builds a model."""
    from opsdlab.run import budget_steps, eval_steps, train_steps

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    for module, name in ((train_steps, "load_policy"), (train_steps, "build_tiny_model"),
                         (eval_steps, "load_for_eval"), (budget_steps, "load_for_eval")):
        monkeypatch.setattr(module, name, refuse)


def test_the_gpu_preset_names_every_missing_piece_before_loading_a_model(tmp_path, monkeypatch, capsys,
                                                                          no_model_loads):
    monkeypatch.chdir(tmp_path)  # no train.jsonl, math500.jsonl ... here
    code = main(["pipeline", "--config", "qwen3-1.7b", "model.init=/nonexistent", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert "model.init: /nonexistent is not a folder" in err
    assert "task.options.train: train.jsonl not found" in err
    for name in ("math500.jsonl", "aime24.jsonl", "aime25.jsonl"):
        assert f"eval.sets: {name} not found" in err
    assert "MATH-500 (the HuggingFaceH4/MATH-500 dataset" in err
    assert not (tmp_path / "r").exists(), "a refused run wrote its run directory"


def test_missing_extras_are_named_with_how_to_install_them(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "installed", lambda module: False)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "test.jsonl").write_text("")
    config = load_config("qwen3-1.7b", [f"model.init={tmp_path / 'model'}", f"task.options.train={tmp_path / 'train.jsonl'}",
                                        f"eval.sets=[{tmp_path / 'test.jsonl'}]", "rlvr.report_to=wandb", "task.name=file"])
    with pytest.raises(ConfigError) as error:
        check_inputs(config)
    text = str(error.value)
    assert "rlvr.use_vllm, opsd.use_vllm, eval.backend=vllm: vLLM is not installed" in text
    assert 'rlvr.report_to=wandb: wandb is not installed (pip install -e ".[wandb]")' in text
    assert "model.init" not in text and "not found" not in text


def test_a_complete_tiny_config_passes():
    check_inputs(load_config("tiny"))


def test_the_gpu_presets_evaluate_with_vllm_and_track_nothing_by_default():
    for preset in ("qwen3-1.7b", "qwen3-8b"):
        config = load_config(preset)
        assert config.eval.backend == "vllm"
        assert config.rlvr.report_to == "none" and config.opsd.report_to == "none"


def test_the_vllm_generation_backend_is_a_vllm_user_too(monkeypatch):
    monkeypatch.setattr(preflight, "installed", lambda module: False)
    with pytest.raises(ConfigError, match="rlvr.generation_backend: vLLM is not installed"):
        check_inputs(load_config("tiny", ["rlvr.generation_backend=vllm"]))


def _problems(path, problems: list[str]):
    import json

    path.write_text("".join(json.dumps({"problem": p, "solution": "s", "answer": str(i)}) + "\n"
                            for i, p in enumerate(problems)))
    return path


def test_a_file_task_without_evaluation_files_is_refused(tmp_path, capsys, no_model_loads):
    """A file task trains on every row of its file: its own split would evaluate on training problems."""
    train = _problems(tmp_path / "train.jsonl", ["What is 1 + 1?", "What is 2 + 2?"])
    code = main(["pipeline", "--config", "tiny", "task.name=file", f"task.options={{train: {train}}}",
                 "--run-dir", str(tmp_path / "r")])
    assert code == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"opsdlab pipeline: error: eval.sets: ['synthetic'] is the task's own held-out split, but task 'file' trains "
        f"on every row of {train} and holds none out; name evaluation files, e.g. eval.sets=[math500.jsonl, "
        "aime24.jsonl]")
    assert not (tmp_path / "r").exists()


def test_training_problems_that_are_evaluated_are_refused_before_anything_runs(tmp_path, capsys, no_model_loads):
    """Problems are compared by their text, with case and spacing normalised, not by id or row."""
    train = _problems(tmp_path / "train.jsonl", ["What is 1 + 1?", "What is 2 + 2?", "What is 3 + 3?"])
    test = _problems(tmp_path / "test.jsonl", ["What is 5 + 5?", "what is 3 +  3?", "WHAT IS 1 + 1?"])
    code = main(["pipeline", "--config", "tiny", "task.name=file", f"task.options={{train: {train}}}",
                 f"eval.sets=[{test}]", "--run-dir", str(tmp_path / "r")])
    assert code == 2
    message = capsys.readouterr().err.splitlines()[0]
    assert message.startswith(f"opsdlab pipeline: error: 2 problem(s) are both in the training problems ({train}) "
                              f"and in evaluation set {test} by text (ids ")
    assert message.endswith("training, check and evaluation problems must differ: remove them from one of the "
                            "files, or evaluate on other sets")
    assert not (tmp_path / "r").exists()
