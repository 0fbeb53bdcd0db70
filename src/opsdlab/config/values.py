"""A config value checked against its field: the error type, the type check, and dataclasses built from YAML data.

Every section of the config is a frozen dataclass; `build` makes one from a dict read from YAML,
recursing into nested sections, and names the dotted key of the first unknown key, wrong type or
value the section refuses (`ConfigError`).
"""

from __future__ import annotations

import dataclasses
import types
import typing

import yaml

from opsdlab.config.choices import STAGES


class ConfigError(ValueError):
    """A config problem, with the dotted key it concerns."""


# Labels that section dataclasses put in front of their own error messages; a message located
# under a config key drops it, so that no error reads `opsd: opsd: ...`.
_SECTION_LABELS = (*STAGES, "sampling")


def located(where: str, error: Exception | str) -> str:
    """`error`'s message under the config key `where`, without the section label the message carries."""
    text = str(error)
    labels = {*_SECTION_LABELS, where.rsplit(".", 1)[-1]} if where else set(_SECTION_LABELS)
    head, sep, rest = text.partition(": ")
    if sep and head in labels:
        text = rest
    return f"{where}: {text}" if where else text


_TYPE_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
               tuple: "a list", dict: "a mapping", type(None): "null"}


def check_value(value, hint, key: str):
    """`value` checked against the field annotation `hint`; the value to store, or a ConfigError.

    Integers are accepted for float fields, and so are strings that read as a number: YAML reads
    `1e-6` (no dot) as a string. A list is stored as a tuple; a string with commas is the list of its
    comma-separated items, each read as YAML (`seeds=0,1` reaches here as the string "0,1").
    Annotations this function does not know are accepted as they are.
    """
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        ok, converted = _matches(value, option)
        if ok:
            return converted
    expected = " or ".join(_TYPE_NAMES.get(option, getattr(option, "__name__", str(option))) for option in options)
    raise ConfigError(f"{key}: expected {expected}, got {value!r} ({type(value).__name__})")


def _matches(value, option) -> tuple[bool, object]:
    if option is type(None):
        return value is None, value
    if option is bool:
        return isinstance(value, bool), value
    if option is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if option is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, value
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if option is str:
        return isinstance(value, str), value
    if option is tuple:
        if isinstance(value, str) and "," in value:  # `seeds=0,1`: YAML reads the list's text as a string
            return True, tuple(yaml.safe_load(item.strip()) for item in value.split(",") if item.strip())
        return isinstance(value, (list, tuple)), tuple(value) if isinstance(value, (list, tuple)) else value
    if option is dict:
        return isinstance(value, dict), value
    return True, value


def build(cls, data, where: str):
    """Build dataclass `cls` from a dict, recursing into nested dataclasses; unknown keys are errors."""
    if data is None:
        return cls()
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        hint = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            values[name] = build(hint, value, key)
        else:
            values[name] = check_value(value, hint, key)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(located(where or "config", error)) from error
