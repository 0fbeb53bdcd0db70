"""The tasks' options (`task.options`): each task's option dataclass, checked when a config loads.

A task's problems, SFT rows and grading live in `tasks`; what a config may set for it is here, so that
a config is checked without importing the tasks (and their tokenizer code).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from opsdlab.config.columns import parse_column_map


# What the user turn asks after the problem, unless a task words it otherwise (`Example.instruction`).
DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def check_unit_interval(task: str, config, names: tuple[str, ...]) -> None:
    """Raise a ValueError naming the task and the field if any of `config`'s `names` is outside [0, 1]."""
    for name in names:
        value = getattr(config, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{task} task: {name} must be in [0, 1], got {value}")


def checked_instruction(task: str, config) -> None:
    """Normalise `config.instruction`: None (an empty value in YAML or on the command line) means no
    instruction; anything but text is an error naming the task."""
    if config.instruction is None:
        object.__setattr__(config, "instruction", "")
    elif not isinstance(config.instruction, str):
        raise ValueError(f"{task} task: instruction must be text (\"\" for none), got {config.instruction!r}")


PRIVILEGED_STYLES = ("concise", "same")


@dataclass(frozen=True)
class SyntheticConfig:
    min_terms: int = 4
    max_terms: int = 6
    max_term: int = 13
    slip_rate: float = 0.1
    recheck_rate: float = 0.25
    filler_rate: float = 0.1
    restart_rate: float = 0.15
    privileged_style: str = "concise"
    privileged_redundancy: float = 0.2
    privileged_fraction: float = 0.5
    # Follows the problem in every prompt; "" for none ("What is 6 + 8?" asks for itself).
    instruction: str = DEFAULT_INSTRUCTION

    def __post_init__(self):
        if not 2 <= self.min_terms <= self.max_terms:
            raise ValueError(f"synthetic task: need 2 <= min_terms <= max_terms, got {self.min_terms}, {self.max_terms}")
        if not 1 <= self.max_term <= 99:
            raise ValueError(f"synthetic task: max_term must be in 1..99, got {self.max_term}")
        check_unit_interval("synthetic", self, ("slip_rate", "recheck_rate", "filler_rate", "restart_rate",
                                                "privileged_redundancy", "privileged_fraction"))
        if self.privileged_style not in PRIVILEGED_STYLES:
            raise ValueError(f"synthetic task: privileged_style must be one of {PRIVILEGED_STYLES}, "
                             f"got {self.privileged_style!r}")
        checked_instruction("synthetic", self)


ORDERS = ("listed", "random")
CHECKS = ("add", "code")


@dataclass(frozen=True)
class SearchConfig:
    """Problem sizes and the plain solver's imperfections (see the module docstring)."""

    min_numbers: int = 4
    max_numbers: int = 8
    max_number: int = 19
    give_up_rate: float = 0.25
    mischeck_rate: float = 0.03
    order: str = "listed"
    privileged_fraction: float = 0.5
    check: str = "add"
    code_seed: int = 0
    instruction: str = DEFAULT_INSTRUCTION  # follows the problem in every prompt; "" for none

    def __post_init__(self):
        if not 2 <= self.min_numbers <= self.max_numbers:
            raise ValueError(f"search task: need 2 <= min_numbers <= max_numbers, got {self.min_numbers}, "
                             f"{self.max_numbers}")
        if not self.max_numbers <= self.max_number <= 99:
            raise ValueError(f"search task: max_number must be in {self.max_numbers}..99 (the listed numbers "
                             f"are distinct), got {self.max_number}")
        check_unit_interval("search", self, ("give_up_rate", "mischeck_rate", "privileged_fraction"))
        if self.order not in ORDERS:
            raise ValueError(f"search task: order must be one of {ORDERS}, got {self.order!r}")
        if self.check not in CHECKS:
            raise ValueError(f"search task: check must be one of {CHECKS}, got {self.check!r}")
        checked_instruction("search", self)


@dataclass(frozen=True)
class FileOptions:
    """The file task's options: the keyword arguments of `tasks.FileTask`."""

    train: str | None = None  # the problems: a jsonl/json/parquet/csv path or a Hugging Face datasets name
    columns: str | dict | None = None  # column mapping, e.g. problem=question,solution=explanation,answer=final
    split: str = "train"  # the split of a Hub dataset

    def __post_init__(self):
        if self.columns:
            parse_column_map(self.columns)


# The options each task takes (`task.options`): its option dataclass. The tasks themselves are `tasks.TASKS`.
OPTIONS = {"synthetic": SyntheticConfig, "search": SearchConfig, "file": FileOptions}


def held_out_refusal(train: str | None) -> str:
    """Why a file task has no held-out problems (the caller adds what to give instead)."""
    return f"task 'file' trains on every row of {train or 'its training file'} and holds none out"


def option_names(name: str) -> list[str]:
    """The option names task `name` accepts (`task.options` keys)."""
    return [f.name for f in fields(OPTIONS[name])]


def check_options(name: str, options: dict, where: str = "task.options") -> None:
    """Raise a ValueError, naming `where`, for an option task `name` does not have (listing the valid
    ones) or a value its config refuses. Cheap: builds the option dataclass, draws no problem."""
    valid = option_names(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown} for task {name!r}; valid options: {valid}")
    try:
        OPTIONS[name](**options)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from error
