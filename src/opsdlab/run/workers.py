"""Steps side by side (`workers: N`): each step in a worker process of its own, started from the fork
server as soon as the steps it reads have finished, the longest chain of steps first, with a share
of this process's threads; a failed or interrupted step stops the others cleanly, and what they
finished is kept for the rerun to resume from.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import sys
import time

import torch

from opsdlab.config import PipelineConfig
from opsdlab.run.plan import Step
from opsdlab.run.steps import STEP_KINDS, open_run
from opsdlab.modeling.console import close_bars, progress_drawn_as


class StepError(RuntimeError):
    """A step failed in a worker process; the message names it."""


# A worker's exit code when a Ctrl-C stopped it (128 + SIGINT, as a shell reports it).
INTERRUPTED_EXIT = 130


def _run_step_in_worker(config: PipelineConfig, step: Step, threads: int) -> None:
    """One step in a worker process, its progress as whole lines, since other workers share the terminal.
    A Ctrl-C reaches every process of the terminal's process group: the worker then exits quietly with
    INTERRUPTED_EXIT (the main process says what to do), not with a traceback of its own; what it
    finished is kept and its stage resumes from its last checkpoint."""
    try:
        torch.set_num_threads(threads)
        with progress_drawn_as("lines"):
            STEP_KINDS[step.kind](open_run(config), step)
    except KeyboardInterrupt:
        close_bars()
        sys.exit(INTERRUPTED_EXIT)


# Rough relative cost of each kind of step, for the order in which ready steps start: a training
# stage takes several times as long as one checkpoint's evaluations on the demo and on real models.
STEP_COSTS = {"sft": 4, "rlvr": 4, "opsd": 4, "evaluate": 1, "check": 1, "budget": 1, "lengths": 1}


def step_priorities(steps: list[Step]) -> dict:
    """Each step's cost plus the costliest chain of steps that read its output (the longest path to
    the end of the run, by `STEP_COSTS`): starting the highest first keeps the chain that decides
    when the run ends moving, and leaves the evaluations, which nothing long waits for, to fill gaps."""
    readers = {step.name: [other for other in steps if step.name in other.after] for step in steps}
    priorities: dict = {}

    def priority(step: Step) -> int:
        if step.name not in priorities:
            priorities[step.name] = STEP_COSTS[step.kind] + max((priority(r) for r in readers[step.name]), default=0)
        return priorities[step.name]

    for step in steps:
        priority(step)
    return priorities


def steps_to_start(waiting: list[Step], finished: set, running: int, workers: int, threads: int,
                   priorities: dict | None = None) -> list[tuple[Step, int]]:
    """Which waiting steps to start now, and with how many threads each.

    A step is ready once every step it reads has finished; up to `workers` run at once, the highest
    of `priorities` first (ties, and without priorities: in list order). A step that starts with
    nothing else running or ready gets all `threads` (SFT, at the start: nothing runs beside it);
    steps that may run side by side get an even share, at least one each.
    """
    ready = [step for step in waiting if set(step.after) <= finished]
    if priorities:
        ready.sort(key=lambda step: -priorities[step.name])  # stable: ties keep list order
    share = threads if running == 0 and len(ready) == 1 else max(1, threads // workers)
    return [(step, share) for step in ready[:max(0, workers - running)]]


def run_in_workers(config: PipelineConfig, steps: list[Step], workers: int) -> None:
    """Run `steps` in up to `workers` processes at once, each as soon as the steps it reads have finished.

    Order and threads per step: `steps_to_start`, by `step_priorities`, out of this process's torch
    threads. A failed step lets the running ones finish, starts nothing new and raises a StepError;
    rerunning resumes, as after any interruption.
    """
    context = multiprocessing.get_context("forkserver")
    threads = torch.get_num_threads()
    waiting, running, finished, failed = list(steps), {}, set(), []
    priorities = step_priorities(steps)
    try:
        while running or (waiting and not failed):
            starts = [] if failed else steps_to_start(waiting, finished, len(running), workers, threads, priorities)
            for step, step_threads in starts:
                process = context.Process(target=_run_step_in_worker, name=step.name,
                                          args=(config, step, step_threads))
                process.start()
                running[step.name] = process
                waiting.remove(step)
            if not running:
                raise StepError(f"steps {[step.name for step in waiting]} wait for steps that never run")
            multiprocessing.connection.wait([process.sentinel for process in running.values()])
            for name, process in list(running.items()):
                if process.exitcode is None:
                    continue
                process.join()
                del running[name]
                if process.exitcode == 0:
                    finished.add(name)
                elif process.exitcode == INTERRUPTED_EXIT:  # a Ctrl-C that reached the worker alone
                    raise KeyboardInterrupt
                else:
                    failed.append(f"{name} (exit code {process.exitcode})")
    finally:  # interrupted: stop the steps still running (each resumes on the next call)
        stop_workers(list(running.values()))
    if failed:
        raise StepError(f"pipeline step {', '.join(failed)} failed; its error is printed above. Finished stages and "
                        "evaluations are kept: rerun the same command to resume")


def stop_workers(processes: list, grace_seconds: float = 10.0) -> None:
    """Stop worker processes: a Ctrl-C reached them too, so each first gets `grace_seconds` to end on
    its own (closing its progress bar and its resources, `_run_step_in_worker`); any still running
    then, or all at once after another Ctrl-C, is terminated."""
    deadline = time.time() + grace_seconds
    try:
        for process in processes:
            process.join(max(0.0, deadline - time.time()))
    except KeyboardInterrupt:
        pass
    finally:
        for process in processes:
            if process.exitcode is None:
                process.terminate()
                process.join()
