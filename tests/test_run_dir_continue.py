"""A run folder and the user's changes that keep its work: data known by its content, not its path;
a longer stage continued from its last checkpoint where its learning rate does not depend on max_steps."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from opsdlab.cli import main
from opsdlab.config import load_config
from opsdlab.run.rundir import check_run_dir
from test_run_dir import SMALL_RUN


def _rows(count: int, start: int = 0) -> str:
    return "".join(json.dumps({"id": i, "problem": f"What is {i} + {i}?", "solution": f"{i} + {i} = {2 * i}",
                               "answer": str(2 * i)}) + "\n" for i in range(start, start + count))


def _file_run(tmp_path, tiny_folder, data) -> dict:
    return {
        "model": {"init": str(tiny_folder)},
        "task": {"name": "file", "options": {"train": str(data / "train.jsonl")}},
        "stages": ["opsd"],
        "opsd": {"max_steps": 1, "prompts_per_step": 2, "rollouts_per_prompt": 2, "max_completion_length": 8,
                 "train_problems": 8, "save_steps": 100, "logging_steps": 1, "check_every": 1, "check_problems": 2,
                 "check_k": 1},
        "arms": [{"name": "all", "gate": "all"}],
        "eval": {"sets": [str(data / "test.jsonl")], "problems": 2, "sampling": {"k": 1, "max_new_tokens": 8},
                 "greedy": False, "teacher_check": False, "base": False},
    }


def test_the_same_data_under_another_path_is_no_difference(tmp_path, tiny_folder, capsys):
    first, moved = tmp_path / "data", tmp_path / "elsewhere" / "data"
    first.mkdir()
    (first / "train.jsonl").write_text(_rows(8))
    (first / "test.jsonl").write_text(_rows(6, start=100))
    run_dir = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_file_run(tmp_path, tiny_folder, first)))
    assert main(["pipeline", "--config", str(config), "--run-dir", str(run_dir)]) == 0

    shutil.copytree(first, moved)
    shutil.rmtree(first)
    config.write_text(yaml.safe_dump(_file_run(tmp_path, tiny_folder, moved)))
    capsys.readouterr()
    assert main(["pipeline", "--config", str(config), "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "[opsd all s0] skipped" in out and "[eval] opsd-all-s0: skipped" in out

    (moved / "train.jsonl").write_text(_rows(8, start=1))
    assert main(["pipeline", "--config", str(config), "--run-dir", str(run_dir)]) == 2
    assert "train opsd-all-s0" in capsys.readouterr().err  # the content changed: refused
    (moved / "train.jsonl").write_text(_rows(8))
    (moved / "test.jsonl").write_text(_rows(6, start=200))
    assert main(["pipeline", "--config", str(config), "--run-dir", str(run_dir)]) == 2
    assert "train opsd-all-s0" in capsys.readouterr().err


def test_a_record_written_before_content_inputs_is_judged_by_the_path_it_names():
    from opsdlab.run.provenance import differences, make_record

    old = make_record("opsd", {"eval.sets": ["a.jsonl"]}, {"model": "m"})
    new = make_record("opsd", {"eval.sets": ["a.jsonl"]}, {"model": "m", "eval_sets": ["f1"]})
    moved = make_record("opsd", {"eval.sets": ["b.jsonl"]}, {"model": "m", "eval_sets": ["f1"]})
    assert differences(old, new) == []
    assert differences(old, moved) == ['eval.sets: ["a.jsonl"] -> ["b.jsonl"]', "its input eval_sets changed"]
    assert differences(new, moved) == []
    assert differences(new, make_record("opsd", {"eval.sets": ["a.jsonl"]}, {"model": "m", "eval_sets": ["f2"]})) == [
        "its input eval_sets changed"]




@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(SMALL_RUN))
    assert main(["pipeline", "--config", str(config), "--run-dir", str(root / "run")]) == 0
    return config, root / "run"


def _copy(finished, tmp_path, name):
    config, run_dir = finished
    shutil.copytree(run_dir, tmp_path / name)
    return config, tmp_path / name


def test_a_larger_max_steps_says_whether_the_stage_continues(finished, capsys):
    config, run_dir = finished
    assert main(["pipeline", "--config", str(config), "--run-dir", str(run_dir), "opsd.max_steps=2"]) == 2
    assert ("opsd.max_steps: 1 -> 2 (--redo changed continues it from its last checkpoint: its constant learning "
            "rate does not depend on max_steps)") in capsys.readouterr().err
    assert main(["pipeline", "--config", str(config), "--run-dir", str(run_dir), "sft.max_steps=3"]) == 2
    assert ("sft.max_steps: 2 -> 3 (--redo changed retrains it from the start: its cosine learning rate decays over "
            "max_steps, so a longer run is not the shorter one continued)") in capsys.readouterr().err


def test_a_longer_arm_continues_from_its_last_checkpoint_to_the_weights_of_a_longer_run(finished, tmp_path):
    config, continued = _copy(finished, tmp_path, "continued")
    _, retrained = _copy(finished, tmp_path, "retrained")
    arm = continued / "opsd" / "all-s0"
    first_step = (arm / "metrics.jsonl").read_text().splitlines()[0]
    assert main(["pipeline", "--config", str(config), "--run-dir", str(continued), "--redo", "changed",
                 "opsd.max_steps=2"]) == 0
    log = [json.loads(line)["message"] for line in (continued / "summary.jsonl").read_text().splitlines()]
    assert "[redo] opsd/all-s0: train opsd-all-s0 continues from its last checkpoint (opsd.max_steps: 1 -> 2)" in log
    assert any(line.startswith("[redo] removed eval/opsd-all-s0/synthetic") for line in log)
    metrics = (arm / "metrics.jsonl").read_text().splitlines()
    assert metrics[0] == first_step and json.loads(metrics[-1])["step"] == 2  # step 1 was not trained again
    assert json.loads((arm / "settings.json").read_text())["settings"]["opsd.max_steps"] == 2

    assert main(["pipeline", "--config", str(config), "--run-dir", str(retrained), "--redo", "opsd",
                 "opsd.max_steps=2"]) == 0
    a = load_file(str(arm / "model" / "model.safetensors"))
    b = load_file(str(retrained / "opsd" / "all-s0" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the continued folder agrees with its config now
    assert main(["pipeline", "--config", str(config), "--run-dir", str(continued), "opsd.max_steps=2"]) == 0


def test_a_longer_stage_under_a_decaying_schedule_is_redone(finished, tmp_path):
    config, run_dir = _copy(finished, tmp_path, "run")
    lines = check_run_dir(load_config(config, [f"run_dir={run_dir}", "sft.max_steps=3"]), redo=["changed"])
    assert any(text.startswith("[redo] removed sft to redo train sft (sft.max_steps: 2 -> 3") for _, text in lines)
    assert not (run_dir / "sft").exists() and not (run_dir / "opsd" / "all-s0").exists()
