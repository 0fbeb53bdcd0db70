"""What produced each output of a run directory, and what a rerun with other settings must redo.

Every output of a run (the base model, each trained stage, each evaluation) has a *record*
beside it, `settings.json`: the config values that shape that output as dotted keys (and which of
them were at their defaults), what it read (the completion stamp of the stage whose model it
starts from or evaluates; the content fingerprint of a user's data file or model folder) and the
version of the code that makes that kind of output.

A rerun compares the record each existing output carries with the one the current config
would write (`stale_outputs`): a key whose value differs, an input that is not the one read then
(a stage since remade, an edited data file), or another code version makes the output stale, and
so is every output that reads a stale one. A key that the record lacks because the option did not
exist yet is no difference while it holds its default (the behaviour before the option existed).
A stale output stops the rerun before anything changes, naming every key that differs
(`describe_stale`), unless the user asked to redo it (`--redo changed`, or a stage by name and
what reads it). So a run directory never holds an output made with settings other than the ones
its record, and its config.yaml, name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from pathlib import Path

RECORD = "settings.json"

# Bump a kind's version when a code change alters what that kind of step produces from the same
# settings: every output of that kind made before then is stale. evaluate 2: answers in scientific
# notation are compared as numbers, and a budget-forced response of exactly its budget is kept.
CODE_VERSIONS = {"base": 1, "sft": 1, "rlvr": 1, "opsd": 1, "evaluate": 2}

# Stage options that never reach an output file (where logs are sent); leaving them out lets a
# rerun turn tracking on without redoing anything.
NOT_SHAPING = frozenset({"report_to"})

# Settings that name where data lives, each with the input that fingerprints what it holds. Data is
# known by its content: the same data under another path is no difference, and a record written
# before the content was recorded is judged by the path it names.
PATH_SETTINGS = {"task.options.train": "train_data", "eval.sets": "eval_sets"}


def plain(value):
    """JSON-ready form of config values: tuples as lists, dataclasses as dicts."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def flatten(prefix: str, value) -> dict:
    """`value` (a dataclass or mapping) as dotted keys under `prefix`, leaves as JSON-ready values;
    keys named in NOT_SHAPING are left out."""
    value = plain(value)
    if not isinstance(value, dict):
        return {prefix: value}
    flat = {}
    for key, item in value.items():
        if key in NOT_SHAPING:
            continue
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(item, dict) and item:
            flat.update(flatten(dotted, item))
        else:
            flat[dotted] = item
    return flat


def fingerprint(data) -> str:
    """A short stable hash of JSON-ready `data`."""
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_record(kind: str, settings: dict, inputs: dict | None = None, defaults: dict | None = None) -> dict:
    """The record of one output: its kind, code version, settings (and which of them hold their
    default, per `defaults`: key -> default value), inputs, and a fingerprint of them all in
    which settings at their defaults do not count (so an option added later does not change it)."""
    settings = dict(sorted(settings.items()))
    at_default = sorted(key for key, value in settings.items() if key in (defaults or {}) and defaults[key] == value)
    body = {"kind": kind, "code_version": CODE_VERSIONS[kind],
            "settings": {k: v for k, v in settings.items() if k not in at_default},
            "inputs": dict(sorted((inputs or {}).items()))}
    return {"kind": kind, "code_version": CODE_VERSIONS[kind], "settings": settings, "at_default": at_default,
            "inputs": body["inputs"], "fingerprint": fingerprint(body)}


def with_inputs(record: dict, inputs: dict, defaults: dict | None = None) -> dict:
    """`record` with `inputs` added (what a step read, known once it starts)."""
    settings = record["settings"]
    return make_record(record["kind"], settings, {**record["inputs"], **inputs},
                       defaults or {key: settings[key] for key in record.get("at_default", [])})


# Files up to this size are fingerprinted by their content (data files, configs, tokenizers); larger
# ones (model weights) by size and modification time, which costs nothing at any size.
CONTENT_HASH_LIMIT = 64 * 2**20


def path_fingerprint(path: str | Path) -> str:
    """A fingerprint of a user's file or folder as it is now: each file's relative name with its
    content hash (files up to CONTENT_HASH_LIMIT) or its size and modification time (larger ones).
    A path that does not exist (a Hub dataset name) is fingerprinted by its name alone."""
    path = Path(path).expanduser()
    if path.is_file():
        return fingerprint(_file_identity(path))
    if path.is_dir():
        entries = []
        for root, _, files in sorted(os.walk(path)):
            for name in sorted(files):
                full = Path(root) / name
                entries.append([str(full.relative_to(path)), _file_identity(full)])
        return fingerprint(entries)
    return fingerprint(["name", str(path)])


def _file_identity(path: Path) -> list:
    stat = path.stat()
    if stat.st_size <= CONTENT_HASH_LIMIT:
        return ["sha256", hashlib.sha256(path.read_bytes()).hexdigest()]
    return ["size-mtime", stat.st_size, int(stat.st_mtime)]


def read_record(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / RECORD).read_text())
    except (OSError, ValueError):
        return None


def write_record(folder: Path, record: dict) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECORD).write_text(json.dumps(record, indent=1) + "\n")


# The difference of an output whose model input (the stage it starts from or evaluates) was remade.
REMADE_INPUT = "its input model changed"


def differences(stored: dict | None, expected: dict) -> list[str]:
    """What differs between the record an output carries and the one the current config would
    write, one `key: old -> new` item each (settings, then inputs, then the code version).

    A key on one side only is a difference unless the record lacks it because the option did not
    exist when the record was written and the other side holds it at its default, or (an option
    since removed) the stored record held it at its default. A path that names data
    (`PATH_SETTINGS`) is compared by the content fingerprint beside it where both records hold one.
    """
    if stored is None:
        return ["(no record of the settings that made it)"]
    diffs = []
    old, new = stored.get("settings", {}), expected["settings"]
    old_inputs, new_inputs = stored.get("inputs", {}), expected["inputs"]
    old_default, new_default = set(stored.get("at_default", [])), set(expected.get("at_default", []))
    for key in sorted(set(old) | set(new)):
        content = PATH_SETTINGS.get(key)
        if content in old_inputs and content in new_inputs:
            continue  # the same path or another: the content input decides
        if key in old and key in new:
            if old[key] != new[key]:
                diffs.append(f"{key}: {_show(old, key)} -> {_show(new, key)}")
        elif not (key in new_default or key in old_default):
            diffs.append(f"{key}: {_show(old, key)} -> {_show(new, key)}")
    paths = {content: key for key, content in PATH_SETTINGS.items()}
    for key in sorted(set(old_inputs) | set(new_inputs)):
        if old_inputs.get(key) != new_inputs.get(key):
            if key not in old_inputs and key in paths and old.get(paths[key]) == new.get(paths[key]):
                continue  # recorded before the content was: the path it names is the same
            diffs.append(f"its input {key} changed")
    if stored.get("code_version") != expected["code_version"]:
        diffs.append(f"code version of {expected['kind']}: {stored.get('code_version')} -> {expected['code_version']}")
    return diffs


def _show(settings: dict, key: str) -> str:
    if key not in settings:
        return "<unset>"
    value = settings[key]
    return json.dumps(value) if isinstance(value, (str, list, dict)) else str(value)


@dataclasses.dataclass(frozen=True)
class Output:
    """One output folder of a run: the step that writes it, the steps it reads, the record it must
    carry (without the stamps of the stages it reads: `reads` names their folders)."""

    folder: Path
    step: str
    record: dict
    after: tuple = ()
    kind: str = "stage"  # "stage" (a trained or built model folder) or "eval" (an evaluation's folder)
    reads: Path | None = None  # the folder of the stage whose model this output starts from or evaluates

    def exists(self) -> bool:
        """Whether anything of this output is on disk: a finished or started stage, a finished evaluation."""
        if self.kind == "eval":
            return (self.folder / "summary.json").exists()
        return (self.folder / "model").exists() or (self.folder / "checkpoints").exists() or \
            (self.folder / RECORD).exists()

    def expected(self) -> dict:
        """The record this output must carry now: `record` with the stamp of the stage it reads as it is on disk."""
        if self.reads is None:
            return self.record
        return with_inputs(self.record, {"model": completion_stamp(self.reads)})


COMPLETE = "COMPLETE"


def completion_stamp(stage_dir: Path) -> str | None:
    """The stamp a finished stage wrote into model/COMPLETE (a fresh random id each time the stage
    finishes, so a stage remade with the same settings is told apart); None if it is not finished."""
    try:
        return (Path(stage_dir) / "model" / COMPLETE).read_text().strip() or "unstamped"
    except OSError:
        return None


def new_stamp() -> str:
    return uuid.uuid4().hex


def stale_outputs(outputs: list[Output], legacy: dict | None = None) -> tuple[dict, list]:
    """The existing outputs made otherwise than the config and the run directory now say, each with
    its differences; and those that carry no record but match `legacy` (the records the run
    directory's previous config.yaml implies, for outputs made before records were written), to be
    adopted. An output that reads a stale one is stale too ("its input model changed")."""
    stale, adopt, stale_steps = {}, [], set()
    for output in outputs:
        if not output.exists():
            continue
        expected = output.expected()
        stored = read_record(output.folder)
        if stored is None and legacy is not None and output.folder in legacy:
            stored = with_inputs(legacy[output.folder], {"model": expected["inputs"]["model"]}) \
                if "model" in expected["inputs"] else legacy[output.folder]
            if not differences(stored, expected):
                adopt.append(output)
                continue
        diffs = [] if stored is not None and stored.get("fingerprint") == expected["fingerprint"] else \
            differences(stored, expected)
        if not diffs and stale_steps & set(output.after):
            diffs = [REMADE_INPUT]
        if diffs:
            stale[output.folder] = diffs
            stale_steps.add(output.step)
    return stale, adopt


def dependants(outputs: list[Output], steps: set) -> set:
    """`steps` and every step that reads one of them, directly or through others."""
    found, grew = set(steps), True
    while grew:
        grew = False
        for output in outputs:
            if output.step not in found and found & set(output.after):
                found.add(output.step)
                grew = True
    return found


def describe_stale(run_dir: Path, outputs: list[Output], stale: dict) -> str:
    """The refusal: which keys differ (old -> new) for which steps, and the ways out."""
    by_folder = {output.folder: output for output in outputs}
    keys: dict[str, list[str]] = {}
    for folder, diffs in stale.items():
        for diff in diffs:
            keys.setdefault(diff, [])
            step = by_folder[folder].step
            if step not in keys[diff]:
                keys[diff].append(step)
    # A changed setting or user input (an edited data file) is a reason of its own; a changed model
    # input only follows from a stage that was remade, which its own line names.
    direct = [diff for diff in keys if diff != REMADE_INPUT]
    summary = "; ".join(direct[:6]) + (f"; and {len(direct) - 6} more" if len(direct) > 6 else "")
    steps = sorted({by_folder[folder].step for folder in stale})
    lines = [f"{run_dir} holds results made with other settings ({summary or 'a model they read was remade'}); nothing was "
             f"changed. Use a new --run-dir, or add --redo changed to redo the {len(steps)} affected step(s)"]
    for diff in direct:
        lines.append(f"  {diff}  (in {', '.join(keys[diff][:4])}{' ...' if len(keys[diff]) > 4 else ''})")
    downstream = sorted({step for diff, step_list in keys.items() if diff == REMADE_INPUT for step in step_list})
    if downstream:
        lines.append(f"  and what reads them: {', '.join(downstream[:8])}{' ...' if len(downstream) > 8 else ''}")
    return "\n".join(lines)
