"""Reading a run directory: its evaluated checkpoints in pipeline order, their evaluation summaries
and samples, its config and its `seed-<n>/` folders. The report modules read checkpoints and
evaluations through these, so that a checkpoint's name and an evaluation's place on disk are parsed
in one place.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from opsdlab.evaluation.evaluate import read_samples
from opsdlab.modeling.runtime import read_updates, skipped_note


def checkpoint_order(run_dir: Path) -> list[str]:
    """Evaluated checkpoints in pipeline order: base, sft, rlvr, then OPSD arms as configured."""
    names = [p.name for p in (run_dir / "eval").iterdir() if p.is_dir()] if (run_dir / "eval").is_dir() else []
    fixed = [n for n in ("base", "sft", "rlvr") if n in names]
    return fixed + sorted(n for n in names if n.startswith("opsd-"))


def arm_of(checkpoint: str) -> str:
    """The OPSD arm of a checkpoint name: `opsd-correct-s1` -> `correct`."""
    return checkpoint.removeprefix("opsd-").rsplit("-s", 1)[0]


def opsd_seed_of(checkpoint: str) -> int:
    """The OPSD seed of a checkpoint name: `opsd-correct-s1` -> 1."""
    return int(checkpoint.rsplit("-s", 1)[1])


def reference_of(names: list[str]) -> str | None:
    """The checkpoint OPSD arms are compared with: their starting point, RLVR (else SFT)."""
    return "rlvr" if "rlvr" in names else ("sft" if "sft" in names else None)


def is_main_set(folder_name: str) -> bool:
    """An evaluation folder of the student prompt with sampling (not -greedy, not a teacher prompt)."""
    return not folder_name.endswith("-greedy") and "-teacher-" not in folder_name


def load_eval(run_dir: Path, checkpoint: str, set_name: str) -> dict | None:
    path = run_dir / "eval" / checkpoint / set_name / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def _samples(run_dir: Path, checkpoint: str, folder: str):
    path = run_dir / "eval" / checkpoint / folder / "samples.jsonl"
    return read_samples(path) if path.exists() else None


def k_of(run_dirs, set_name: str) -> int | str:
    """Samples per problem of the set's evaluations in these run directories (the k of avg@k); "k"
    when none is finished."""
    return next((s["samples_per_problem"] for d in run_dirs for n in checkpoint_order(d)
                 if (s := load_eval(d, n, set_name))), "k")


def run_config(run_dir: Path) -> dict:
    """The run's config.yaml as a dict (empty when the folder has none)."""
    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def seed_dirs(run_dir: Path) -> dict[int, Path]:
    """The `seed-<n>/` run directories of a run over pipeline seeds, by seed; empty for a single run."""
    found = {}
    for path in run_dir.glob("seed-*"):
        if path.is_dir() and (match := re.fullmatch(r"seed-(\d+)", path.name)):
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def _union_order(orders: list[list[str]]) -> list[str]:
    names = {n for order in orders for n in order}
    fixed = [n for n in ("base", "sft", "rlvr") if n in names]
    return fixed + sorted(names - set(fixed))


def stage_folder(run_dir: Path, checkpoint: str) -> Path:
    """The stage folder that trained a checkpoint: `sft/`, `rlvr/`, `opsd/<arm>-s<seed>/`."""
    return run_dir / "opsd" / checkpoint.removeprefix("opsd-") if checkpoint.startswith("opsd-") else run_dir / checkpoint


def training_warning(run_dir: Path, checkpoint: str) -> str | None:
    """What a checkpoint's stage skipped (an OPSD arm whose gate kept no rollout in some steps), or None."""
    return skipped_note(read_updates(stage_folder(run_dir, checkpoint)))


def training_warnings(run_dirs: dict) -> list[str]:
    """One Findings line per checkpoint whose stage skipped steps, `run_dirs` labelled (a seed's "seed 0 ")."""
    return [f"- **WARNING**: {label}`{name}`: {note}" for label, run_dir in run_dirs.items()
            for name in checkpoint_order(run_dir) if (note := training_warning(run_dir, name))]
