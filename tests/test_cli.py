"""The command line: help for every subcommand, eval on a real benchmark file, clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from opsdlab.cli import build_parser, main

BENCHMARKS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks"


@pytest.mark.parametrize("command", ["demo", "pipeline", "report", "eval", "sft", "rlvr", "opsd"])
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


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "opsdlab.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "opsdlab" in result.stdout
