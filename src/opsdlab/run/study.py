"""The study: every task preset × pipeline seeds × arms, one aggregate report per task.

Three arm sets (`STUDY_ARM_SETS`): "gates", OPSD's gates and the controls without privileged
information; "methods", OPSD against the other compaction methods (`methods.METHODS`), every arm at
one rollout-token budget (`methods_budget`); "ladder", the gates and the `none` control over the
trace-length ladder's rungs (`ladder.py`).

`run_study` runs, for each preset (a shipped config name or a YAML file), the whole pipeline over
`STUDY_SEEDS` (`pipeline.run_seeds`) with the `STUDY_ARMS`, into `<run_dir>/<preset>/`, and writes
that task's report over seeds (with the report writer it is given: `report.write_report`). Every part resumes: rerunning the same command skips what finished.
With `jobs` > 1 each (preset, seed) part runs as its own single-seed `opsdlab pipeline` process in
its `seed-<n>/` directory, that many at a time, each with its share of the CPU threads
(`run_parts`); the reports over all seeds are then written here, once every part has finished.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from opsdlab.config import ConfigError, load_config
from opsdlab.run.pipeline import run_seeds
from opsdlab.run.preflight import check_inputs
from opsdlab.run.rundir import check_seed_dirs, seed_config, write_config

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

# Which compaction to pick: the paper's OPSD (correct rollouts only) against the alternatives, each from
# the same RLVR checkpoint at one rollout-token budget (`methods.METHODS`, `methods_budget`). CRISP's
# teacher is re-copied every 5 updating steps, so that it refreshes at least twice within the budget
# (`methods_budget`; the method's own default, 50, is for runs of hundreds of steps).
METHOD_ARMS = (
    {"name": "opsd", "gate": "correct"},
    {"name": "crisp", "method": "crisp", "teacher_refresh_steps": 5},
    {"name": "contrast", "method": "contrastive"},
    {"name": "dler", "method": "length_rl"},
    {"name": "forced", "method": "budget"},
)
# The trace-length ladder (`configs/ladder-*.yaml`, `ladder.py`): the three gates and the control whose
# teacher reads the student's own prompt, so that a change it shares is not the reference's doing.
LADDER_ARMS = (
    {"name": "correct", "gate": "correct"},
    {"name": "incorrect", "gate": "incorrect"},
    {"name": "all", "gate": "all"},
    {"name": "none", "gate": "all", "teacher_context": "none"},
)
# The arm sets a study runs (`opsdlab study --arms`): the gates and their controls, the methods, the
# ladder's gates, or (None) each preset's own `arms`, for a study of arms written in a config file.
STUDY_ARM_SETS = {"gates": STUDY_ARMS, "methods": METHOD_ARMS, "ladder": LADDER_ARMS, "preset": None}


# The methods study's rollout-token budget (`methods_budget`), per preset: the mean response tokens per
# rollout that the default OPSD arm generated in the methods study of docs/findings.md ("Which compaction
# to pick"): TRL's num_tokens per rollout less the prompt's mean length, 49k / (20 x 8 x 4) - 34 = 42 on
# tiny and 65k / (25 x 8 x 4) - 43 = 38 on tiny-search.
METHOD_ROLLOUT_TOKENS = {"tiny": 42, "tiny-search": 38}
# Under the budget, `opsd.max_steps` is only the upper bound: this many times the preset's, room for an
# arm whose responses shorten to a third of the start's.
BUDGET_STEP_BOUND = 3


def methods_budget(preset: str, config) -> list[str]:
    """The overrides that put every arm of a methods study of the shipped preset `preset` (`config`: it
    loaded with the study's seeds and arms) at one rollout-token budget: `opsd.max_rollout_tokens` = what the default OPSD arm
    spends, its opsd.max_steps x prompts_per_step x rollouts_per_prompt rollouts of the preset's
    `METHOD_ROLLOUT_TOKENS` each, and `opsd.max_steps` = BUDGET_STEP_BOUND x the preset's. On tiny,
    20 x 8 x 4 x 42 = 26,880 tokens within 60 steps; on tiny-search, 25 x 8 x 4 x 38 = 30,400 within 75.
    CRISP's refresh every 5 steps (`METHOD_ARMS`) then comes at least twice unless its rollouts
    average over twice the default arm's length (10 steps or fewer). None for another preset or a
    config file (no known length): its arms train opsd.max_steps steps each."""
    per_rollout = METHOD_ROLLOUT_TOKENS.get(preset)
    if per_rollout is None:
        return []
    opsd = config.opsd
    budget = opsd.max_steps * opsd.prompts_per_step * opsd.rollouts_per_prompt * per_rollout
    return [f"opsd.max_rollout_tokens={budget}", f"opsd.max_steps={BUDGET_STEP_BOUND * opsd.max_steps}"]


def study_config(preset: str, run_dir: str | Path, seeds=STUDY_SEEDS, overrides: list[str] | None = None,
                 arms: str = "gates"):
    """The pipeline config of one task of the study: the preset with the study's seeds, arm set
    (`STUDY_ARM_SETS`) and run directory (`<run_dir>/<preset name>`), for the methods its rollout-token
    budget (`methods_budget`), then `overrides` (`key=value`, applied last: `opsd.max_rollout_tokens=N`
    sets another budget, `null` none)."""
    if arms not in STUDY_ARM_SETS:
        raise ConfigError(f"--arms: expected one of {', '.join(STUDY_ARM_SETS)}, got {arms!r}")
    forced = [f"run_dir={Path(run_dir) / Path(preset).stem}", f"seeds={json.dumps(list(seeds))}"]
    if STUDY_ARM_SETS[arms] is not None:
        forced.append(f"arms={json.dumps(list(STUDY_ARM_SETS[arms]))}")
    if arms == "methods":
        forced += methods_budget(preset, load_config(preset, forced))
    return load_config(preset, forced + list(overrides or []))


class StudyError(RuntimeError):
    """A part of the study failed; the message names each failed part and its log."""


def part(config, seed: int, redo=()) -> tuple[list[str], Path]:
    """One (preset, seed) part of the study: the command that runs that seed's single-seed pipeline
    from its resolved config (written here into its run directory) and the part's log file."""
    part_config = seed_config(config, seed)
    write_config(part_config, Path(part_config.run_dir))
    command = [sys.executable, "-m", "opsdlab.cli", "pipeline", "--config",
               str(Path(part_config.run_dir) / "config.yaml")] + ([f"--redo={','.join(redo)}"] if redo else [])
    return command, Path(config.run_dir) / f"seed-{seed}.log"


def run_parts(parts: list[tuple[list[str], Path]], jobs: int, env: dict | None = None,
              poll_seconds: float = 0.5) -> dict[Path, int]:
    """Run each (command, log file) with at most `jobs` running at once; the exit code per log.

    Every part runs to its end even when another fails (each is a resumable run of its own); the
    caller decides what a failure means.
    """
    if jobs < 1:
        raise ConfigError(f"jobs: expected a positive number of processes, got {jobs}")
    waiting, running, codes = list(parts), [], {}
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                command, log = waiting.pop(0)
                log.parent.mkdir(parents=True, exist_ok=True)
                handle = open(log, "w")
                running.append((subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env),
                                handle, log))
            for entry in list(running):
                process, handle, log = entry
                if process.poll() is not None:
                    handle.close()
                    codes[log] = process.returncode
                    running.remove(entry)
            if running:
                time.sleep(poll_seconds)
    finally:  # interrupted: stop the parts still running (each resumes on the next call)
        for process, handle, _ in running:
            process.terminate()
            process.wait()
            handle.close()
    return codes


def _threads_per_job(jobs: int) -> str:
    """OMP_NUM_THREADS for each of `jobs` processes: the caller's setting, else an even share of the cores."""
    return os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // jobs))


def run_study(run_dir: str | Path, presets=STUDY_PRESETS, seeds=STUDY_SEEDS,
              overrides: list[str] | None = None, jobs: int = 1, redo=(), arms: str = "gates", *,
              write_report: Callable[[Path], Path]) -> dict[str, dict]:
    """Run (or resume) every preset of the study and write its report (`write_report(run_dir)` -> the
    report's path; the report layer's, which the caller passes); per preset, the report path and the
    wall time of this call in seconds (with `jobs` > 1: the time to resume it and write its report
    after every part ran; the parts' wall time is printed)."""
    names = [Path(preset).stem for preset in presets]
    if not presets or len(set(names)) != len(names):
        raise ConfigError(f"presets: expected distinct preset names (each gets <run_dir>/<name>), got {list(presets)}")
    if jobs < 1:
        raise ConfigError(f"jobs: expected a positive number of processes, got {jobs}")
    configs = [study_config(preset, run_dir, seeds, overrides, arms) for preset in presets]  # bad input fails first
    for preset, config in zip(presets, configs):
        if arms == "methods" and config.opsd.max_rollout_tokens is None:
            print(f"[study] {preset}: its method arms have no rollout-token budget (methods_budget knows "
                  f"{', '.join(METHOD_ROLLOUT_TOKENS)}); each trains opsd.max_steps steps; set "
                  "opsd.max_rollout_tokens=N for one budget", flush=True)
    for config in configs:  # missing inputs, or a part made with other settings, fail now, before anything is written
        check_inputs(config)
        check_seed_dirs(config, redo)
    if jobs > 1:
        # The parts already fill the cores, and the pass that writes the reports only finds finished work.
        configs = [replace(config, workers=1) for config in configs]
        for config in configs:
            write_config(config, Path(config.run_dir))
        parts = [part(config, seed, redo) for config in configs for seed in seeds]
        start = time.time()
        codes = run_parts(parts, jobs, env={**os.environ, "OMP_NUM_THREADS": _threads_per_job(jobs)})
        failed = [str(log) for log, code in codes.items() if code != 0]
        print(f"[study] {len(parts)} parts, {jobs} at a time: {time.time() - start:.0f}s", flush=True)
        if failed:
            raise StudyError(f"study: {len(failed)} of {len(parts)} parts failed; see {', '.join(failed)} "
                             "(rerun the same command to resume)")
    done = {}
    for preset, config in zip(presets, configs):
        start = time.time()
        report = write_report(run_seeds(config, () if jobs > 1 else redo))
        done[preset] = {"report": report, "seconds": time.time() - start}
        print(f"[study] {preset}: {done[preset]['seconds']:.0f}s, report {report}", flush=True)
    return done
