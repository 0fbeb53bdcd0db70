"""A run's missing pieces (model folder, data files, optional extras) are named all at once,
before any model loads."""

import pytest

from opsdlab import preflight
from opsdlab.cli import main
from opsdlab.config import ConfigError, load_config
from opsdlab.preflight import check_inputs


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if the pipeline loads or builds a model."""
    import opsdlab.pipeline as pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    for name in ("load_policy", "build_tiny_model", "load_for_eval"):
        monkeypatch.setattr(pipeline, name, refuse)


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
