"""The command line: help for every subcommand, eval on a real benchmark file, clear errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opsdlab.cli import build_parser, main

BENCHMARKS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks"


@pytest.mark.parametrize("command", ["demo", "pipeline", "report", "eval", "sft", "rlvr", "opsd", "config"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: opsdlab" in capsys.readouterr().out


@pytest.mark.skipif(not (BENCHMARKS / "aime24.jsonl").exists(), reason="benchmark files not present")
def test_eval_runs_on_aime24_with_the_tiny_model(tmp_path, tiny_folder):
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(tiny_folder), "--data", str(BENCHMARKS / "aime24.jsonl"), "--k", "2",
                 "--max-new-tokens", "8", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_problems"] == 30 and summary["samples_per_problem"] == 2
    assert summary["verifier"]["compare"] == "math_verify"
    assert summary["truncation_rate"] > 0.5  # a random model rarely stops within 8 tokens
    assert summary["mean_response_tokens"] <= 8
    assert len((out / "samples.jsonl").read_text().splitlines()) == 60


def test_bad_data_file_is_a_clear_error(tmp_path, tiny_folder, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 1, "question": "What is 1 + 1?", "answer": "2"}) + "\n")
    code = main(["eval", "--model", str(tiny_folder), "--data", str(bad), "--max-new-tokens", "4"])
    err = capsys.readouterr().err
    assert code == 2
    assert "bad.jsonl" in err and "problem" in err and "line 1" in err


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "none"), "--data", "synthetic"]) == 2
    assert "does not exist" in capsys.readouterr().err


GATE_CHOICES = "['all', 'correct', 'correct_or_truncated', 'incorrect', 'split']"


@pytest.mark.parametrize("argv, message", [
    (["opsd", "--gate", "bogus"], f"opsdlab opsd: error: gate must be one of {GATE_CHOICES}, got 'bogus'"),
    (["opsd", "--set", "gate=bogus"], f"opsdlab opsd: error: gate must be one of {GATE_CHOICES}, got 'bogus'"),
    (["opsd", "--set", "max_steps=1.5"], "opsdlab opsd: error: opsd.max_steps: expected an integer, got 1.5 (float)"),
    (["rlvr", "--set", "max_steps=abc"], "opsdlab rlvr: error: rlvr.max_steps: expected an integer, got 'abc' (str)"),
    (["sft", "--set", "learning_rate=abc"],
     "opsdlab sft: error: sft.learning_rate: expected a number, got 'abc' (str)"),
    (["rlvr", "--set", "group_size=1"], "opsdlab rlvr: error: group_size must be >= 2 (group-centred advantages), got 1"),
    (["opsd", "opsd.max_steps=1.5"], "opsdlab opsd: error: opsd.max_steps: expected an integer, got 1.5 (float)"),
    (["opsd", "bogus_key=1"], "opsdlab opsd: error: bogus_key: unknown opsd option; valid: "),
    (["sft", "--set", "probe_every=50"], "opsdlab sft: error: sft.probe_every: the SFT teacher probe runs in "
     "`opsdlab pipeline` (it grades held-out problems from the OPSD teacher's prompt); set sft.probe_every in a "
     "pipeline config"),
])
def test_stage_option_errors_are_exact_and_name_the_option(tmp_path, capsys, argv, message):
    """Checked before any model is loaded; the stage's label is not repeated after the command's."""
    command, *options = argv
    code = main([command, "--model", str(tmp_path / "X"), "--out", str(tmp_path / "Y"), *options])
    assert code == 2
    assert capsys.readouterr().err.splitlines()[0].startswith(message)


def test_pipeline_override_of_the_wrong_type_is_exact(capsys):
    assert main(["pipeline", "--config", "tiny", "sft.learning_rate=abc"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "opsdlab pipeline: error: sft.learning_rate: expected a number, got 'abc' (str)")


def test_stage_options_take_yaml_numbers_without_a_dot(tmp_path):
    from opsdlab.cli import _overrides
    from opsdlab.config.stages import OPSDStageConfig

    config = _overrides(OPSDStageConfig, ["learning_rate=1e-6", "clip_tau=null"], {"gate": "all"})
    assert config.learning_rate == 1e-6 and config.clip_tau is None and config.gate == "all"


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "opsdlab.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "opsdlab" in result.stdout


def test_stage_commands_chain_through_model_folders(tmp_path, capsys):
    """sft (building the tiny model) -> rlvr -> opsd from the command line, each a 1-2 step run."""
    sft, rlvr, opsd = tmp_path / "sft", tmp_path / "rlvr", tmp_path / "opsd"
    assert main(["sft", "--model", "tiny", "--out", str(sft), "sft.max_steps=2", "rows=16", "--set", "batch_size=4"]) == 0
    steps = [json.loads(line)["step"] for line in (sft / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2, "the positional sft.max_steps=2 did not reach the stage"
    small = ["--set", "max_steps=1", "--set", "prompts_per_step=2", "--set", "max_completion_length=8"]
    assert main(["rlvr", "--model", str(sft / "model"), "--out", str(rlvr), "--set", "group_size=2", *small]) == 0
    assert main(["opsd", "--model", str(rlvr / "model"), "--out", str(opsd), "--gate", "all", "--teacher-check", "2",
                 "--set", "rollouts_per_prompt=2", *small]) == 0
    captured = capsys.readouterr()
    assert "teacher prompt (solution)" in captured.out
    assert "WARNING" in captured.err  # an untrained model's teacher prompt is no better than its student prompt
    assert (opsd / "model" / "model.safetensors").exists()
    # Each stage in the pipeline's words, under the pipeline's labels (an OPSD run: its gate and seed).
    lines = captured.out.splitlines()
    for label, folder in (("sft", sft), ("rlvr", rlvr), ("opsd all s0", opsd)):
        assert f"[{label}] started" in lines
        assert any(line.startswith(f"[{label}] done: wrote {folder / 'model'} in ") for line in lines), label
    assert re.search(r"opsd all s0: 100%.*1/1", captured.err)  # its bar, under the same label


def test_stage_commands_load_the_weights_in_the_dtype_asked(tmp_path, tiny_folder):
    """`--dtype bfloat16`: the stage trains and saves bfloat16 weights (on CPU without mixed precision)."""
    from safetensors import safe_open

    from opsdlab import cli
    from opsdlab.modeling import models

    assert cli.WEIGHT_DTYPES == models.DTYPES
    out = tmp_path / "opsd"
    assert main(["opsd", "--model", str(tiny_folder), "--out", str(out), "--dtype", "bfloat16", "--gate", "all",
                 "--teacher-check", "0", "--set", "max_steps=1", "--set", "prompts_per_step=2",
                 "--set", "rollouts_per_prompt=2", "--set", "max_completion_length=8"]) == 0
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}


def test_eval_loads_the_weights_in_the_dtype_asked(tmp_path, tiny_folder, loaded_dtypes):
    from opsdlab.evaluation import evaluate

    loaded = loaded_dtypes(evaluate)
    assert main(["eval", "--model", str(tiny_folder), "--out", str(tmp_path), "--dtype", "bfloat16", "--problems", "2",
                 "--k", "1", "--max-new-tokens", "4"]) == 0
    assert loaded == [torch.bfloat16]
    assert json.loads((tmp_path / "summary.json").read_text())["dtype"] == "bfloat16"


def test_unknown_stage_option_is_a_clear_error(tmp_path, tiny_folder, capsys):
    assert main(["opsd", "--model", str(tiny_folder), "--out", str(tmp_path), "--set", "gaet=all"]) == 2
    assert "gaet" in capsys.readouterr().err


def test_a_launch_that_does_not_match_the_batch_split_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """The batch was split for 2 processes (say WORLD_SIZE was left set) but the Trainer runs on one."""
    monkeypatch.setattr("opsdlab.stages.sft.launch_processes", lambda: 2)
    code = main(["sft", "--model", "tiny", "--out", str(tmp_path / "sft"), "--set", "rows=8",
                 "--set", "max_steps=1", "--set", "batch_size=4"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("opsdlab sft: error: the batch was split for 2 process(es) (launch environment), but the "
                          "trainer runs on 1")


def test_an_input_error_is_one_line_and_a_library_value_error_says_how_to_see_its_traceback(capsys, monkeypatch):
    """opsdlab's own input errors (a bad config value) are one line on stderr; a plain ValueError, which
    may be a bug, adds how to get its traceback."""
    assert main(["pipeline", "--config", "tiny", "opsd.max_steps=abc"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("opsdlab pipeline: error: opsd.max_steps")

    from opsdlab import cli

    def fails(args):
        raise ValueError("a value no check of ours caught")

    monkeypatch.setattr(cli, "cmd_report", fails)
    assert main(["report", "somewhere"]) == 2
    assert capsys.readouterr().err.splitlines() == ["opsdlab report: error: a value no check of ours caught",
                                                    "(set OPSDLAB_DEBUG=1 for the full traceback)"]


def _captured_training(monkeypatch, method: str) -> list:
    """Replace how `method` trains with a recorder of the settings it was handed; no training runs."""
    from opsdlab.stages import methods

    seen = []

    def record(model, tokenizer, examples, verifier, arm, stage_dir, **kwargs):
        seen.append((arm, kwargs["rlvr"]))
        from opsdlab.modeling.models import save_policy

        return save_policy(model, tokenizer, Path(stage_dir) / "model")

    monkeypatch.setitem(methods.TRAINING, method, record)
    return seen


@pytest.mark.parametrize("given, expected, said", [
    # the method's defaults, as a pipeline arm gets them
    ([], {"teacher_context": "concise", "divergence": "reverse_kl", "gate": "all", "teacher_weights": "periodic"},
     "opsd: method crisp sets teacher_context=concise, divergence=reverse_kl, gate=all, teacher_weights=periodic"),
    # the command's own options win, and are not reported as the method's
    (["teacher_context=solution", "--gate=correct"], {"teacher_context": "solution", "gate": "correct",
                                                         "divergence": "reverse_kl"},
     "opsd: method crisp sets divergence=reverse_kl, teacher_weights=periodic (options given here win)"),
])
def test_the_opsd_stage_command_applies_its_methods_defaults(tmp_path, tiny_folder, monkeypatch, capsys, given,
                                                             expected, said):
    seen = _captured_training(monkeypatch, "crisp")
    assert main(["opsd", "--model", str(tiny_folder), "--out", str(tmp_path / "opsd"), "--teacher-check", "0",
                 *given, "method=crisp", "max_steps=1"]) == 0
    arm = seen[0][0]
    assert {key: getattr(arm, key) for key in expected} == expected
    assert said in capsys.readouterr().out


def test_the_opsd_stage_command_checks_and_dispatches_each_method(tmp_path, tiny_folder, monkeypatch, capsys):
    seen = _captured_training(monkeypatch, "length_rl")
    assert main(["opsd", "--model", str(tiny_folder), "--out", str(tmp_path / "dler"), "--teacher-check", "0",
                 "method=length_rl", "max_steps=1"]) == 0
    assert seen and seen[0][0].method == "length_rl"
    assert "length_rl is RLVR with a length-aware reward" in capsys.readouterr().out
    # what the method needs of the settings is checked before anything loads, as for an arm
    assert main(["opsd", "--model", str(tiny_folder), "--out", str(tmp_path / "x"), "method=length_rl",
                 "rollouts_per_prompt=1"]) == 2
    assert "length_rl is group-relative RL; it needs rollouts_per_prompt >= 2" in capsys.readouterr().err
    assert main(["opsd", "--model", str(tiny_folder), "--out", str(tmp_path / "y"), "method=budget"]) == 2
    assert "method budget trains nothing" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
