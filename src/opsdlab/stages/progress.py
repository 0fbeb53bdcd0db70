"""What a training stage shows while it runs: one labelled progress bar, and a line when it resumes.

The Trainer's own progress callback (transformers' `ProgressCallback`) prints every logged dict to
stdout, which buries a long run's few informative lines under hundreds of `{'loss': ...}` lines.
Each stage logs those dicts to its `metrics.jsonl` (`runtime.JsonlMetrics`) anyway, so a stage
swaps the Trainer's printer for `StageProgress`: one tqdm bar (on stderr, main process only),
labelled with the stage, whose postfix carries the stage's few numbers that matter, taken from the
same logged dicts. TRL's GRPOTrainer (RLVR, and OPSD which subclasses it) logs its metrics through
the Trainer's `log`, so they reach the bar the same way.

Every command says what a stage does in the same words (`stage_line`): `[sft] started`,
`[rlvr] resumed from checkpoint-50 (step 50 of 100)`, `[sft] skipped: finished with these settings`,
`[opsd correct s0] done: wrote ... in 31s, peak memory 812 MiB`; the label in brackets
(`stage_label`) is also the bar's. Where several processes share one terminal (the pipeline's
`workers: N`), a redrawn bar of one would overwrite another's and run into their lines, so such a
run shows its progress as whole lines instead (`progress_drawn_as("lines")`), each led by its label.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from opsdlab.modeling.runtime import (checkpoint_step, is_main_process, peak_memory_mb, resume_point,
                             warn_only_untied_missing_keys)

# Postfix name -> logged key, per stage. "loss" is the Trainer's mean training loss since the last
# log; "reward" and "completions/mean_length" are GRPOTrainer's (mean total reward and mean
# completion tokens of the logged steps); "opsd/kept_fraction" is the share of rollouts the OPSD gate kept.
SFT_POSTFIX = {"loss": "loss"}
RLVR_POSTFIX = {"loss": "loss", "reward": "reward", "len": "completions/mean_length"}
OPSD_POSTFIX = {"loss": "loss", "kept": "opsd/kept_fraction", "len": "completions/mean_length"}

# What a stage can say it did, and what joins the event to its detail (`stage_line`).
STAGE_EVENTS = {"started": ": ", "resumed": " from ", "skipped": ": ", "done": ": "}


def stage_label(stage: str, arm: str | None = None, seed: int | None = None) -> str:
    """The name a stage goes by on its bar and in its lines: `sft`, `rlvr`, `opsd correct s0`
    (an OPSD arm and its OPSD seed)."""
    return " ".join([stage, *([arm] if arm else []), *([f"s{seed}"] if seed is not None else [])])


def stage_line(label: str, event: str, detail: str = "") -> str:
    """One line of what a stage did, worded alike by the pipeline and the stage commands:
    `[sft] skipped: finished with these settings`, `[rlvr] resumed from checkpoint-50 (step 50 of 100)`."""
    if event not in STAGE_EVENTS:
        raise ValueError(f"stage_line: event must be one of {sorted(STAGE_EVENTS)}, got {event!r}")
    return f"[{label}] {event}" + (f"{STAGE_EVENTS[event]}{detail}" if detail else "")


def memory_text() -> str:
    """This process's peak memory so far, for a log line."""
    peaks = peak_memory_mb()
    text = f"peak memory {peaks['peak_rss_mb']:.0f} MiB" if "peak_rss_mb" in peaks else "peak memory unknown"
    return text + (f", GPU {peaks['peak_cuda_mb']:.0f} MiB" if "peak_cuda_mb" in peaks else "")


def done_line(label: str, model_dir: str | Path, seconds: float) -> str:
    """`[sft] done: wrote runs/x/sft/model in 31s, peak memory 812 MiB`."""
    return stage_line(label, "done", f"wrote {model_dir} in {seconds:.0f}s, {memory_text()}")


def say_started(stage_dir: Path, label: str, detail: str = "") -> None:
    """`[label] started` on the main process, said before the model loads, unless the stage has a
    checkpoint to resume from (`train_stage` then says where it resumes)."""
    if is_main_process() and not any((Path(stage_dir) / "checkpoints").glob("checkpoint-*")):
        print(stage_line(label, "started", detail), flush=True)


LINE_INTERVAL = 30.0  # seconds before the first line of a bar drawn as lines, and between two of its lines
LINE_FORMAT = "[{desc}] {unit} {n_fmt}/{total_fmt}, {elapsed} elapsed, {remaining} left{postfix}"


class WholeLines:
    """A file for tqdm that writes each status it draws as one whole line (one write, so processes
    sharing the stream never split each other's lines), dropping the carriage returns that redraw a
    bar in place, blank clears and a status repeated unchanged."""

    def __init__(self):
        self.last = None

    def write(self, text: str) -> None:
        for status in re.split(r"[\r\n]", text):
            status = status.strip()
            if status and status != self.last:
                sys.stderr.write(status + "\n")
                sys.stderr.flush()
                self.last = status

    def flush(self) -> None:
        sys.stderr.flush()


@dataclass(frozen=True)
class ProgressStyle:
    """How a process draws progress: the tqdm options of each bar, whether a bar is redrawn when its
    numbers change (else at its next scheduled draw), and whether the libraries' own short bars
    (loading and writing weights, preparing a dataset) are drawn."""

    options: Callable[[], dict]
    redraw_on_log: bool
    library_bars: bool


PROGRESS_STYLES = {
    # One bar redrawn in place: one process at a terminal.
    "bar": ProgressStyle(lambda: {"dynamic_ncols": True}, redraw_on_log=True, library_bars=True),
    # Whole lines led by the bar's label, one per LINE_INTERVAL seconds and a last one, for a bar
    # that runs longer than that (a shorter step says only that it started and is done): several
    # processes at one terminal (the pipeline's workers).
    "lines": ProgressStyle(lambda: {"file": WholeLines(), "bar_format": LINE_FORMAT, "mininterval": LINE_INTERVAL,
                                    "delay": LINE_INTERVAL, "miniters": 1},
                           redraw_on_log=False, library_bars=False),
}
_style = [PROGRESS_STYLES["bar"]]


@contextlib.contextmanager
def progress_drawn_as(name: str):
    """Draw this process's progress in the style `name` (a key of PROGRESS_STYLES) inside the block,
    and as before after it."""
    import datasets
    from transformers.utils import logging

    if name not in PROGRESS_STYLES:
        raise ValueError(f"progress style must be one of {sorted(PROGRESS_STYLES)}, got {name!r}")
    before = _style[0], logging.is_progress_bar_enabled(), datasets.are_progress_bars_disabled()
    _style[0] = PROGRESS_STYLES[name]
    if not _style[0].library_bars:
        logging.disable_progress_bar()  # also huggingface_hub's
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        _style[0] = before[0]
        (logging.enable_progress_bar if before[1] else logging.disable_progress_bar)()
        (datasets.disable_progress_bars if before[2] else datasets.enable_progress_bars)()


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar drawn in this process's style (`progress_drawn_as`)."""
    return tqdm(iterable, **kwargs, **_style[0].options())


class StageProgress(TrainerCallback):
    """A tqdm bar of optimizer steps, labelled `label`, with the latest value of each `postfix` key.

    `postfix` maps the name shown to the logged key it reads; a key missing from a log (the final
    train summary, a step whose gate kept nothing) leaves the last value shown. Prints nothing to
    stdout; draws on the world's main process only, and not at all under `disable_tqdm`.
    """

    def __init__(self, label: str, postfix: dict[str, str]):
        self.label = label
        self.postfix = dict(postfix)
        self.values: dict[str, float] = {}
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not args.disable_tqdm:
            # A resumed run starts at its checkpoint's step (the Trainer restores the state before this event).
            self.bar = progress_bar(total=state.max_steps, initial=state.global_step, desc=self.label, unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        for name, key in self.postfix.items():
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.values[name] = float(value)
        if self.bar is not None and self.values:
            self.bar.set_postfix_str(self.postfix_text(), refresh=_style[0].redraw_on_log)

    def postfix_text(self) -> str:
        """The shown values in `postfix` order, three significant digits: "loss=0.123, len=45"."""
        return ", ".join(f"{name}={self.values[name]:.3g}" for name in self.postfix if name in self.values)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def show_stage_progress(trainer, label: str, postfix: dict[str, str]) -> StageProgress:
    """Replace the Trainer's progress printer (ProgressCallback, its notebook variant, or PrinterCallback
    under `disable_tqdm`) by a `StageProgress`; the Trainer adds exactly one of them at init."""
    from transformers.trainer import DEFAULT_PROGRESS_CALLBACK

    for printer in (ProgressCallback, PrinterCallback, DEFAULT_PROGRESS_CALLBACK):
        trainer.remove_callback(printer)
    progress = StageProgress(label, postfix)
    trainer.add_callback(progress)
    return progress


def resume_line(label: str, checkpoint: str | Path, max_steps: int) -> str:
    """`[sft] resumed from checkpoint-40 (step 40 of 800)`."""
    step = checkpoint_step(Path(checkpoint))
    return stage_line(label, "resumed", f"{Path(checkpoint).name} (step {step} of {max_steps})")


class _Finished(Exception):
    """Raised by `_StopBeforeFirstStep`: the resumed run is at max_steps already."""


class _StopBeforeFirstStep(TrainerCallback):
    """Ends `train()` as its first step begins, the checkpoint being loaded by then."""

    def on_step_begin(self, args, state, control, **kwargs):
        raise _Finished


def train_stage(trainer, stage_dir: Path, label: str, postfix: dict[str, str]):
    """Train with a `StageProgress` bar, from the stage's last complete checkpoint if one exists
    (saying so in one line on the main process). Returns the Trainer's TrainOutput, or None when that
    checkpoint is at max_steps already (`finished_from`)."""
    progress = show_stage_progress(trainer, label, postfix)
    warn_only_untied_missing_keys(trainer)
    checkpoint = resume_point(stage_dir)
    max_steps = trainer.args.max_steps
    step = None if checkpoint is None else checkpoint_step(Path(checkpoint))
    if step is not None and step > max_steps:
        raise ValueError(f"{label}: {Path(checkpoint).parent.parent} holds {Path(checkpoint).name}, past max_steps "
                         f"{max_steps}; give another output folder, or max_steps >= {step} to continue it")
    if step is not None and step == max_steps:
        if is_main_process():
            print(stage_line(label, "skipped", f"{Path(checkpoint).name} is the last step ({step} of {max_steps}): "
                                               "nothing to train"), flush=True)
        return finished_from(trainer, checkpoint, progress)
    if checkpoint is not None and is_main_process():
        print(resume_line(label, checkpoint, max_steps), flush=True)
    return trainer.train(resume_from_checkpoint=checkpoint)


def close_bars() -> None:
    """Close every progress bar still open (a stage's, an evaluation's) where an interrupted command
    stops: each ends its own line, so the line said next is not drawn over or redrawn upon at exit."""
    for bar in list(tqdm._instances):
        bar.close()


def finished_from(trainer, checkpoint: str, progress: StageProgress | None = None) -> None:
    """Put a finished run's state into `trainer` from its checkpoint at max_steps, training nothing.

    The Trainer's loop tests for the end of training only after a step, so resuming from a checkpoint
    at max_steps would train one step past it (and every rerun one more). The Trainer still does the
    loading, as for any resume, under every launch it supports (weights, optimizer, scheduler, the
    state and the callbacks' restoring on train begin); the run is ended as its first step begins.
    """
    stop = _StopBeforeFirstStep()
    trainer.add_callback(stop)
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except _Finished:
        pass
    finally:
        trainer.remove_callback(stop)
        if progress is not None:
            progress.on_train_end(trainer.args, trainer.state, trainer.control)
    return None
