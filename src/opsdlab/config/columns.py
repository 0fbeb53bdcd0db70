"""Column mappings: which dataset column holds each field of a problem (`task.options.columns`,
`eval.columns`, `--columns`), and the error bad data raises (`DataError`, which `tasks.data` raises for
rows too). Checked when a config loads; the data themselves are read in `tasks.data`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ColumnMap:
    """Which dataset column holds each `Example` field.

    `id=None` numbers the rows instead (0-based); `solution=None` gives every example an empty
    solution.
    """

    id: str | None = "id"
    problem: str = "problem"
    solution: str | None = "solution"
    answer: str = "answer"


class DataError(ValueError):
    """A dataset could not be loaded or a row is unusable; the message says where and why."""


_OPTIONAL_COLUMNS = {"id", "solution"}


def parse_column_map(spec: str | dict | ColumnMap | None) -> ColumnMap:
    """Build a ColumnMap from `"problem=question,answer=final"`, a dict, or None (the defaults).

    Keys are Example fields (id, problem, solution, answer); values are column names. For the
    optional fields, an empty value or `none` (e.g. `solution=none`) means "no such column".
    """
    if spec is None:
        return ColumnMap()
    if isinstance(spec, ColumnMap):
        return spec
    valid = [f.name for f in fields(ColumnMap)]
    if isinstance(spec, str):
        mapping: dict[str, Any] = {}
        for item in spec.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep:
                raise DataError(f"column mapping item {item!r} is not key=column (e.g. problem=question)")
            if key in mapping:
                raise DataError(f"column mapping sets {key!r} twice in {spec!r}")
            mapping[key] = value.strip()
    elif isinstance(spec, dict):
        mapping = dict(spec)
    else:
        raise DataError(f"column mapping must be a string like 'problem=question' or a dict, got {type(spec).__name__}")

    unknown = sorted(set(mapping) - set(valid))
    if unknown:
        raise DataError(f"unknown column mapping key(s) {unknown}; valid keys: {valid}")
    resolved: dict[str, str | None] = {}
    for key, value in mapping.items():
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            if key not in _OPTIONAL_COLUMNS:
                raise DataError(f"column mapping: {key!r} needs a column name (only id and solution may be none)")
            resolved[key] = None
        elif isinstance(value, str):
            resolved[key] = value.strip()
        else:
            raise DataError(f"column mapping: column name for {key!r} must be a string, got {value!r}")
    return ColumnMap(**resolved)
