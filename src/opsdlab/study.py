"""The study: every task preset × pipeline seeds × OPSD arms and controls, one aggregate report per task.

`run_study` runs, for each preset (a shipped config name or a YAML file), the whole pipeline over
`STUDY_SEEDS` (`pipeline.run_seeds`) with the `STUDY_ARMS`, into `<run_dir>/<preset>/`, and writes
that task's report over seeds. Every part resumes: rerunning the same command skips what finished.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from opsdlab.config import ConfigError, load_config
from opsdlab.pipeline import run_seeds
from opsdlab.report import write_report

STUDY_PRESETS = ("tiny", "tiny-search")
STUDY_SEEDS = (0, 1, 2)
# The three gates, then the controls without privileged information on the `all` gate (compare each
# with the `all` arm): an instruction, the student's own prompt, and another problem's solution.
STUDY_ARMS = (
    {"name": "all", "gate": "all"},
    {"name": "correct", "gate": "correct"},
    {"name": "incorrect", "gate": "incorrect"},
    {"name": "concise", "gate": "all", "teacher_context": "concise"},
    {"name": "none", "gate": "all", "teacher_context": "none"},
    {"name": "unrelated", "gate": "all", "teacher_context": "unrelated"},
)


def study_config(preset: str, run_dir: str | Path, seeds=STUDY_SEEDS, overrides: list[str] | None = None):
    """The pipeline config of one task of the study: the preset with the study's seeds, arms and
    run directory (`<run_dir>/<preset name>`), then `overrides` (`key=value`, applied last)."""
    forced = [f"run_dir={Path(run_dir) / Path(preset).stem}", f"seeds={json.dumps(list(seeds))}",
              f"arms={json.dumps(list(STUDY_ARMS))}"]
    return load_config(preset, forced + list(overrides or []))


def run_study(run_dir: str | Path, presets=STUDY_PRESETS, seeds=STUDY_SEEDS,
              overrides: list[str] | None = None) -> dict[str, dict]:
    """Run (or resume) every preset of the study and write its report; per preset, the report path
    and the wall time of this call in seconds."""
    names = [Path(preset).stem for preset in presets]
    if not presets or len(set(names)) != len(names):
        raise ConfigError(f"presets: expected distinct preset names (each gets <run_dir>/<name>), got {list(presets)}")
    configs = [study_config(preset, run_dir, seeds, overrides) for preset in presets]  # bad input fails first
    done = {}
    for preset, config in zip(presets, configs):
        start = time.time()
        report = write_report(run_seeds(config))
        done[preset] = {"report": report, "seconds": time.time() - start}
        print(f"[study] {preset}: {done[preset]['seconds']:.0f}s, report {report}", flush=True)
    return done
