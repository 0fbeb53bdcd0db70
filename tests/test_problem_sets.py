"""Problem sets are known by their text: for every shipped preset, the problems a run trains on, checks
on and evaluates share none (by `data.problem_key`), and each check or evaluation set holds each problem
once. Builds the tasks and their problems only, no model."""

import json
from pathlib import Path

import pytest

from opsdlab.config import PRESET_DIR, load_config
from opsdlab.tasks.data import problem_key
from opsdlab.run.problems import check_problem_sets, check_problems, eval_sets
from opsdlab.run.steps import open_run
from opsdlab.tasks import build_task

PRESETS = sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))
CHECKED = ["rlvr.check_every=10", "opsd.check_every=10"]  # so that every stage draws its check problems


def _write(path, rows) -> None:
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))


def _file_inputs(config) -> None:
    """The files a file-task preset names, in the working folder: a training file and each evaluation set,
    every problem its own."""
    _write(config.task.options["train"], [{"problem": f"Training problem {i}: what is {i} + 1?",
                                           "solution": f"{i} + 1 = {i + 1}", "answer": str(i + 1)} for i in range(50)])
    for name in config.eval.sets:
        _write(name, [{"problem": f"{name} problem {i}: what is {i} + 2?", "answer": str(i + 2)}
                      for i in range(config.eval.problems + 40)])


def _keys(examples) -> list[str]:
    return [problem_key(example.problem) for example in examples]


@pytest.mark.parametrize("preset", PRESETS)
def test_train_check_and_evaluation_problems_are_distinct_and_disjoint(preset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(preset, CHECKED)
    if config.task.name == "file":
        _file_inputs(config)
    task = build_task(config.task.name, config.task.options, seed=config.seed)
    # As the stages draw them: SFT rows, RLVR's and every arm's RL problems, every stage's check problems.
    # (One stream per split: the largest count of a split holds the smaller ones.)
    arms = [config.arm_config(arm) for arm in config.arms]
    train = set(_keys(task.examples("sft", config.sft.rows) if config.task.name != "file" else
                      task.examples("train", None)))
    train |= set(_keys(task.examples("train", max(stage.train_problems for stage in [config.rlvr, *arms]))))
    by_count = {stage.check_problems: stage for stage in [config.rlvr, *arms]}
    checks = [check_problems(config, stage) for stage in by_count.values()]
    sets = eval_sets(config, task)
    for check in checks:
        assert check and len(set(_keys(check))) == len(check), "a check set repeats a problem"
        assert not set(_keys(check)) & train, "a check problem is a training problem"
    for name, examples in sets.items():
        keys = _keys(examples)
        assert len(set(keys)) == len(keys), f"evaluation set {name} repeats {len(keys) - len(set(keys))} problems"
        assert not set(keys) & train, f"evaluation set {name} holds training problems"
        for check in checks:
            assert not set(keys) & set(_keys(check)), f"a check problem is in evaluation set {name}"
    check_problem_sets(open_run(config))  # the pipeline's own refusal agrees


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_held_out_split_is_distinct_in_every_seed_and_its_first_problems_stay(seed):
    task = build_task("synthetic", {"min_terms": 2, "max_terms": 3, "max_term": 13}, seed=seed)  # a small space
    held_out = task.examples("test", 150)
    assert len(set(_keys(held_out))) == 150
    assert task.examples("test", 40) == held_out[:40]  # a prefix: the check problems follow the evaluated ones


def test_a_held_out_split_too_small_for_the_count_says_so():
    task = build_task("synthetic", {"min_terms": 2, "max_terms": 2, "max_term": 5})  # 25 problems, ~3 held out
    expected = (r"synthetic task: could not draw 30 distinct test problems; the problem space \(min_terms, max_terms, "
                r"max_term\) is too small for that many")
    with pytest.raises(ValueError, match=expected):
        task.examples("test", 30)
