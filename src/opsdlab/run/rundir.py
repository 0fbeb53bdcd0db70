"""The run directory's own files and its agreement with the config.

What the main process writes while the other processes wait: the log (`summary.jsonl`, `log`), a
finished stage's mark (`model/COMPLETE`, `finish_stage`) and `config.yaml` (`write_config`). Before
any step runs, `prepare_run_dir` keeps the outputs made with these settings, removes those `--redo`
names (continuing a stage that only grew a constant-rate max_steps), and refuses any other difference
having changed nothing; `check_seed_dirs` does so for every seed's directory of a run over seeds
(`seed_config`: a single-seed run in `seed-<n>/`).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from opsdlab.config import ConfigError, PipelineConfig, dump_config
from opsdlab.modeling.runtime import is_main_process, main_decides, peak_memory_mb, wait_for_everyone
from opsdlab.run.outputs import run_outputs
from opsdlab.run.provenance import (COMPLETE, Output, dependants, describe_stale, differences, new_stamp,
                                    read_record, stale_outputs, write_record)


def log(run_dir: Path, message: str, **record) -> None:
    """Print `message` and append it to summary.jsonl with the writing process's peak memory so far
    (main process only; other processes do nothing)."""
    if not is_main_process():
        return
    print(message, flush=True)
    line = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "message": message, **record, **peak_memory_mb()}
    with open(run_dir / "summary.jsonl", "a") as handle:
        handle.write(json.dumps(line) + "\n")


def is_complete(stage_dir: Path) -> bool:
    return (stage_dir / "model" / COMPLETE).exists()


def stage_done(stage_dir: Path) -> bool:
    """Whether a stage is finished, as the main process sees it, on every process."""
    return main_decides(lambda: is_complete(stage_dir))


def finish_stage(run_dir: Path, stage_dir: Path, message: str, **record) -> None:
    """Mark a trained stage complete and log it on the main process; every process waits for it."""
    if is_main_process():
        (stage_dir / "model" / COMPLETE).write_text(new_stamp())  # what later outputs record they read
        log(run_dir, message, **record)
    wait_for_everyone()


def write_config(config: PipelineConfig, run_dir: Path) -> None:
    """The resolved config into `run_dir/config.yaml`, by the main process; every process waits."""
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(config, run_dir / "config.yaml")
    wait_for_everyone()


# What `--redo` takes besides "changed" (every output whose settings differ): a stage, every
# evaluation, or one OPSD arm by its checkpoint name.
REDO_STAGES = {"base": "build base", "sft": "train sft", "rlvr": "train rlvr"}


def redo_steps(outputs: list[Output], redo, stale: dict) -> set:
    """The steps `--redo` names (and every step that reads one of them)."""
    steps = {output.step for output in outputs}
    chosen = set()
    for target in redo:
        if target == "changed":
            chosen |= {output.step for output in outputs if output.folder in stale}
        elif target == "eval":
            chosen |= {output.step for output in outputs if output.kind == "eval"}
        elif target == "opsd":
            chosen |= {step for step in steps if step.startswith("train opsd-")}
        elif REDO_STAGES.get(target) in steps or f"train {target}" in steps:
            chosen.add(REDO_STAGES.get(target) or f"train {target}")
        else:
            arms = sorted(step.split(" ", 1)[1] for step in steps if step.startswith("train opsd-"))
            valid = ["changed", *[name for name, step in REDO_STAGES.items() if step in steps],
                     *(["opsd"] if arms else []), "eval", *arms]
            raise ConfigError(f"--redo {target}: not a stage of this run; valid: {', '.join(valid)}")
    return dependants(outputs, chosen)


def legacy_records(config: PipelineConfig, outputs: list[Output]) -> dict | None:
    """For outputs made before records were written: the records that the run directory's
    config.yaml (the settings it was last run with) implies; None if there is no such output."""
    if all(read_record(output.folder) is not None for output in outputs if output.exists()):
        return None
    from opsdlab.config import load_config

    try:
        previous = load_config(Path(config.run_dir) / "config.yaml")
    except (ConfigError, ValueError, OSError):
        return None
    previous = replace(previous, run_dir=config.run_dir, seeds=(), workers=config.workers)
    return {output.folder: output.record for output in run_outputs(previous)}


# A trained stage whose only difference is a larger max_steps is continued from its last checkpoint
# when its learning rate does not depend on max_steps (transformers' schedule names); under any other
# schedule the longer run's rates differ from the first step on, and the stage is retrained.
STEADY_SCHEDULES = ("constant", "constant_with_warmup")


def longer_run(stored: dict | None, expected: dict) -> tuple[str, bool, str] | None:
    """For a trained stage whose record differs from the current one only in a larger `<stage>.max_steps`:
    that difference, whether the longer run continues the stage (`STEADY_SCHEDULES`), and why; else None."""
    section = expected["kind"]
    if stored is None or section not in ("sft", "rlvr", "opsd"):
        return None
    key = f"{section}.max_steps"
    diffs = differences(stored, expected)
    if len(diffs) != 1 or not diffs[0].startswith(f"{key}: "):
        return None
    old, new = stored["settings"].get(key), expected["settings"].get(key)
    if not (isinstance(old, int) and isinstance(new, int) and new > old):
        return None
    schedule = expected["settings"].get(f"{section}.lr_scheduler_type")
    if schedule not in STEADY_SCHEDULES:
        return diffs[0], False, (f"--redo changed retrains it from the start: its {schedule} learning rate decays over "
                                 "max_steps, so a longer run is not the shorter one continued")
    if schedule == "constant_with_warmup" and expected["settings"].get(f"{section}.warmup_ratio"):
        return diffs[0], False, (f"--redo changed retrains it from the start: its warmup is {section}.warmup_ratio x "
                                 "max_steps, so a longer run is not the shorter one continued")
    return diffs[0], True, (f"--redo changed continues it from its last checkpoint: its {schedule} learning rate "
                            "does not depend on max_steps")


def _differing(config: PipelineConfig, redo) -> tuple[list[Output], dict, list, set, dict]:
    """The run's outputs; those made with other settings (a larger max_steps said with what a redo does);
    those to adopt; the steps `redo` names; and the differing outputs `redo` does not cover."""
    outputs = run_outputs(config)
    stale, adopt = stale_outputs(outputs, legacy_records(config, outputs))
    for output in outputs:
        if output.folder in stale and (longer := longer_run(read_record(output.folder), output.expected())):
            stale[output.folder] = [f"{longer[0]} ({longer[2]})"]
    chosen = redo_steps(outputs, redo, stale)
    step_of = {output.folder: output.step for output in outputs}
    remaining = {folder: diffs for folder, diffs in stale.items() if step_of[folder] not in chosen}
    return outputs, stale, adopt, chosen, remaining


def check_run_dir(config: PipelineConfig, redo=()) -> list[tuple[str, str]]:
    """Make the run directory agree with `config` before any step runs; the lines to say, each with
    its kind: "redo" and "notice" lines go to the run log, "print" lines (said on every rerun) only
    to the screen.

    Outputs whose record matches are kept. Outputs named by `redo` (and what reads them) are
    removed, to be made again; but a stage that `--redo changed` redoes for a larger max_steps alone,
    with a learning rate that does not depend on it, keeps its checkpoints and continues from the last
    (`continued`), unless a stage it reads is redone or `redo` names it. If any other output was made
    with other settings, raise a ConfigError naming them, having changed nothing.
    """
    outputs, stale, adopt, chosen, remaining = _differing(config, redo)
    if remaining:
        raise ConfigError(describe_stale(Path(config.run_dir), outputs, remaining))
    named = redo_steps(outputs, [target for target in redo if target != "changed"], stale)
    lines = []
    for output in outputs:
        if output.step in chosen and output.exists():
            folder = output.folder.relative_to(config.run_dir)
            if output.step not in named and not chosen & set(output.after) and (longer := continued(output)):
                shutil.rmtree(output.folder / "model", ignore_errors=True)  # its checkpoints stay
                lines.append(("redo", f"[redo] {folder}: {output.step} continues from its last checkpoint ({longer})"))
                continue
            why = "; ".join(stale.get(output.folder, [])[:3]) or "asked with --redo"
            shutil.rmtree(output.folder)
            lines.append(("redo", f"[redo] removed {folder} to redo {output.step} ({why})"))
    for output in adopt:
        write_record(output.folder, output.expected())
    extra = unplanned_outputs(Path(config.run_dir), outputs)
    if extra:
        shown = ", ".join(str(folder.relative_to(config.run_dir)) for folder in extra[:4])
        lines.append(("print", f"[pipeline] kept {len(extra)} output(s) that this config does not make ({shown}"
                               f"{' ...' if len(extra) > 4 else ''}); each carries the settings that made it, and "
                               "the report shows them"))
    if adopt:
        lines.append(("notice", f"[pipeline] recorded the settings of {len(adopt)} earlier output(s) from "
                                "config.yaml (they were made before outputs carried their settings)"))
    return lines


def continued(output: Output) -> str | None:
    """The difference (`max_steps: old -> new`) for which a stage made with other settings is continued
    rather than redone (`longer_run`): a larger max_steps alone, a learning rate that does not depend
    on it, and a checkpoint to resume from; None otherwise."""
    longer = longer_run(read_record(output.folder), output.expected())
    if longer and longer[1] and any((output.folder / "checkpoints").glob("checkpoint-*")):
        return longer[0]
    return None


def unplanned_outputs(run_dir: Path, outputs: list[Output]) -> list[Path]:
    """Trained arms and evaluations in the run directory that the current config does not make
    (say an arm since removed, or greedy evaluations after eval.greedy=false)."""
    planned = {output.folder for output in outputs}
    found = [*run_dir.glob("opsd/*"), *run_dir.glob("eval/*/*"), *run_dir.glob("budget/*")]
    return sorted(folder for folder in found if folder.is_dir() and folder not in planned)


def prepare_run_dir(config: PipelineConfig, redo=()) -> None:
    """`check_run_dir` on the main process (every process gets its verdict), then config.yaml written."""
    run_dir = Path(config.run_dir)

    def decide():
        try:
            return None, check_run_dir(config, redo)
        except ConfigError as error:
            return str(error), []

    error, lines = main_decides(decide)
    if error:
        raise ConfigError(error)
    write_config(config, run_dir)
    for kind, line in lines:
        if kind != "print":
            log(run_dir, line, kind=kind)
        elif is_main_process():
            print(line, flush=True)


def seed_run_dir(run_dir: str | Path, seed: int) -> Path:
    """Where `run_seeds` puts pipeline seed `seed`: a complete single-seed run directory."""
    return Path(run_dir) / f"seed-{seed}"


def seed_config(config: PipelineConfig, seed: int) -> PipelineConfig:
    """Pipeline seed `seed` of a run over seeds: a single-seed run in its `seed-<n>/` directory."""
    return replace(config, seed=seed, seeds=(), run_dir=str(seed_run_dir(config.run_dir, seed)))


def check_seed_dirs(config: PipelineConfig, redo=()) -> None:
    """Refuse a run over seeds before any seed runs if a seed's directory holds outputs made with
    other settings that `redo` does not name (each seed's run then redoes what `redo` names)."""
    def decide():
        for seed in config.seeds:
            seed_run = seed_config(config, seed)
            try:
                outputs, _, _, _, remaining = _differing(seed_run, redo)
            except ConfigError as error:
                return str(error)
            if remaining:
                return describe_stale(Path(seed_run.run_dir), outputs, remaining)
        return None

    error = main_decides(decide)
    if error:
        raise ConfigError(error)
