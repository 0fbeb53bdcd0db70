"""The problems a run reads: its evaluation sets (the task's held-out split or a file each) and their
verifier, the held-out problems a stage checks on while it trains, and the problems it trains on; and
the check, before anything is written or loaded, that no problem is both trained and scored on.
"""

from __future__ import annotations

import re
from pathlib import Path

from opsdlab.config import ConfigError, PipelineConfig
from opsdlab.run.plan import Run
from opsdlab.tasks import HELD_OUT, build_task
from opsdlab.tasks.data import (ColumnMap, Example, check_disjoint, check_distinct, load_examples, pair_unrelated,
                                parse_column_map)
from opsdlab.tasks.verifier import VerifierConfig


def verifier_of(config: PipelineConfig, task) -> VerifierConfig:
    return VerifierConfig(**{**task.default_verifier, **config.task.verifier})


def eval_sets(config: PipelineConfig, task) -> dict:
    """Held-out problems per evaluation set name, each paired with another one's solution (the
    `unrelated` teacher check reads it)."""
    return {name if is_task_set(config, name) else set_label(name):
            pair_unrelated(set_examples(name, task, config.eval.problems, config.eval.columns,
                                        generated=is_task_set(config, name)))
            for name in config.eval.sets}


def set_examples(name: str, task, problems: int | None, columns: str | None, generated: bool) -> list[Example]:
    """The first `problems` problems of an evaluation set: `task`'s held-out split (`generated`), or
    the rows of a file or Hub dataset, whose reference solutions are optional. Either holds each
    problem once: the held-out split by construction, a file's repeated problems are an error
    naming them (`data.check_distinct`)."""
    if generated:
        return task.examples(HELD_OUT, problems)
    return check_distinct(load_examples(name, parse_column_map(columns) if columns else ColumnMap(), split="test",
                                        limit=problems, optional_solution=True), name)


def set_label(name: str) -> str:
    """The folder name of an evaluation set: the task's own split, or a file's stem."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).stem)


def is_task_set(config: PipelineConfig, name: str) -> bool:
    return name == "synthetic" or name == config.task.name


def check_problems(config: PipelineConfig, stage) -> list[Example] | None:
    """The held-out problems a stage grades while it trains (`stage.check_every` > 0), disjoint from
    the evaluation's: the task's test problems after the first `eval.problems`, or the rows of the
    first evaluation file after them. A checkpoint chosen on the problems it is then scored on would
    be scored too well."""
    if not stage.check_every:
        return None
    first, start, wanted = config.eval.sets[0], config.eval.problems, stage.check_problems
    task = build_task(config.task.name, config.task.options, seed=config.seed)
    problems = set_examples(first, task, start + wanted, config.eval.columns,
                            generated=is_task_set(config, first))[start:]
    if not problems:
        raise ConfigError(f"check_every: the held-out check needs problems beyond the {start} evaluated ones of "
                          f"{first}; lower eval.problems or evaluate on a larger set")
    return problems


def training_problems(config: PipelineConfig, task) -> list[Example]:
    """Every problem the run's stages train on: the problems of the SFT rows, and the RL problems of
    RLVR and of the arms (one stream: the largest count holds the others); for a file task, every
    row of its file."""
    stages = set(config.stages)
    if not stages & {"sft", "rlvr", "opsd"}:
        return []
    if config.task.name == "file":
        return task.examples("train", None)
    counts = [config.rlvr.train_problems] if "rlvr" in stages else []
    counts += [config.arm_config(arm).train_problems for arm in config.arms] if "opsd" in stages else []
    return ((task.examples("sft", config.sft.rows) if "sft" in stages else [])
            + (task.examples("train", max(counts)) if counts else []))


def all_check_problems(config: PipelineConfig) -> list[Example]:
    """The held-out problems any stage of the run checks on: those of the stage that checks on the most
    (`check_problems` gives every stage the first ones of one list)."""
    stages = [config.rlvr] if "rlvr" in config.stages else []
    stages += [config.arm_config(arm) for arm in config.arms] if "opsd" in config.stages else []
    checking = [stage for stage in stages if stage.check_every]
    return check_problems(config, max(checking, key=lambda stage: stage.check_problems)) if checking else []


def problem_sets(run: Run) -> dict[str, list[Example]]:
    """The run's problem sets by what they are for: training, check and each evaluation set."""
    config = run.config
    train = config.task.options.get("train") if config.task.name == "file" else None
    sets = {f"the training problems{f' ({train})' if train else ''}": training_problems(config, run.task),
            "the check problems": all_check_problems(config)}
    sets.update({f"evaluation set {name}": examples for name, examples in zip(config.eval.sets, run.sets.values())})
    return sets


def check_problem_sets(run: Run) -> None:
    """A DataError, before anything is written or loaded, if the run would train on a problem it
    checks or evaluates, or check on one it evaluates (by text, `data.problem_key`). Each evaluation
    set holds each problem once (`set_examples`)."""
    sets = problem_sets(run)
    train, check, *evaluated = sets
    check_disjoint(sets, [(train, check)] + [(other, name) for other in (train, check) for name in evaluated])
