"""Rerunning a stage command on its own output folder: a finished stage trains nothing more, a
longer max_steps continues it, and a stage that trained nothing says so and fails."""

import json

import pytest
import torch
from safetensors.torch import load_file

from opsdlab.cli import main

SMALL = ["prompts_per_step=2", "max_completion_length=8", "save_steps=100", "logging_steps=1"]
STAGES = {
    "opsd": ["--gate", "all", "--teacher-check", "0", "rollouts_per_prompt=2", *SMALL],
    "rlvr": ["group_size=2", *SMALL],
}


def weights(folder) -> dict:
    return load_file(str(folder / "model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def steps(out) -> list[int]:
    return sorted({json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()})


def checkpoints(out) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))


@pytest.mark.parametrize("stage", ["opsd", "rlvr"])
def test_a_finished_stage_run_again_ends_at_its_max_steps(tmp_path, tiny_folder, stage, capsys):
    out = tmp_path / stage
    command = [stage, "--model", str(tiny_folder), "--out", str(out), *STAGES[stage], "max_steps=2"]
    assert main(command) == 0
    first = weights(out / "model")
    assert main(command) == 0
    assert checkpoints(out) == ["checkpoint-2"] and steps(out)[-1] == 2
    assert same(weights(out / "model"), first)
    assert "checkpoint-2 is the last step (2 of 2): nothing to train" in capsys.readouterr().out


def test_a_finished_stage_with_checks_run_again_selects_as_before(tmp_path, tiny_folder, task, monkeypatch):
    from opsdlab.stages.checks import HeldOutCheck
    from opsdlab.modeling.models import load_policy
    from opsdlab.stages.opsd import OPSDStageConfig, run_opsd

    from opsd_helpers import EXACT

    script = {0: (0.5, 100), 1: (0.5, 40), 2: (0.5, 60)}
    monkeypatch.setattr(HeldOutCheck, "measure", lambda self, model, tokenizer, step: {
        "avg_at_k": script[step][0], "avg_at_k_ci": [0.45, 0.55], "mean_response_tokens": script[step][1],
        "truncation_rate": 0.0})
    config = OPSDStageConfig(gate="all", max_steps=2, prompts_per_step=2, rollouts_per_prompt=2, max_completion_length=8,
                             learning_rate=1e-2, save_steps=100, logging_steps=1, check_every=1,
                             select="shortest_within_tolerance")
    stage = tmp_path / "opsd"
    runs = []
    for _ in range(2):
        model, tokenizer = load_policy(tiny_folder)
        out = run_opsd(model, tokenizer, task.examples("train", 8), EXACT, config, stage, thinking=True,
                       check_examples=task.examples("test", 4))
        runs.append(((stage / "metrics.jsonl").read_text(), (stage / "checks.jsonl").read_text(),
                     (stage / "selection.json").read_text(), weights(out)))
    assert runs[0][:3] == runs[1][:3] and same(runs[0][3], runs[1][3])
    assert json.loads(runs[1][2])["checkpoint"] == "checkpoints/checkpoint-1"
    assert same(runs[1][3], weights(stage / "checkpoints" / "checkpoint-1"))


def test_a_longer_max_steps_continues_a_finished_stage_and_a_shorter_one_is_refused(tmp_path, tiny_folder, capsys):
    out = tmp_path / "opsd"
    command = ["opsd", "--model", str(tiny_folder), "--out", str(out), *STAGES["opsd"]]
    assert main([*command, "max_steps=2"]) == 0
    assert main([*command, "max_steps=3"]) == 0
    assert "resumed from checkpoint-2 (step 2 of 3)" in capsys.readouterr().out
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-3"] and steps(out)[-1] == 3
    assert main([*command, "max_steps=1"]) == 2
    assert "holds checkpoint-3, past max_steps 1" in capsys.readouterr().err
