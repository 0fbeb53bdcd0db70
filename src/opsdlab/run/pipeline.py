"""The one place that chains stages: base -> SFT -> RLVR -> OPSD arms, evaluated at every boundary.

A run directory holds everything a report needs and is how a run resumes:

    config.yaml                 resolved config
    summary.jsonl               one line per finished stage or evaluation: seconds, peak memory
    base/model/                 the starting model (built here for the tiny default)
    sft/ rlvr/                  model/ (final HF folder), checkpoints/, metrics.jsonl
    sft/probe.jsonl             with sft.probe_every: student and teacher accuracy per probed step
    opsd/<arm>-s<seed>/         model/, checkpoints/, metrics.jsonl, token_stats.jsonl, updates.json
                                (its steps, and those skipped: `runtime.skipped_note`) (each arm's
                                compaction method: `config.methods.METHODS`; a `budget` arm trains nothing)
    eval/<checkpoint>/<set>/    summary.json, samples.jsonl (also <set>-greedy, <set>-teacher-<context>)
    budget/<arm>/               a budget arm with quantile budgets: the starting checkpoint's sampled
                                responses to training problems, whose lengths set its budgets

A finished stage has `model/COMPLETE`; a finished evaluation has `summary.json`. Rerunning skips
both, and a stage killed midway resumes from its last checkpoint; nothing finished is rewritten.

Under a multi-process launch (`accelerate launch`, torchrun) every process runs this function:
every process trains each stage (the Trainer splits the batch), and each evaluates a share of the
problems (`evaluate.evaluate_sharded`). The main process alone builds the base model and writes the run
directory's files; whether a stage or evaluation is finished is decided on the main process and
shared (`runtime.main_decides`), so every process skips the same work. A process group is started
only under such a launch; a plain `python` run stays a single process.

With `seeds: [0, 1, 2]` (`run_seeds`), the run directory holds `config.yaml`, `report/` and one
such single-seed run directory per seed, `seed-<n>/`.

The work after the base model is a list of steps (`plan.pipeline_steps`: train a stage, evaluate a
checkpoint, check a teacher prompt), each naming the steps whose outputs it reads. One process runs
them in list order. With `workers: N` (> 1, single-process runs only) N worker processes run every
step whose inputs are finished, side by side: the SFT evaluation beside RLVR, the RLVR evaluation
beside the OPSD arms. Each step seeds itself, so the outputs are those of the single-process order;
on a CPU whose results do not depend on the thread count they are identical to the last digit.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.forkserver
from pathlib import Path

import torch

from opsdlab.config import ConfigError, PipelineConfig
from opsdlab.modeling.runtime import launch_processes
from opsdlab.run.plan import pipeline_steps
from opsdlab.run.preflight import check_inputs, memory_forecast
from opsdlab.run.problems import check_problem_sets
from opsdlab.run.rundir import check_seed_dirs, log, prepare_run_dir, seed_config, write_config
from opsdlab.run.steps import STEP_KINDS, open_run
from opsdlab.run.train_steps import prepare_base
from opsdlab.run.workers import run_in_workers
from opsdlab.modeling.console import progress_drawn_as


def run_pipeline(config: PipelineConfig, redo=()) -> Path:
    """Run (or resume) every configured stage and evaluation; return the run directory.

    Outputs already in the run directory are kept if they were made with these settings;
    `redo` names outputs to make again (`check_run_dir`). Any other difference stops the run
    before anything is changed.
    """
    processes = launch_processes()
    config.check_batches(processes)  # an uneven batch fails now, not after the stages before it
    run = open_run(config)
    check_problem_sets(run)  # shared problems fail now, before the run directory is touched
    run_dir = Path(config.run_dir)
    prepare_run_dir(config, redo)
    workers = config.workers if processes == 1 else 1
    if workers > 1:
        _start_forkserver()  # its imports overlap with the steps that run before any worker is needed
    elif config.workers > 1:
        log(run_dir, f"[pipeline] workers: {config.workers} applies to single-process runs; under this launch of "
                     f"{processes} processes every stage splits over them, so the steps run in order", kind="notice")
    torch.manual_seed(config.seed)
    # With workers, every line of the run is whole, as the workers' are (`_run_step_in_worker`).
    with progress_drawn_as("lines") if workers > 1 else contextlib.nullcontext():
        steps = pipeline_steps(config, prepare_base(run_dir, config, run.task))
        if workers == 1:
            for step in steps:
                STEP_KINDS[step.kind](run, step)
        else:
            run_in_workers(config, steps, workers)
    return run_dir


def _start_forkserver() -> None:
    """Start the fork server that worker processes come from, with the pipeline already imported in it:
    a worker then starts in milliseconds, not the seconds that importing torch, transformers and TRL take,
    and it forks from a process that never ran a parallel region, so its own thread pool is fresh."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(["opsdlab.run.pipeline"])
    multiprocessing.forkserver.ensure_running()


def run_seeds(config: PipelineConfig, redo=()) -> Path:
    """`run_pipeline` once per entry of `config.seeds`, each in its own `seed-<n>/` run directory.

    Each seed is a normal single-seed run (`seed: n`, its own SFT, RLVR and OPSD arms), so it
    resumes, and reports, on its own; the top-level run directory holds the config and the
    aggregate report (`report.write_report`). Without `seeds`, this is `run_pipeline(config)`.
    """
    run_dir = Path(config.run_dir)
    check_inputs(config)
    gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    for line in memory_forecast(config, gpu, launch_processes()):
        print(line, flush=True)
    if not config.seeds:
        if any(p.is_dir() for p in run_dir.glob("seed-*")):
            raise ConfigError(f"seeds: {run_dir} holds a run over seeds; set seeds (see its config.yaml) or "
                              "give another run_dir")
        return run_pipeline(config, redo)
    if (run_dir / "summary.jsonl").exists():
        raise ConfigError(f"seeds: {run_dir} holds a single-seed run; give another run_dir")
    check_seed_dirs(config, redo)
    write_config(config, run_dir)
    for seed in config.seeds:
        run_pipeline(seed_config(config, seed), redo)
    return run_dir
