"""Held-out checks during RLVR/OPSD: stopping rules, selection rules, and a real trainer that stops,
selects, prunes its checkpoints and resumes."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from opsdlab.stages import checks
from opsdlab.config.stages import CheckSettings, OPSDStageConfig, RLVRStageConfig
from opsdlab.stages.checks import (SELECT_RULES, STOP_RULES, HeldOutCheck, best_aes, pick, shortest_within_tolerance,
                                   stop_reason, usable_records)
from opsdlab.modeling.models import load_policy
from opsdlab.stages.opsd import run_opsd
from opsdlab.stages.rlvr import run_rlvr

from opsd_helpers import EXACT

OPSD_SMALL = dict(max_steps=5, prompts_per_step=2, rollouts_per_prompt=2, max_completion_length=8, learning_rate=1e-2,
                  save_steps=100, logging_steps=1, gate="all", check_every=1)


def rec(step, acc, length, ci=None, truncated=0.0, looping=0.0):
    """A check record as `HeldOutCheck` writes it (CI: +-0.05 unless given)."""
    return {"step": step, "avg_at_k": acc, "avg_at_k_ci": list(ci or (acc - 0.05, acc + 0.05)),
            "mean_response_tokens": length, "truncation_rate": truncated, "repetition_rate": looping}


def first_stop(rule, records, **config):
    """The step of the first check at which `rule` stops, reading the checks up to it; None if never."""
    settings = CheckSettings(**config)
    for n in range(1, len(records) + 1):
        if STOP_RULES[rule](records[:n], settings) is not None:
            return records[n - 1]["step"]
    return None


# ---------------------------------------------------------------- stopping rules


def test_accuracy_drop_stops_at_the_first_drop_beyond_the_tolerance_that_the_ci_does_not_explain():
    records = [rec(0, 0.8, 100, (0.7, 0.9)),
               rec(5, 0.76, 90, (0.66, 0.78)),   # CI below the start, but 0.76 >= 0.8 - 0.05
               rec(10, 0.7, 80, (0.6, 0.85)),    # below 0.75, but the CI reaches above the start's 0.8
               rec(15, 0.72, 70, (0.62, 0.79)),  # below 0.75 and CI's upper end below 0.8: stop
               rec(20, 0.3, 60, (0.2, 0.4))]
    assert first_stop("accuracy_drop", records, stop_tolerance=0.05) == 15
    assert first_stop("accuracy_drop", records, stop_tolerance=0.1) == 20  # 0.72 >= 0.8 - 0.1
    assert first_stop("none", records) is None


def test_length_plateau_stops_when_three_checks_gain_no_more_than_one_percent():
    lengths = [100, 90, 80, 79.5, 79.4, 79.3, 50]
    records = [rec(step, 0.5, length) for step, length in zip(range(0, 70, 10), lengths)]
    # At step 50 the last three (79.5, 79.4, 79.3) are within 1% of the shortest before them (80 -> 79.2).
    assert first_stop("length_plateau", records) == 50
    # 79.2 is exactly 1% below 80: "not fallen by more than 1%" still stops.
    assert first_stop("length_plateau", [rec(s, 0.5, n) for s, n in enumerate([100, 80, 90, 85, 79.2])]) == 4
    assert first_stop("length_plateau", [rec(s, 0.5, n) for s, n in enumerate([100, 80, 90, 85, 79.1])]) is None


def test_length_inflation_stops_above_the_ratio_to_the_start():
    records = [rec(0, 0.5, 100), rec(1, 0.5, 120), rec(2, 0.5, 150), rec(3, 0.5, 151), rec(4, 0.5, 300)]
    assert first_stop("length_inflation", records) == 3  # 150 is 1.5x, not above it; 151 is
    assert first_stop("length_inflation", records, stop_length_ratio=2.0) == 4
    assert first_stop("length_inflation", records, stop_length_ratio=None) is None  # the sign turned off
    assert first_stop("length_inflation", [rec(0, 0.5, 0), rec(1, 0.5, 50)]) is None  # no ratio to a start of 0


def test_truncation_and_repetition_stop_at_an_absolute_rise_over_the_start():
    truncated = [rec(s, 0.5, 100, truncated=t) for s, t in enumerate([0.25, 0.375, 0.4375, 0.5, 0.0])]
    # Rises 0.125, 0.1875, 0.25: the first above 0.2 is step 3.
    assert first_stop("truncation", truncated) == 3
    assert first_stop("truncation", truncated, stop_truncation=0.1) == 1
    assert first_stop("truncation", truncated, stop_truncation=0.25) is None  # 0.25 is not above 0.25
    looping = [rec(s, 0.5, 100, looping=r) for s, r in enumerate([0.0, 0.125, 0.25, 0.0])]
    assert first_stop("repetition", looping) == 2 and first_stop("repetition", looping, stop_repetition=0.25) is None
    # A record without the field (a file from before it, a measure without it) shows no sign.
    assert first_stop("repetition", [rec(0, 0.5, 100), {**rec(1, 0.5, 100), "repetition_rate": None}]) is None


def test_stop_takes_a_list_and_the_collapse_shorthand_and_names_the_rule_that_fired():
    records = [rec(0, 0.8, 100, (0.7, 0.9)), rec(1, 0.8, 200, truncated=0.5)]
    settings = CheckSettings(check_every=1, stop=("repetition", "truncation", "length_inflation"))
    assert stop_reason(records, settings)[0] == "truncation"  # the first listed that fires
    assert stop_reason(records, CheckSettings(check_every=1, stop="collapse"))[0] == "length_inflation"
    assert stop_reason(records, CheckSettings(check_every=1, stop="accuracy_drop")) is None
    dropped = [rec(0, 0.8, 100, (0.7, 0.9)), rec(1, 0.5, 100, (0.4, 0.6))]
    assert stop_reason(dropped, CheckSettings(check_every=1, stop="collapse"))[0] == "accuracy_drop"
    # From a config: a YAML list, or a comma-separated override; a single name as before.
    from opsdlab.config import load_config

    config = load_config("tiny", ["opsd.check_every=2", "opsd.stop=truncation,repetition", "rlvr.check_every=1",
                                  "rlvr.stop=[accuracy_drop, length_inflation]"])
    assert config.opsd.stop == ("truncation", "repetition") and config.rlvr.stop == ("accuracy_drop",
                                                                                   "length_inflation")
    assert load_config("tiny", ["opsd.check_every=2", "opsd.stop=accuracy_drop"]).opsd.stop == "accuracy_drop"


# ---------------------------------------------------------------- selection rules


def test_no_rule_selects_a_check_at_or_after_the_first_collapse_sign():
    records = [rec(0, 0.5, 100), rec(1, 0.5, 90), rec(2, 0.6, 40, truncated=0.25), rec(3, 0.6, 30), rec(4, 0.6, 20)]
    usable, excluded = usable_records(records, CheckSettings())
    assert [r["step"] for r in usable] == [0, 1]
    # Step 3 shows no sign itself but comes after the collapse: excluded, with no sign of its own.
    assert [(e["step"], sorted(e["signs"])) for e in excluded] == [(2, ["truncation"]), (3, []), (4, [])]
    for rule in SELECT_RULES:  # each would pick a later, shorter or more accurate check
        assert pick(records, CheckSettings(select=rule))[0] == 1
    assert pick(records, CheckSettings(select="last", stop_truncation=None))[0] == 4  # the sign turned off
    inflated = [rec(0, 0.5, 100), rec(1, 0.5, 160), rec(2, 0.5, 90)]
    assert [e["step"] for e in usable_records(inflated, CheckSettings())[1]] == [1, 2]
    looping = [rec(0, 0.5, 100, looping=0.1), rec(1, 0.5, 90, looping=0.2), rec(2, 0.5, 80, looping=0.35)]
    assert [e["step"] for e in usable_records(looping, CheckSettings())[1]] == [2]
    # An accuracy drop beyond stop_tolerance that its CI does not explain is a sign too: `last` never
    # hands on the check an accuracy_drop stop fired at (0.40 < 0.80 - 0.05 and 0.45 < 0.80).
    dropped = [rec(0, 0.8, 100), rec(1, 0.78, 90), rec(2, 0.4, 80), rec(3, 0.79, 70)]
    assert [(e["step"], sorted(e["signs"])) for e in usable_records(dropped, CheckSettings())[1]] == [
        (2, ["accuracy_drop"]), (3, [])]
    assert pick(dropped, CheckSettings(select="last"))[0] == 1


def test_shortest_within_tolerance_picks_the_shortest_accurate_enough_check_earliest_on_ties():
    records = [rec(0, 0.8, 100), rec(1, 0.79, 90), rec(2, 0.785, 70), rec(3, 0.775, 60), rec(4, 0.79, 70)]
    choice = shortest_within_tolerance(records, CheckSettings(select_tolerance=0.02))
    assert records[choice.index]["step"] == 2  # step 3 is shorter but below 0.8 - 0.02; step 4 ties later
    assert [n["within_tolerance"] for n in choice.notes] == [True, True, True, False, True]
    wide = shortest_within_tolerance(records, CheckSettings(select_tolerance=0.03))
    assert records[wide.index]["step"] == 3
    # Nothing but the start within tolerance: the start.
    assert shortest_within_tolerance([rec(0, 0.8, 100), rec(1, 0.5, 10)], CheckSettings()).index == 0


def test_best_aes_picks_the_highest_score_against_the_start():
    # AES = dL + 3 dAcc (gain) or dL - 5 |dAcc| (loss), relative to the start (0.5, 100 tokens):
    # step 1: 0.2 + 0 = 0.2; step 2: 0.5 - 5 * 0.1 = 0.0; step 3: 0.1 + 3 * 0.1 = 0.4; step 4: ties step 3.
    records = [rec(0, 0.5, 100), rec(1, 0.5, 80), rec(2, 0.45, 50), rec(3, 0.55, 90), rec(4, 0.55, 90)]
    choice = best_aes(records, CheckSettings())
    assert records[choice.index]["step"] == 3
    assert [n["aes"] for n in choice.notes] == pytest.approx([0.0, 0.2, 0.0, 0.4, 0.4])
    # A start of accuracy 0: the most accurate check, then the shortest.
    zero = [rec(0, 0.0, 100), rec(1, 0.0, 50), rec(2, 0.25, 120), rec(3, 0.25, 110)]
    assert best_aes(zero, CheckSettings()).index == 3


def test_last_picks_the_last_check():
    assert SELECT_RULES["last"]([rec(0, 0.8, 100), rec(3, 0.1, 10), rec(6, 0.2, 50)], CheckSettings()).index == 2


@pytest.mark.parametrize("rule", sorted(SELECT_RULES))
def test_one_more_check_keeps_the_previous_pick_or_picks_the_new_check(rule):
    """What pruning relies on: a checkpoint that is not the pick now is never picked later, with the
    collapse exclusion (lengths up to 2x the start's, truncation and repetition rises) in play."""
    generator = random.Random(0)
    settings = CheckSettings(select=rule)
    excluded = 0
    for _ in range(300):
        records = [rec(s, generator.choice([0.0, 0.25, 0.5, 0.75]), generator.choice([40, 60, 80, 100, 160]),
                       truncated=generator.choice([0.0, 0.0, 0.0, 0.25]), looping=generator.choice([0.0] * 5 + [0.5]))
                   for s in range(8)]
        excluded += bool(usable_records(records, settings)[1])
        for n in range(1, len(records)):
            before = pick(records[:n], settings)[0]
            assert pick(records[:n + 1], settings)[0] in (before, n)
    assert 0 < excluded < 300  # both cases were exercised


@pytest.mark.parametrize("cls, stage", [(OPSDStageConfig, "opsd"), (RLVRStageConfig, "rlvr")])
@pytest.mark.parametrize("fields, message", [
    ({"stop": "early"}, "stop must be one of ['accuracy_drop', 'length_inflation', 'length_plateau', 'none', "
                        "'repetition', 'truncation'], a list of them or collapse, got 'early'"),
    ({"check_every": 2, "stop": ("truncation", "early")}, "got 'early'"),
    ({"check_every": 2, "stop": ()}, "stop names no rule"),
    ({"stop": ("none", "truncation")}, "stop: truncation reads held-out checks"),
    ({"check_every": 2, "select": "best"}, "select must be one of"),
    ({"select": "best_aes"}, "select: best_aes reads held-out checks; set check_every > 0"),
    ({"stop": "accuracy_drop"}, "stop: accuracy_drop reads held-out checks"),
    ({"check_every": -1}, "check_every must be >= 0"),
    ({"check_every": 2, "check_temperature": 0.0}, "check_temperature 0 is greedy"),
    ({"check_every": 2, "stop_tolerance": 5}, "stop_tolerance is an absolute accuracy, in [0, 1]"),
    ({"keep_checkpoints": -1}, "keep_checkpoints must be >= 0"),
])
def test_check_settings_are_validated_with_the_stage_key(cls, stage, fields, message):
    with pytest.raises(ValueError) as error:
        cls(**fields)
    assert str(error.value).startswith(f"{stage}: ") and message in str(error.value)


# ---------------------------------------------------------------- through the real trainer


def scripted(script: dict):
    """A `HeldOutCheck.measure` replacement returning `script[step]` = (avg@k, mean tokens[, CI])."""

    def measure(self, model, tokenizer, step):
        acc, length, *ci = script[step]
        return {"avg_at_k": acc, "avg_at_k_ci": list(ci[0]) if ci else [acc - 0.05, acc + 0.05],
                "mean_response_tokens": length, "truncation_rate": 0.0}

    return measure


def weights(folder) -> dict:
    return load_file(str(folder / "model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def opsd_run(folder, task, stage, **overrides):
    model, tokenizer = load_policy(folder)
    config = OPSDStageConfig(**{**OPSD_SMALL, **overrides})
    return run_opsd(model, tokenizer, task.examples("train", 8), EXACT, config, stage, thinking=True,
                    check_examples=task.examples("test", 4))


DROP = {0: (0.8, 100), 1: (0.8, 90), 2: (0.79, 70), 3: (0.5, 50, (0.4, 0.6)), 4: (0.5, 40), 5: (0.5, 30)}


def test_a_falling_accuracy_stops_the_stage_and_model_holds_the_selected_checkpoint(tmp_path, tiny_folder, task,
                                                                                    monkeypatch):
    monkeypatch.setattr(HeldOutCheck, "measure", scripted(DROP))
    stage = tmp_path / "opsd"
    out = opsd_run(tiny_folder, task, stage, stop="accuracy_drop", select="shortest_within_tolerance",
                   keep_checkpoints=0)

    assert [r["step"] for r in read_lines(stage / "checks.jsonl")] == [0, 1, 2, 3]
    assert json.loads((stage / "stop.json").read_text())["rule"] == "accuracy_drop"
    assert json.loads((stage / "stop.json").read_text())["step"] == 3
    assert max(r["step"] for r in read_lines(stage / "metrics.jsonl")) == 3  # no step after the stop
    selection = json.loads((stage / "selection.json").read_text())
    assert (selection["rule"], selection["step"], selection["checkpoint"]) == \
        ("shortest_within_tolerance", 2, "checkpoints/checkpoint-2")
    assert [c["step"] for c in selection["candidates"]] == [0, 1, 2, 3]
    # model/ is the selected step's weights, not the last step's, in the folder save_trained writes.
    checkpoints = stage / "checkpoints"
    assert same_weights(weights(out), weights(checkpoints / "checkpoint-2"))
    assert not same_weights(weights(out), weights(checkpoints / "checkpoint-3"))
    assert (out / "tokenizer_config.json").exists() and (out / "generation_config.json").exists()
    # keep_checkpoints 0: only the newest (resume) and the selected checkpoint are left.
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-3"]

    # A rerun of the stopped stage trains no further: same checks, same selection, same model.
    metrics = (stage / "metrics.jsonl").read_text()
    out = opsd_run(tiny_folder, task, stage, stop="accuracy_drop", select="shortest_within_tolerance",
                   keep_checkpoints=0)
    assert (stage / "metrics.jsonl").read_text() == metrics
    assert [r["step"] for r in read_lines(stage / "checks.jsonl")] == [0, 1, 2, 3]
    assert json.loads((stage / "selection.json").read_text()) == selection
    assert same_weights(weights(out), weights(checkpoints / "checkpoint-2"))


def test_the_start_can_be_selected_and_its_weights_are_kept(tmp_path, tiny_folder, task, monkeypatch):
    monkeypatch.setattr(HeldOutCheck, "measure", scripted({0: (0.8, 100), 1: (0.5, 50), 2: (0.5, 40)}))
    stage = tmp_path / "opsd"
    out = opsd_run(tiny_folder, task, stage, max_steps=2, select="shortest_within_tolerance", keep_checkpoints=0)
    assert json.loads((stage / "selection.json").read_text())["checkpoint"] == "checkpoints/start"
    start, _ = load_policy(tiny_folder)
    assert same_weights(weights(out), {k: v for k, v in start.state_dict().items() if k in weights(out)})
    assert sorted(p.name for p in (stage / "checkpoints").iterdir() if p.is_dir()) == ["checkpoint-2", "start"]


class Killed(Exception):
    pass


def test_a_run_killed_after_a_check_resumes_to_the_selection_of_an_uninterrupted_run(tmp_path, tiny_folder, task,
                                                                                     monkeypatch):
    script = {0: (0.8, 100), 1: (0.8, 90), 2: (0.78, 95), 3: (0.8, 80), 4: (0.79, 60), 5: (0.7, 50)}
    monkeypatch.setattr(HeldOutCheck, "measure", scripted(script))
    settings = dict(select="shortest_within_tolerance")
    whole = opsd_run(tiny_folder, task, tmp_path / "whole", **settings)

    # Killed once the check of step 3 is written, before step 3's checkpoint is saved.
    check = HeldOutCheck.check

    def killing_check(self, step, control):
        record = check(self, step, control)
        if step == 3:
            raise Killed
        return record

    stage = tmp_path / "killed"
    monkeypatch.setattr(HeldOutCheck, "check", killing_check)
    with pytest.raises(Killed):
        opsd_run(tiny_folder, task, stage, **settings)
    assert [r["step"] for r in read_lines(stage / "checks.jsonl")] == [0, 1, 2, 3]
    assert not (stage / "checkpoints" / "checkpoint-3").exists()
    monkeypatch.setattr(HeldOutCheck, "check", check)
    resumed = opsd_run(tiny_folder, task, stage, **settings)

    assert [r["step"] for r in read_lines(stage / "checks.jsonl")] == [0, 1, 2, 3, 4, 5]  # step 3 checked once
    selection = json.loads((stage / "selection.json").read_text())
    assert selection == json.loads((tmp_path / "whole" / "selection.json").read_text())
    assert selection["step"] == 4
    assert same_weights(weights(resumed), weights(stage / "checkpoints" / "checkpoint-4"))
    assert same_weights(weights(resumed), weights(whole))


def test_checks_evaluate_the_training_model_without_changing_what_it_trains(tmp_path, tiny_folder, task, monkeypatch):
    """OPSD with real checks: the unwrapped model in eval mode without gradients, each check a line with its
    seconds; training (and the saved model, with `select: last`) is that of a run without checks."""
    seen = []
    real = checks.evaluate_held_out

    def spy(model, *args, **kwargs):
        seen.append((model.training, torch.is_grad_enabled()))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(checks, "evaluate_held_out", spy)
    outs = {name: opsd_run(tiny_folder, task, tmp_path / name, max_steps=3, **extra)
            for name, extra in (("plain", dict(check_every=0)), ("checked", dict(check_every=2, check_problems=4)))}
    lines = read_lines(tmp_path / "checked" / "checks.jsonl")
    assert [r["step"] for r in lines] == [0, 2, 3]  # the start, every 2 steps, the last step
    assert all(r["problems"] == 4 and r["k"] == 2 and r["seconds"] > 0 and 0 <= r["avg_at_k"] <= 1 for r in lines)
    assert seen == [(False, False)] * 3
    start, _ = load_policy(tiny_folder)
    assert not same_weights(weights(outs["plain"]), {k: v for k, v in start.state_dict().items()
                                                      if k in weights(outs["plain"])})
    assert same_weights(weights(outs["plain"]), weights(outs["checked"]))
    assert json.loads((tmp_path / "checked" / "selection.json").read_text())["step"] == 3
    assert not (tmp_path / "plain" / "checks.jsonl").exists() and not (tmp_path / "plain" / "selection.json").exists()


def test_an_rlvr_stage_checks_and_selects(tmp_path, tiny_folder, task):
    model, tokenizer = load_policy(tiny_folder)
    config = RLVRStageConfig(max_steps=2, prompts_per_step=2, group_size=2, max_completion_length=8, save_steps=100,
                             check_every=1, check_problems=3, check_k=1, check_temperature=0.0, select="best_aes")
    out = run_rlvr(model, tokenizer, task.examples("train", 8), EXACT, config, tmp_path / "rlvr", thinking=True,
                   check_examples=task.examples("test", 6))
    lines = read_lines(tmp_path / "rlvr" / "checks.jsonl")
    assert [(r["step"], r["problems"], r["k"]) for r in lines] == [(0, 3, 1), (1, 3, 1), (2, 3, 1)]
    selection = json.loads((tmp_path / "rlvr" / "selection.json").read_text())
    assert selection["rule"] == "best_aes" and [c["step"] for c in selection["candidates"]] == [0, 1, 2]
    assert (out / "model.safetensors").exists()


def test_checks_without_held_out_problems_are_refused_naming_the_key(tmp_path, tiny_folder, task):
    model, tokenizer = load_policy(tiny_folder)
    with pytest.raises(ValueError, match=r"^opsd.check_every: held-out checks need held-out problems"):
        run_opsd(model, tokenizer, task.examples("train", 4), EXACT, OPSDStageConfig(**OPSD_SMALL), tmp_path / "o",
                 thinking=True)


def test_the_pipeline_grades_held_out_problems_disjoint_from_the_evaluation(tmp_path):
    """`opsd.check_every` in a pipeline config: the arm gets problems after the evaluated ones, and
    its run folder holds the checks and the selection."""
    import yaml

    from opsdlab.cli import main
    from opsdlab.config import load_config
    from opsdlab.tasks.data import problem_key
    from opsdlab.run.problems import check_problems, eval_sets
    from opsdlab.tasks import build_task

    config = load_config("tiny", ["eval.problems=6", "opsd.check_every=1", "opsd.check_problems=4"])
    held_out = check_problems(config, config.opsd)
    evaluated = next(iter(eval_sets(config, build_task("synthetic", config.task.options)).values()))
    assert len(held_out) == 4 and not {problem_key(e.problem) for e in held_out} & {problem_key(e.problem)
                                                                                   for e in evaluated}
    assert check_problems(config, config.rlvr) is None  # checks off

    run = {"stages": ["opsd"], "model": {"init": "tiny"}, "workers": 1,
           "opsd": {"max_steps": 2, "prompts_per_step": 2, "rollouts_per_prompt": 2, "max_completion_length": 8,
                    "train_problems": 8, "save_steps": 100, "logging_steps": 1, "check_every": 1,
                    "check_problems": 2, "check_k": 1, "check_max_new_tokens": 8,
                    "select": "shortest_within_tolerance"},
           "arms": [{"name": "all", "gate": "all"}],
           "eval": {"problems": 2, "sampling": {"k": 1, "max_new_tokens": 8}, "greedy": False, "teacher_check": False,
                    "base": False}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(run))
    assert main(["pipeline", "--config", str(path), "--run-dir", str(tmp_path / "run")]) == 0
    arm = tmp_path / "run" / "opsd" / "all-s0"
    assert [json.loads(line)["step"] for line in (arm / "checks.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert json.loads((arm / "selection.json").read_text())["rule"] == "shortest_within_tolerance"
    record = json.loads((arm / "settings.json").read_text())
    assert record["settings"]["opsd.check_every"] == 1 and record["settings"]["eval.problems"] == 2


# ---------------------------------------------------------------- a real collapse


@pytest.fixture(scope="module")
def terse_folder(tmp_path_factory, tokenizer):
    """The tiny model made to end its responses after about 3 tokens: every token embedding (tied to the
    output head) gets one shared direction s, and EOS's embedding is 6 s, so EOS outscores every token
    wherever the final hidden state keeps s. The random tiny model itself runs most responses to the cap,
    which leaves no room for them to grow."""
    from opsdlab.modeling.models import build_tiny_model, save_policy

    model = build_tiny_model(tokenizer, seed=0)
    embeddings = model.get_input_embeddings().weight
    direction = torch.randn(embeddings.shape[1], generator=torch.Generator().manual_seed(1))
    direction *= embeddings.norm(dim=1).mean() / direction.norm()
    with torch.no_grad():
        embeddings += direction
        embeddings[tokenizer.eos_token_id] = 6 * direction
    folder = tmp_path_factory.mktemp("terse") / "model"
    save_policy(model, tokenizer, folder)
    return folder


# Learning rate 1 for a few OPSD steps: responses of about 2 tokens run to the 96-token cap after one step
# and loop after two (the tiny model's collapse; 1e-2 ... 1e-4 inflate them too, without loops).
COLLAPSING = dict(learning_rate=1.0, max_completion_length=96, max_steps=4, check_problems=4, check_k=2,
                  select="last")


@pytest.mark.parametrize("stop, rule, step", [("repetition", "repetition", 2), ("collapse", "length_inflation", 1)])
def test_a_real_collapse_fires_its_rule_and_the_checkpoint_before_it_is_selected(tmp_path, terse_folder, task, stop,
                                                                                 rule, step):
    stage = tmp_path / "opsd"
    out = opsd_run(terse_folder, task, stage, stop=stop, **COLLAPSING)

    records = read_lines(stage / "checks.jsonl")
    assert [r["step"] for r in records] == list(range(step + 1))  # stopped before step 4
    start, inflated = records[:2]
    assert start["mean_response_tokens"] < 5 and start["truncation_rate"] == 0 and start["repetition_rate"] == 0
    # Step 1: 17x as long, one response in 8 cut at the cap, none looping yet.
    assert inflated["length_ratio"] > 5 and inflated["truncation_rate"] < 0.2 and inflated["repetition_rate"] == 0
    if step == 2:
        looping = records[2]
        assert looping["mean_response_tokens"] == 96 and looping["truncation_rate"] == 1  # every response at the cap
        assert looping["repetition_rate"] > 0.5
        assert looping["mean_token_entropy"] < start["mean_token_entropy"] / 2  # entropy collapses with the loops
    assert json.loads((stage / "stop.json").read_text())["rule"] == rule
    assert json.loads((stage / "stop.json").read_text())["step"] == step
    assert records[-1]["stop"] == rule
    assert max(r["step"] for r in read_lines(stage / "metrics.jsonl")) == step  # no step after the stop

    # Step 1 already shows length inflation: `last` picks the start, whatever the stop rule.
    selection = json.loads((stage / "selection.json").read_text())
    assert (selection["step"], selection["checkpoint"]) == (0, "checkpoints/start")
    assert [(e["step"], sorted(e["signs"])) for e in selection["excluded"]] == [
        (1, ["length_inflation"]), (2, ["length_inflation", "repetition", "truncation"])][:step]
    start_model, _ = load_policy(terse_folder)
    assert same_weights(weights(out), {k: v for k, v in start_model.state_dict().items() if k in weights(out)})


def test_a_check_records_the_models_own_token_entropy_over_its_responses(terse_folder, task):
    """`evaluate(entropy=True)`: per response, the mean entropy of softmax(logits) at the positions that
    predicted its tokens, as a plain forward pass over prompt and response computes it."""
    from opsdlab.config.sections import SamplingConfig
    from opsdlab.evaluation import evaluate as evaluation
    from opsdlab.tasks.prompts import render_prompt

    model, tokenizer = load_policy(terse_folder)
    examples = task.examples("test", 3)
    sampling = SamplingConfig(k=2, temperature=1.0, max_new_tokens=16, seed=0)
    samples, summary = evaluation.evaluate(model, tokenizer, examples, EXACT, sampling, entropy=True)
    prompts = [render_prompt(tokenizer, e, thinking=True) for e in examples for _ in range(2)]
    generations = evaluation.generate(model, tokenizer, prompts, sampling)  # the same seed: the same responses
    for prompt, generation, sample in zip(prompts, generations, samples):
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        logits = model(torch.tensor([prompt_ids + generation.token_ids])).logits[0].float()
        scored = logits[len(prompt_ids) - 1:-1]
        expected = -(scored.log_softmax(-1).exp() * scored.log_softmax(-1)).sum(-1).mean().item()
        assert sample.token_entropy == pytest.approx(expected, rel=1e-4)
    assert summary["mean_token_entropy"] is not None
    assert evaluation.evaluate(model, tokenizer, examples, EXACT, sampling)[1]["mean_token_entropy"] is None


def test_rlvr_has_no_length_sign_unless_asked():
    """RL may lengthen responses on purpose: the length_inflation sign is OPSD's default, not RLVR's."""
    from opsdlab.config.stages import OPSDStageConfig, RLVRStageConfig

    assert RLVRStageConfig().stop_length_ratio is None
    assert OPSDStageConfig().stop_length_ratio == 1.5
    assert RLVRStageConfig(stop_length_ratio=2.0).stop_length_ratio == 2.0
