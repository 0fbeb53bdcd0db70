"""What produced each output of a run directory, and what a rerun with other settings must redo.

Every output of a run (the base model, each trained stage, each evaluation) has a *record*
beside it, `settings.json`: the config values that shape that output as dotted keys, the
fingerprints of what it read (the record of the step that made its input model, or the files of
a user's folder) and the version of the code that makes that kind of output. A record's
fingerprint is a hash of all three, so a step's record changes whenever anything upstream of it
does.

A rerun compares the record each existing output carries with the one the current config
would write (`stale_outputs`). Equal: the output is kept and the step skipped. Different: the
rerun stops before doing anything and names every key that differs (`describe_stale`), unless
the user asked to redo it (`--redo changed`, or a stage by name and what reads it). So a run
directory never holds an output made with settings other than the ones its record, and its
config.yaml, name.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

RECORD = "settings.json"

# Bump a kind's version when a code change alters what that kind of step produces from the same
# settings: every output of that kind made before then is stale.
CODE_VERSIONS = {"base": 1, "sft": 1, "rlvr": 1, "opsd": 1, "evaluate": 1}

# Stage options that never reach an output file (where logs are sent); leaving them out lets a
# rerun turn tracking on without redoing anything.
NOT_SHAPING = frozenset({"report_to"})


def plain(value):
    """JSON-ready form of config values: tuples as lists, dataclasses as dicts."""
    import dataclasses

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


def make_record(kind: str, settings: dict, inputs: dict | None = None) -> dict:
    """The record of one output: its kind, code version, settings and inputs, with their fingerprint."""
    body = {"kind": kind, "code_version": CODE_VERSIONS[kind], "settings": dict(sorted(settings.items())),
            "inputs": dict(sorted((inputs or {}).items()))}
    return {**body, "fingerprint": fingerprint(body)}


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


def differences(stored: dict | None, expected: dict) -> list[str]:
    """What differs between the record an output carries and the one the current config would
    write, one `key: old -> new` item each (settings, then inputs, then the code version)."""
    if stored is None:
        return ["(no record of the settings that made it)"]
    diffs = []
    old, new = stored.get("settings", {}), expected["settings"]
    for key in sorted(set(old) | set(new)):
        if key not in old or key not in new or old[key] != new[key]:
            diffs.append(f"{key}: {_show(old, key)} -> {_show(new, key)}")
    old_inputs, new_inputs = stored.get("inputs", {}), expected["inputs"]
    for key in sorted(set(old_inputs) | set(new_inputs)):
        if old_inputs.get(key) != new_inputs.get(key):
            diffs.append(f"its input {key} changed")
    if stored.get("code_version") != expected["code_version"]:
        diffs.append(f"code version of {expected['kind']}: {stored.get('code_version')} -> {expected['code_version']}")
    return diffs


def _show(settings: dict, key: str) -> str:
    if key not in settings:
        return "<unset>"
    value = settings[key]
    return json.dumps(value) if isinstance(value, (str, list, dict)) else str(value)


@dataclass(frozen=True)
class Output:
    """One output folder of a run: the step that writes it, the steps it reads, its expected record."""

    folder: Path
    step: str
    record: dict
    after: tuple = ()
    kind: str = "stage"  # "stage" (a trained or built model folder) or "eval" (an evaluation's folder)

    def exists(self) -> bool:
        """Whether anything of this output is on disk: a finished or started stage, a finished evaluation."""
        if self.kind == "eval":
            return (self.folder / "summary.json").exists()
        return (self.folder / "model").exists() or (self.folder / "checkpoints").exists() or \
            (self.folder / RECORD).exists()


@dataclass
class Plan:
    """What a rerun does with the outputs already in a run directory."""

    stale: dict = field(default_factory=dict)   # folder -> differences, for outputs that must be redone
    redo: list = field(default_factory=list)     # outputs the user asked to redo (stale or not) and what reads them
    adopt: list = field(default_factory=list)    # outputs made before records existed, matching the config


def stale_outputs(outputs: list[Output], legacy: dict | None = None) -> tuple[dict, list]:
    """The existing outputs whose record differs from the expected one, with their differences; and
    those that carry no record but match `legacy` (the records the run directory's previous
    config.yaml implies, for outputs made before records were written), to be adopted."""
    stale, adopt = {}, []
    for output in outputs:
        if not output.exists():
            continue
        stored = read_record(output.folder)
        if stored is None and legacy is not None and output.folder in legacy:
            stored = legacy[output.folder]
            if stored["fingerprint"] == output.record["fingerprint"]:
                adopt.append(output)
                continue
        if stored is None or stored.get("fingerprint") != output.record["fingerprint"]:
            stale[output.folder] = differences(stored, output.record)
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
    direct = [diff for diff in keys if not diff.startswith("its input ")]
    summary = "; ".join(direct[:6]) + (f"; and {len(direct) - 6} more" if len(direct) > 6 else "")
    steps = sorted({by_folder[folder].step for folder in stale})
    lines = [f"{run_dir} holds results made with other settings ({summary or 'inputs changed'}); nothing was "
             f"changed. Use a new --run-dir, or add --redo changed to redo the {len(steps)} affected step(s)"]
    for diff in direct:
        lines.append(f"  {diff}  (in {', '.join(keys[diff][:4])}{' ...' if len(keys[diff]) > 4 else ''})")
    downstream = sorted({step for diff, step_list in keys.items() if diff.startswith("its input ")
                         for step in step_list})
    if downstream:
        lines.append(f"  and what reads them: {', '.join(downstream[:8])}{' ...' if len(downstream) > 8 else ''}")
    return "\n".join(lines)
