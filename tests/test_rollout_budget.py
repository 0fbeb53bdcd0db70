"""A rollout-token budget ends an RLVR or OPSD stage after the step at which its generated response tokens
reach it, counted over every generation round, kept through a resume; a periodic (CRISP) teacher
refreshes under it; the stage says what it spent.

Every rollout here is exactly `max_completion_length` tokens long: the end-of-sequence tokens are
suppressed at generation, so the tokens a step spends are rounds x rollouts x that length, by hand.
"""

import json

import pytest
import torch
from transformers import TrainerCallback

from opsd_helpers import ScriptedReward, make_trainer, snapshot
from opsdlab.cli import main
from opsdlab.modeling.runtime import JsonlMetrics, read_jsonl
from opsdlab.stages import opsd, rlvr
from opsdlab.stages.rollout_budget import ROLLOUT_TOKENS_FILE, read_stage_tokens

LENGTH = 8  # max_completion_length: every rollout's length
SMALL = ["prompts_per_step=2", f"max_completion_length={LENGTH}", "logging_steps=1", "max_steps=10"]
OPSD = ["opsd", "--gate", "all", "--teacher-check", "0", "rollouts_per_prompt=2", *SMALL]
RLVR = ["rlvr", "group_size=2", *SMALL]


@pytest.fixture
def full_length(monkeypatch, tiny_folder):
    """Every rollout runs to max_completion_length: the tiny model's end tokens are never sampled."""
    from opsdlab.modeling.models import load_policy

    model, tokenizer = load_policy(tiny_folder)
    ends = sorted({tokenizer.eos_token_id, tokenizer.pad_token_id, model.generation_config.eos_token_id})
    real = rlvr.grpo_args

    def grpo_args(*args, **kwargs):
        config = real(*args, **kwargs)
        config.generation_kwargs = {"suppress_tokens": ends}
        return config

    monkeypatch.setattr(rlvr, "grpo_args", grpo_args)
    monkeypatch.setattr(opsd, "grpo_args", grpo_args)


def checkpoints(out) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))


def test_an_opsd_stage_ends_at_the_step_that_reaches_its_budget(tmp_path, tiny_folder, full_length, capsys):
    """2 prompts x 2 rollouts x 8 tokens = 32 tokens a step: a budget of 70 is reached at step 3 (96)."""
    out = tmp_path / "opsd"
    assert main([*OPSD, "--model", str(tiny_folder), "--out", str(out), "save_steps=100",
                 "max_rollout_tokens=70"]) == 0
    assert read_stage_tokens(out) == {"rollout_tokens": 96, "steps": 3, "max_rollout_tokens": 70, "max_steps": 10,
                                      "ended": "budget"}
    assert checkpoints(out) == ["checkpoint-3"]  # the budget's step is saved, as a last step is
    assert json.loads((out / "checkpoints" / "checkpoint-3" / ROLLOUT_TOKENS_FILE).read_text()) == {
        "rollout_tokens": 96}
    assert json.loads((out / "updates.json").read_text())["steps"] == 3
    done = [line for line in capsys.readouterr().out.splitlines() if "done: wrote" in line]
    assert len(done) == 1 and done[0].endswith(
        "; ended at the rollout-token budget: 96 rollout tokens (budget 70) at step 3 of at most 10")


def test_an_rlvr_stage_counts_every_dynamic_sampling_round(tmp_path, tiny_folder, full_length, capsys):
    """No rollout of the random model is rewarded, so dynamic sampling drops every group and draws its
    2 rounds each step: 2 rounds x 4 rollouts x 8 tokens = 64 tokens a step, a budget of 100 reached at step 2."""
    out = tmp_path / "rlvr"
    assert main([*RLVR, "--model", str(tiny_folder), "--out", str(out), "save_steps=100", "dynamic_sampling=true",
                 "dynamic_sampling_max_rounds=2", "max_rollout_tokens=100"]) == 0
    rounds = [r["dynamic_sampling/rounds"] for r in read_jsonl(out / "metrics.jsonl") if "dynamic_sampling/rounds" in r]
    assert rounds == [2, 2]
    assert read_stage_tokens(out) == {"rollout_tokens": 128, "steps": 2, "max_rollout_tokens": 100, "max_steps": 10,
                                      "ended": "budget"}
    assert "ended at the rollout-token budget: 128 rollout tokens (budget 100) at step 2" in capsys.readouterr().out


def test_without_a_budget_a_stage_runs_its_max_steps_and_says_what_it_spent(tmp_path, tiny_folder, full_length,
                                                                              capsys):
    out = tmp_path / "opsd"
    assert main([*OPSD, "--model", str(tiny_folder), "--out", str(out), "save_steps=100", "max_steps=2"]) == 0
    assert read_stage_tokens(out) == {"rollout_tokens": 64, "steps": 2, "max_rollout_tokens": None, "max_steps": 2,
                                      "ended": "max_steps"}
    assert "rollout-token budget" not in capsys.readouterr().out


class _Killed(Exception):
    pass


def test_the_spent_tokens_survive_a_resume(tmp_path, tiny_folder, full_length, monkeypatch, capsys):
    """Killed after checkpoint-2 (64 tokens spent), the rerun resumes and ends at step 3 (96 >= 70), as the
    uninterrupted run does; counted from 0 again it would run to step 5. A third run trains nothing."""
    command = [*OPSD, "--model", str(tiny_folder), "save_steps=2", "max_rollout_tokens=70"]
    assert main([*command, "--out", str(tmp_path / "straight")]) == 0
    straight = read_stage_tokens(tmp_path / "straight")
    kill = [True]

    class KilledAfterSave(JsonlMetrics):
        def on_save(self, args, state, control, **kwargs):
            if kill[0]:
                raise _Killed

    monkeypatch.setattr(opsd, "JsonlMetrics", KilledAfterSave)
    out = tmp_path / "resumed"
    with pytest.raises(_Killed):
        main([*command, "--out", str(out)])
    assert checkpoints(out) == ["checkpoint-2"] and not (out / ROLLOUT_TOKENS_FILE).exists()
    kill[0] = False
    capsys.readouterr()
    assert main([*command, "--out", str(out)]) == 0
    assert "resumed from checkpoint-2" in capsys.readouterr().out
    assert read_stage_tokens(out) == straight == {"rollout_tokens": 96, "steps": 3, "max_rollout_tokens": 70,
                                                  "max_steps": 10, "ended": "budget"}
    assert main([*command, "--out", str(out)]) == 0
    assert ("checkpoint-3 has spent the rollout-token budget (96 of 70 tokens, step 3 of at most 10): nothing to train"
            in capsys.readouterr().out)
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-3"] and read_stage_tokens(out)["steps"] == 3


def test_opsd_refill_rounds_count_toward_the_budget(tmp_path, tiny_folder, task, full_length):
    """Each step's first round keeps nothing (the correct gate, no rollout correct) and is refilled once:
    2 rounds x 4 rollouts x 8 tokens = 64 tokens a step, a budget of 100 reached at step 2 (128)."""
    reward = ScriptedReward(lambda call, n: [call % 2 == 0] * n)
    trainer = make_trainer(tmp_path, tiny_folder, task, reward=reward, gate="correct", refill_max_rounds=2,
                           max_completion_length=LENGTH, max_steps=10, max_rollout_tokens=100)
    trainer.train()
    assert (trainer.state.global_step, trainer.rollout_tokens, trainer.skipped_steps) == (2, 128, 0)
    assert reward.calls == 4


def test_a_periodic_teacher_refreshes_under_the_budget(tmp_path, tiny_folder, task, full_length):
    """CRISP's teacher (periodic, every 2 steps) under a budget of 4 steps' tokens (4 x 32): trained to
    step 4, it refreshed twice, the last time from the student of step 4."""
    students = {}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            students[state.global_step] = snapshot(model)

    trainer = make_trainer(tmp_path, tiny_folder, task, teacher_weights="periodic", teacher_refresh_steps=2,
                           teacher_context="concise", max_completion_length=LENGTH, max_steps=40,
                           max_rollout_tokens=4 * 32, callbacks=[Record()])
    trainer.train()
    assert trainer.state.global_step == 4 and trainer.teacher.steps == 4
    assert trainer.teacher.steps // trainer.teacher.refresh_steps == 2
    teacher = snapshot(trainer.teacher.copy)
    assert all(torch.equal(teacher[name], students[4][name]) for name in teacher)


def test_the_budgets_step_is_the_stages_last_for_its_held_out_checks(tmp_path, tiny_folder, task, full_length,
                                                                    monkeypatch):
    """Checks every 5 steps, the budget reached at step 3: step 3 is checked and saved like a last step, and
    `select: last` hands on its weights (not those of the check at step 0)."""
    from safetensors.torch import load_file

    from opsd_helpers import EXACT
    from opsdlab.config.stages import OPSDStageConfig
    from opsdlab.modeling.models import load_policy
    from opsdlab.stages.checks import HeldOutCheck

    monkeypatch.setattr(HeldOutCheck, "measure", lambda self, model, tokenizer, step: {
        "avg_at_k": 0.5, "avg_at_k_ci": [0.4, 0.6], "mean_response_tokens": 8.0, "truncation_rate": 1.0})
    config = OPSDStageConfig(gate="all", max_steps=10, prompts_per_step=2, rollouts_per_prompt=2,
                             max_completion_length=LENGTH, learning_rate=1e-2, save_steps=100, logging_steps=1,
                             check_every=5, max_rollout_tokens=70)
    model, tokenizer = load_policy(tiny_folder)
    out = opsd.run_opsd(model, tokenizer, task.examples("train", 8), EXACT, config, tmp_path, thinking=True,
                        check_examples=task.examples("test", 4))
    assert [r["step"] for r in read_jsonl(tmp_path / "checks.jsonl")] == [0, 3]
    assert json.loads((tmp_path / "selection.json").read_text())["step"] == 3
    saved = load_file(str(tmp_path / "checkpoints" / "checkpoint-3" / "model.safetensors"))
    final = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(saved[name], final[name]) for name in saved)
