"""Loading real math datasets into `Example`s: local jsonl/json/parquet/csv files or Hub datasets.

Every stage consumes the same `Example` (id, problem, reference solution, gold answer), so this is
the one place where a dataset's column names are mapped (`ColumnMap`) and its rows checked. Bad
data fails here with a `DataError` that names the file, the row and the field, instead of
surfacing later as a KeyError inside a trainer. `pair_unrelated` gives every example another
problem's solution, the privileged block of the `unrelated` teacher control.

Problem sets are known by their text (`problem_key`): an evaluation set holds each problem once
(`check_distinct`), and a run's training, check and evaluation problems share none (`check_disjoint`).
"""

from __future__ import annotations

import bisect
import csv
import json
import math
import re
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from opsdlab.config.columns import ColumnMap, DataError, parse_column_map
from opsdlab.config.tasks import DEFAULT_INSTRUCTION

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

@dataclass(frozen=True)
class Example:
    """One math problem. `solution` is the reference solution ("" for eval-only sets).

    `unrelated_solution` is the reference solution of a *different* problem of the same format
    (set by `pair_unrelated`): the `unrelated` teacher reads it, a hint's style without its
    information. `instruction` follows the problem in every role's prompt ("" for none): a generated
    task may word it shorter than a benchmark's, since it is in every row, rollout and evaluation.
    """

    id: str
    problem: str
    solution: str
    answer: str
    unrelated_solution: str | None = None
    instruction: str = DEFAULT_INSTRUCTION


def _read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    """Rows of a jsonl file and their 1-based line numbers; blank lines are skipped."""
    rows, line_numbers = [], []
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path} line {number}: not valid JSON ({error})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
                line_numbers.append(number)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error})") from None
    return rows, line_numbers


def _rows(dataset, limit: int | None) -> list[dict]:
    """The first `limit` rows (all when None) of a `datasets.Dataset` as dicts."""
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return list(dataset)


def _csv_header(path: Path) -> list[str]:
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            return next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: cannot read ({error})") from None


def _read_with_datasets(path: Path, limit: int | None) -> list[dict]:
    """Rows of a .json/.parquet/.csv file via the `datasets` packaged loaders."""
    import datasets

    kind = LOCAL_FORMATS[path.suffix.lower()]
    options: dict[str, Any] = {}
    if kind == "csv":
        # CSV cells are text: without string features, pandas type inference turns the answer
        # "007" into 7 and "3.10" into 3.1, and reads "NA"/"None" as missing.
        header = _csv_header(path)
        options = {
            "features": datasets.Features({name: datasets.Value("string") for name in header}),
            "keep_default_na": False,
        }
    try:
        dataset = datasets.load_dataset(kind, data_files=str(path), split="train", **options)
    except Exception as error:  # noqa: BLE001 - any loader failure means the file is unreadable
        raise DataError(f"{path}: cannot read as {path.suffix.lower()[1:]} ({type(error).__name__}: {error})") from None
    return _rows(dataset, limit)


def _read_hub(name: str, split: str, limit: int | None) -> list[dict]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # noqa: BLE001 - report every failure the same way
        raise DataError(
            f"could not load {name!r} (split {split!r}) as a Hugging Face Hub dataset "
            f"({type(error).__name__}: {error}); local paths must exist and end in "
            f"{', '.join(LOCAL_FORMATS)}"
        ) from None
    return _rows(dataset, limit)


def _as_text(value: Any) -> str | None:
    """A cell as a string: numbers are converted (3.0 -> "3"), other non-strings give None."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    return None


# Columns that commonly hold each field, suggested when the mapped column is missing.
_ALIASES = {
    "problem": ("question", "prompt", "query", "input", "Problem", "Question"),
    "answer": ("final_answer", "answer_value", "target", "label", "output", "Answer"),
    "solution": ("explanation", "rationale", "reasoning", "generated_solution", "Solution"),
    "id": ("unique_id", "idx", "index", "uid", "problem_id"),
}


def _field(row: dict, column: str, field_name: str, where: str, numbers_ok: bool = True) -> str:
    """The non-blank text of `row[column]`, or a DataError naming `where` and the field.

    Numbers are accepted (and converted) only when `numbers_ok`: a numeric answer is normal, a
    numeric problem means the mapping points at the wrong column.
    """
    if column not in row:
        present = ", ".join(map(str, row)) or "none"
        suggestion = next((alias for alias in _ALIASES[field_name] if alias in row), "<column>")
        raise DataError(
            f"{where}: missing field {column!r} (columns present: {present}); "
            f"set the column mapping, e.g. {field_name}={suggestion}"
        )
    value = row[column]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise DataError(f"{where}: field {column!r} is empty")
    text = _as_text(value) if numbers_ok or isinstance(value, str) else None
    if text is None:
        kinds = "a string or number" if numbers_ok else "a string"
        raise DataError(f"{where}: field {column!r} must be {kinds}, got {type(value).__name__}")
    if not text.strip():
        raise DataError(f"{where}: field {column!r} is empty")
    return text


def load_examples(
    source: str,
    columns: ColumnMap = ColumnMap(),
    split: str = "train",
    limit: int | None = None,
    require_solution: bool = False,
    optional_solution: bool = False,
) -> list[Example]:
    """Load and check examples from a local file or a Hub dataset.

    `source` ending in .jsonl/.json/.parquet/.csv (or naming an existing file) is read locally,
    anything else is loaded with `datasets.load_dataset(source, split=split)`; `split` only
    applies to Hub datasets. `limit` keeps the first rows (checked rows only). Problems and
    answers must be non-empty; solutions too when `require_solution` (SFT needs them). With
    `optional_solution` (evaluation sets may have no reference solutions), a solution column absent
    from every row gives empty solutions instead of an error; one absent from only some rows is still
    an error naming the row. Numeric answers and ids become strings. Ids must be unique.
    """
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    path = Path(source).expanduser()
    is_local = path.suffix.lower() in LOCAL_FORMATS or path.exists() or source.startswith((".", "/", "~"))
    line_numbers: list[int] | None = None
    if is_local:
        if path.is_dir():
            raise DataError(f"{path}: is a directory; give a {', '.join(LOCAL_FORMATS)} file")
        if not path.exists():
            raise DataError(f"{path}: file not found")
        if path.suffix.lower() not in LOCAL_FORMATS:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(LOCAL_FORMATS)}")
        if path.suffix.lower() == ".jsonl":
            # Read jsonl directly: the line-by-line check already parses every row, and keeping
            # the rows here preserves line numbers and tells a missing key from a null value.
            rows, line_numbers = _read_jsonl(path)
        else:
            rows = _read_with_datasets(path, limit)
        label = str(path)
    else:
        rows = _read_hub(source, split, limit)
        label = f"{source} [{split}]"
    if limit is not None:
        rows = rows[:limit]
        line_numbers = line_numbers[:limit] if line_numbers is not None else None
    if not rows and limit != 0:
        raise DataError(f"{label}: contains no rows")

    # Row numbers when the id column is absent from the data altogether; a column present in
    # only some rows is an error (mixing real ids and row numbers could collide silently).
    number_rows = columns.id is None or all(columns.id not in row for row in rows)
    no_solutions = columns.solution is None or (optional_solution and not require_solution
                                                and all(columns.solution not in row for row in rows))
    examples: list[Example] = []
    seen_ids: dict[str, str] = {}
    for index, row in enumerate(rows):
        where = f"{label} line {line_numbers[index]}" if line_numbers is not None else f"{label} row {index + 1}"
        problem = _field(row, columns.problem, "problem", where, numbers_ok=False)
        answer = _field(row, columns.answer, "answer", where).strip()
        if no_solutions:
            if require_solution:
                raise DataError(f"{label}: reference solutions are required but the column mapping has solution=None")
            solution = ""
        elif require_solution or columns.solution not in row:
            solution = _field(row, columns.solution, "solution", where)
        else:
            value = row[columns.solution]
            empty = value is None or (isinstance(value, float) and math.isnan(value))
            solution = "" if empty else _as_text(value)
            if solution is None:
                raise DataError(f"{where}: field {columns.solution!r} must be a string, got {type(value).__name__}")
        example_id = str(index) if number_rows else _field(row, columns.id, "id", where).strip()
        if example_id in seen_ids:
            raise DataError(f"{where}: duplicate id {example_id!r} (first seen at {seen_ids[example_id]})")
        seen_ids[example_id] = where
        examples.append(Example(id=example_id, problem=problem, solution=solution, answer=answer))
    return examples


def problem_key(text: str) -> str:
    """A problem's text as sets compare it: Unicode-normalised (NFKC), case-folded, every run of white
    space one space, stripped. Two rows that differ only in spacing or case are the same problem."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().casefold()


def _ids(pairs: list[tuple[Example, Example]]) -> str:
    """The ids of the first few pairs of examples with one text, e.g. `ids '3' = '17', '8' = '40'`."""
    shown = ", ".join(f"{a.id!r} = {b.id!r}" for a, b in pairs[:3])
    return f"ids {shown}" + (f" and {len(pairs) - 3} more" if len(pairs) > 3 else "")


def repeats(examples: list[Example]) -> list[tuple[Example, Example]]:
    """(first, repeat) for every example whose problem text (`problem_key`) an earlier one has."""
    first: dict[str, Example] = {}
    found = []
    for example in examples:
        key = problem_key(example.problem)
        if key in first:
            found.append((first[key], example))
        else:
            first[key] = example
    return found


def check_distinct(examples: list[Example], label: str) -> list[Example]:
    """`examples`, or a DataError naming `label` and the ids of its repeated problems: an evaluation set
    holds each problem once (a repeat counts twice in every average and narrows every CI)."""
    found = repeats(examples)
    if found:
        raise DataError(f"{label}: {len(found)} problem(s) repeat an earlier one by text ({_ids(found)}); "
                        "an evaluation set holds each problem once: remove the repeats")
    return examples


def check_disjoint(sets: dict[str, list[Example]], pairs: list[tuple[str, str]]) -> None:
    """Raise a DataError for the first pair of set names in `pairs` whose sets share a problem by text
    (`problem_key`), naming both sets and the ids: a run never trains on a problem it checks or
    evaluates, nor checks on one it evaluates."""
    for first, second in pairs:
        keys = {problem_key(example.problem): example for example in sets[second]}
        shared = [(example, keys[key]) for example in sets[first] if (key := problem_key(example.problem)) in keys]
        if shared:
            raise DataError(f"{len(shared)} problem(s) are both in {first} and in {second} by text "
                            f"({_ids(shared)}); training, check and evaluation problems must differ: remove them "
                            "from one of the files, or evaluate on other sets")


def _solution_lines(example: Example) -> int:
    return len(example.solution.strip().splitlines())


def pair_unrelated(examples: list[Example]) -> list[Example]:
    """The examples, each with `unrelated_solution` set to the solution of another one.

    The partner of an example is never itself. In order of preference it has a different answer
    (a partner with the same answer would leak it), the nearest number of solution lines (the same
    format and length when one exists; the fewer lines on a tie), then comes first after the
    example in list order, cycling (so partners spread over the list instead of piling on one).
    Deterministic: a function of the list alone. An example that already has an unrelated solution
    keeps it; with fewer than two examples nothing is set (the `unrelated` teacher context then
    raises, naming the example).
    """
    examples = list(examples)
    if len(examples) < 2:
        return examples
    lines = [_solution_lines(e) for e in examples]
    answers = [e.answer.strip() for e in examples]
    by_lines: dict[int, list[int]] = {}
    for index, count in enumerate(lines):
        by_lines.setdefault(count, []).append(index)
    return [example if example.unrelated_solution is not None
            else replace(example, unrelated_solution=examples[_partner(i, lines, answers, by_lines)].solution)
            for i, example in enumerate(examples)]


def _partner(index: int, lines: list[int], answers: list[str], by_lines: dict[int, list[int]]) -> int:
    """`pair_unrelated`'s choice for `index`: scans line-count buckets nearest first, each cyclically
    from `index`, for a different answer; failing that, for any other example."""
    order = sorted(by_lines, key=lambda count: (abs(count - lines[index]), count))
    for need_other_answer in (True, False):
        for count in order:
            members = by_lines[count]
            start = bisect.bisect_right(members, index)
            for k in range(len(members)):
                j = members[(start + k) % len(members)]
                if j != index and (not need_other_answer or answers[j] != answers[index]):
                    return j
    raise AssertionError("unreachable: pair_unrelated checks for two examples")


__all__ = ["ColumnMap", "DataError", "Example", "LOCAL_FORMATS", "check_disjoint", "check_distinct", "load_examples",
           "pair_unrelated", "parse_column_map", "problem_key", "repeats"]
