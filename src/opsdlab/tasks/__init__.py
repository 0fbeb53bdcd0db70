"""Tasks: where examples come from, how SFT targets look, and how answers are graded.

`TASKS` maps a task name to its builder; the name is what configs accept (their options are
`config.tasks.OPTIONS`, checked when a config loads). A task yields
`Example`s (id, problem, reference solution, answer) per split, SFT rows rendered through the one
prompt renderer, and names its default verifier settings.
"""

from __future__ import annotations

import random
from opsdlab.config.tasks import OPTIONS, SearchConfig, SyntheticConfig, check_options, option_names
from opsdlab.tasks.data import ColumnMap, Example, load_examples, parse_column_map
from opsdlab.tasks.prompts import render_prompt
from opsdlab.tasks.rows import HELD_OUT
from opsdlab.tasks.search import SearchTask
from opsdlab.tasks.synthetic import SyntheticTask
from opsdlab.tasks.templates import completion_for_prompt


class FileTask:
    """Real math data: local jsonl/json/parquet/csv files or a Hub dataset, with a column mapping.

    `train` feeds SFT, RLVR and OPSD; SFT targets are the reference solutions (inside a think
    block when thinking is on) followed by the boxed answer. Every row is a training problem, so the
    task has no held-out split: its evaluation and check problems come from other files
    (`eval.sets`), and asking it for held-out problems is an error rather than its training rows.
    """

    name = "file"
    default_verifier = {"extract": "last_boxed", "compare": "math_verify"}

    def __init__(self, train: str | None = None, columns: str | dict | None = None, split: str = "train", seed: int = 0):
        self.train = train
        self.columns = parse_column_map(columns) if columns else ColumnMap()
        self.split = split
        self.seed = seed
        self._cache: list[Example] | None = None

    def _train_examples(self) -> list[Example]:
        if self.train is None:
            raise ValueError("task 'file' needs `train` (a jsonl/parquet path or a datasets name)")
        if self._cache is None:
            # Reference solutions are optional: RL and the OPSD contexts that show no solution train on
            # problems and answers alone (`preflight.check_training_data` names what reads them).
            self._cache = load_examples(self.train, self.columns, split=self.split, optional_solution=True)
        return self._cache

    def examples(self, split: str, count: int | None) -> list[Example]:
        """Training problems (any split but the held-out one): the file's rows in a seeded order."""
        if split == HELD_OUT:
            raise ValueError(f"{held_out_refusal(self.train)}; evaluate and check on other files (eval.sets)")
        examples = list(self._train_examples())
        random.Random(f"{self.seed}-{split}").shuffle(examples)
        return examples if count is None else examples[:count]

    def sft_rows(self, tokenizer, count: int | None, thinking: bool = True, seed: int = 0) -> list[dict]:
        examples = self._train_examples()[: count or None]
        missing = [e.id for e in examples if not e.solution.strip()]
        if missing:
            raise ValueError(f"{self.train}: SFT needs a reference solution in every row; rows with ids "
                             f"{missing[:5]} have none (map the column with columns=solution=NAME)")
        rows = []
        for example in examples:
            answer = f"The final answer is \\boxed{{{example.answer}}}."
            body = example.solution.strip()
            completion = f"<think>\n{body}\n</think>\n\n{answer}" if thinking else f"{body}\n\n{answer}"
            prompt = render_prompt(tokenizer, example, thinking=thinking)
            completion = completion_for_prompt(prompt, completion)  # the template may have opened <think>
            rows.append({"prompt": prompt, "completion": completion + tokenizer.eos_token, "context": "none"})
        return rows


def held_out_refusal(train: str | None) -> str:
    """Why a file task has no held-out problems (the caller adds what to give instead)."""
    return f"task 'file' trains on every row of {train or 'its training file'} and holds none out"


def build_task(name: str, options: dict | None = None, seed: int = 0):
    """Build a task by name from its options dict (validated by `check_options`)."""
    options = dict(options or {})
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    check_options(name, options, where=f"task {name!r}")
    return TASKS[name](options, seed)


def _synthetic(options: dict, seed: int) -> SyntheticTask:
    return SyntheticTask(SyntheticConfig(**options), seed=seed)


def _search(options: dict, seed: int) -> SearchTask:
    return SearchTask(SearchConfig(**options), seed=seed)


def _file(options: dict, seed: int) -> FileTask:
    return FileTask(seed=seed, **options)


TASKS = {"synthetic": _synthetic, "search": _search, "file": _file}

__all__ = ["HELD_OUT", "OPTIONS", "TASKS", "build_task", "check_options", "held_out_refusal", "option_names", "Example",
           "FileTask", "SyntheticTask", "SyntheticConfig", "SearchTask", "SearchConfig"]
