"""A run directory never mixes settings: through the real CLI, a rerun skips what its settings
made, refuses (changing nothing) when a finished output was made with other settings, and redoes
exactly what `--redo` names and what reads it."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from opsdlab.cli import main
from opsdlab.config import load_config
from opsdlab.run.outputs import run_outputs
from opsdlab.run.rundir import check_run_dir
from opsdlab.run.provenance import differences, make_record

SMALL_RUN = {
    "sft": {"rows": 32, "max_steps": 2, "batch_size": 8, "save_steps": 100, "logging_steps": 1},
    "rlvr": {"max_steps": 1, "prompts_per_step": 2, "group_size": 2, "max_completion_length": 12,
             "train_problems": 8, "save_steps": 100, "logging_steps": 1},
    "opsd": {"max_steps": 1, "prompts_per_step": 2, "rollouts_per_prompt": 2, "max_completion_length": 12,
             "train_problems": 8, "save_steps": 100, "logging_steps": 1, "learning_rate": 1e-3},
    "arms": [{"name": "all", "gate": "all"}],
    "eval": {"problems": 3, "sampling": {"k": 2, "max_new_tokens": 12}, "greedy": False, "teacher_check": False},
}


def _digests(run_dir: Path, skip=("summary.jsonl",)) -> dict:
    """Every file's hash (the run log, which a rerun appends to, and the report left out)."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name not in skip and "report" not in p.parts}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished small run: its config file and run directory (copied per test)."""
    root = tmp_path_factory.mktemp("finished")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(SMALL_RUN))
    assert main(["pipeline", "--config", str(config), "--run-dir", str(root / "run")]) == 0
    return config, root / "run"


@pytest.fixture
def run(finished, tmp_path):
    config, run_dir = finished
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return config, copy


def test_every_output_carries_the_record_of_its_settings(finished):
    config, run_dir = finished
    for folder in ("base", "sft", "rlvr", "opsd/all-s0", "eval/sft/synthetic", "eval/opsd-all-s0/synthetic"):
        record = json.loads((run_dir / folder / "settings.json").read_text())
        assert record["fingerprint"]
    opsd = json.loads((run_dir / "opsd" / "all-s0" / "settings.json").read_text())
    assert opsd["settings"]["opsd.learning_rate"] == 1e-3 and opsd["settings"]["opsd.gate"] == "all"
    stamp = (run_dir / "rlvr" / "model" / "COMPLETE").read_text()
    assert len(stamp) == 32 and opsd["inputs"]["model"] == stamp, "the arm records the RLVR model it read"
    evaluation = json.loads((run_dir / "eval" / "opsd-all-s0" / "synthetic" / "settings.json").read_text())
    assert evaluation["inputs"]["model"] == (run_dir / "opsd" / "all-s0" / "model" / "COMPLETE").read_text()


def test_a_rerun_with_the_same_settings_skips_everything_and_says_so(run, capsys):
    config, run_dir = run
    before = _digests(run_dir, skip=("summary.jsonl", "config.yaml"))  # config.yaml names the copy's run_dir
    assert main(["pipeline", "--config", str(config), "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "[sft] skipped" in out and "[rlvr] skipped" in out and "[opsd all s0] skipped" in out
    assert "[eval] opsd-all-s0: skipped" in out
    assert _digests(run_dir, skip=("summary.jsonl", "config.yaml")) == before


def test_a_changed_setting_is_refused_naming_the_key_and_nothing_changes(run, capsys):
    config, run_dir = run
    before = _digests(run_dir)
    code = main(["pipeline", "--config", str(config), "--run-dir", str(run_dir), "opsd.learning_rate=0.05"])
    err = capsys.readouterr().err
    assert code == 2
    assert "opsd.learning_rate: 0.001 -> 0.05" in err
    assert "train opsd-all-s0" in err and "--redo changed" in err and "--run-dir" in err
    assert "train rlvr" not in err.split("opsd.learning_rate")[1].split("\n")[0]
    assert _digests(run_dir) == before, "a refused rerun changed the run directory (config.yaml included)"


def test_redo_changed_retrains_the_arm_and_its_evaluation_only(run, capsys):
    config, run_dir = run
    before = _digests(run_dir)
    code = main(["pipeline", "--config", str(config), "--run-dir", str(run_dir), "--redo", "changed",
                 "opsd.learning_rate=0.05"])
    assert code == 0
    after = _digests(run_dir)
    changed = {path for path in after if before.get(path) != after[path]} - {"config.yaml"}
    assert {"opsd/all-s0/model/model.safetensors", "opsd/all-s0/settings.json"} <= changed
    assert "eval/opsd-all-s0/synthetic/samples.jsonl" in changed
    assert not any(path.startswith(("sft/", "rlvr/", "base/", "eval/sft/", "eval/rlvr/")) for path in changed), changed
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["opsd"]["learning_rate"] == 0.05
    record = json.loads((run_dir / "opsd" / "all-s0" / "settings.json").read_text())
    assert record["settings"]["opsd.learning_rate"] == 0.05
    log = [json.loads(line) for line in (run_dir / "summary.jsonl").read_text().splitlines()]
    assert any(line.get("kind") == "redo" and "opsd/all-s0" in line["message"] for line in log)
    # and now the folder agrees with its config: a plain rerun skips everything
    assert main(["pipeline", "--config", str(config), "--run-dir", str(run_dir), "opsd.learning_rate=0.05"]) == 0


def test_redo_a_stage_remakes_it_and_everything_that_reads_it(run):
    config, run_dir = run
    outputs = run_outputs(load_config(config, [f"run_dir={run_dir}"]))
    for output in outputs:
        (output.folder / "marker").write_text("")
    check_run_dir(load_config(config, [f"run_dir={run_dir}"]), redo=["rlvr"])
    kept = {str(o.folder.relative_to(run_dir)) for o in outputs if (o.folder / "marker").exists()}
    assert kept == {"base", "eval/base/synthetic", "sft", "eval/sft/synthetic"}


def test_an_evaluation_setting_invalidates_only_evaluations(run, capsys):
    config, run_dir = run
    code = main(["pipeline", "--config", str(config), "--run-dir", str(run_dir), "eval.sampling.max_new_tokens=10"])
    err = capsys.readouterr().err
    assert code == 2
    assert "eval.sampling.max_new_tokens: 12 -> 10" in err
    assert "train " not in err


def test_a_partly_trained_stage_started_with_other_settings_is_refused(run):
    config, run_dir = run
    shutil.rmtree(run_dir / "opsd" / "all-s0" / "model")
    assert (run_dir / "opsd" / "all-s0" / "checkpoints" / "checkpoint-1").is_dir()  # as a killed run leaves it
    with pytest.raises(ValueError, match="opsd.max_steps: 1 -> 5"):
        check_run_dir(load_config(config, [f"run_dir={run_dir}", "opsd.max_steps=5"]))


def test_outputs_made_before_records_are_judged_by_the_previous_config(run, capsys):
    config, run_dir = run
    for record in run_dir.rglob("settings.json"):
        record.unlink()
    assert main(["pipeline", "--config", str(config), "--run-dir", str(run_dir), "opsd.learning_rate=0.05"]) == 2
    assert "opsd.learning_rate: 0.001 -> 0.05" in capsys.readouterr().err
    assert main(["pipeline", "--config", str(config), "--run-dir", str(run_dir)]) == 0
    assert "recorded the settings of" in capsys.readouterr().out
    assert (run_dir / "opsd" / "all-s0" / "settings.json").exists()


def test_an_unknown_redo_target_names_the_valid_ones(run, capsys):
    config, run_dir = run
    assert main(["pipeline", "--config", str(config), "--run-dir", str(run_dir), "--redo", "opsd-wrong-s0"]) == 2
    assert "valid: changed, base, sft, rlvr, opsd, eval, opsd-all-s0" in capsys.readouterr().err


def test_differences_name_settings_inputs_and_code_version():
    old = make_record("opsd", {"opsd.gate": "correct", "opsd.beta": 1.0}, {"model": "a"})
    new = make_record("opsd", {"opsd.gate": "all", "seed": 1}, {"model": "b"})
    assert differences(old, new) == ['opsd.beta: 1.0 -> <unset>', 'opsd.gate: "correct" -> "all"',
                                     'seed: <unset> -> 1', "its input model changed"]
    assert differences(old, old) == []
    assert differences(None, new) == ["(no record of the settings that made it)"]


def test_report_on_a_folder_that_is_not_a_run_creates_nothing(tmp_path, capsys):
    target = tmp_path / "not-a-run"
    assert main(["report", str(target)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert not target.exists()
    target.mkdir()
    assert main(["report", str(target)]) == 2
    assert list(target.iterdir()) == []


def test_outputs_the_config_no_longer_makes_are_kept_and_named(run, capsys):
    config, run_dir = run
    assert main(["pipeline", "--config", str(config), "--run-dir", str(run_dir), "stages=[sft,rlvr]"]) == 0
    out = capsys.readouterr().out
    assert "kept 2 output(s) that this config does not make (eval/opsd-all-s0/synthetic, opsd/all-s0)" in out


def test_a_data_file_is_fingerprinted_by_its_content(tmp_path):
    from opsdlab.run.provenance import path_fingerprint

    data = tmp_path / "train.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n')
    first = path_fingerprint(data)
    data.write_text('{"problem": "1+1", "answer": "2"}\n')  # rewritten, same content: a new mtime only
    assert path_fingerprint(data) == first
    data.write_text('{"problem": "1+2", "answer": "3"}\n')
    assert path_fingerprint(data) != first
    assert path_fingerprint(tmp_path) != path_fingerprint(tmp_path / "missing-hub-name")


def test_an_option_added_since_is_no_difference_at_its_default(run, capsys):
    """A record written before an option existed lacks its key: equal while the option holds its
    default (the behaviour before it existed), a difference once it is set otherwise."""
    config, run_dir = run
    path = run_dir / "opsd" / "all-s0" / "settings.json"
    record = json.loads(path.read_text())
    assert "opsd.chunk_size" in record["at_default"]
    del record["settings"]["opsd.chunk_size"]
    record["at_default"].remove("opsd.chunk_size")
    record["fingerprint"] = "written-by-older-code"
    path.write_text(json.dumps(record))
    assert main(["pipeline", "--config", str(config), "--run-dir", str(run_dir)]) == 0
    capsys.readouterr()
    assert main(["pipeline", "--config", str(config), "--run-dir", str(run_dir), "opsd.chunk_size=7"]) == 2
    assert "opsd.chunk_size: <unset> -> 7" in capsys.readouterr().err


def test_a_stage_remade_with_the_same_settings_invalidates_what_read_it(run, capsys):
    """Each finished stage stamps its model; what read the model records the stamp. A stage remade
    behind the run's back (here: a new stamp) leaves its readers stale, not silently kept."""
    config, run_dir = run
    (run_dir / "rlvr" / "model" / "COMPLETE").write_text("0" * 32)
    assert main(["pipeline", "--config", str(config), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "train opsd-all-s0" in err and "eval rlvr" in err and "eval opsd-all-s0" in err
    assert "train sft" not in err
