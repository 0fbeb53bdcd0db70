"""What every command prints: the words a stage says (`[sft] started`, `[rlvr] resumed from
checkpoint-50 (step 50 of 100)`, `[sft] skipped: ...`, `[opsd correct s0] done: ...`, `stage_line`)
and how progress is drawn (`progress_bar`): one bar redrawn in place, or, where several processes
share one terminal (the pipeline's `workers: N`), whole lines led by their label
(`progress_drawn_as("lines")`). Training stages (`stages.progress`) and evaluation draw through it.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from opsdlab.modeling.runtime import is_main_process, peak_memory_mb

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


def close_bars() -> None:
    """Close every progress bar still open (a stage's, an evaluation's) where an interrupted command
    stops: each ends its own line, so the line said next is not drawn over or redrawn upon at exit."""
    for bar in list(tqdm._instances):
        bar.close()
