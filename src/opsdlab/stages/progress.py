"""What a training stage shows while it runs: one labelled progress bar, and a line when it resumes.

The Trainer's own progress callback (transformers' `ProgressCallback`) prints every logged dict to
stdout, which buries a long run's few informative lines under hundreds of `{'loss': ...}` lines.
Each stage logs those dicts to its `metrics.jsonl` (`runtime.JsonlMetrics`) anyway, so a stage
swaps the Trainer's printer for `StageProgress`: one tqdm bar (on stderr, main process only),
labelled with the stage, whose postfix carries the stage's few numbers that matter, taken from the
same logged dicts. TRL's GRPOTrainer (RLVR, and OPSD which subclasses it) logs its metrics through
the Trainer's `log`, so they reach the bar the same way. The words a stage says and how a bar is
drawn (a bar, or whole lines under workers) are `modeling.console`'s.
"""

from __future__ import annotations

import math
from pathlib import Path

from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from opsdlab.modeling.console import _style, progress_bar, stage_line
from opsdlab.modeling.runtime import checkpoint_step, is_main_process, resume_point, warn_only_untied_missing_keys
from opsdlab.stages.rollout_budget import checkpoint_tokens, reached, write_stage_tokens

# Postfix name -> logged key, per stage. "loss" is the Trainer's mean training loss since the last
# log; "reward" and "completions/mean_length" are GRPOTrainer's (mean total reward and mean
# completion tokens of the logged steps); "opsd/kept_fraction" is the share of rollouts the OPSD gate kept.
SFT_POSTFIX = {"loss": "loss"}
RLVR_POSTFIX = {"loss": "loss", "reward": "reward", "len": "completions/mean_length"}
OPSD_POSTFIX = {"loss": "loss", "kept": "opsd/kept_fraction", "len": "completions/mean_length"}

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


def _last_step(checkpoint: str, step: int, max_steps: int, budget: int | None) -> str | None:
    """Why a checkpoint at `step` is its stage's last step (nothing left to train), or None: it is at
    max_steps, or it has spent the stage's rollout-token budget (`rollout_budget`)."""
    if step == max_steps:
        return f"{Path(checkpoint).name} is the last step ({step} of {max_steps})"
    tokens = checkpoint_tokens(checkpoint) if budget is not None else None
    if reached(tokens, budget):
        return (f"{Path(checkpoint).name} has spent the rollout-token budget ({tokens:,} of {budget:,} tokens, "
                f"step {step} of at most {max_steps})")
    return None


def train_stage(trainer, stage_dir: Path, label: str, postfix: dict[str, str]):
    """Train with a `StageProgress` bar, from the stage's last complete checkpoint if one exists
    (saying so in one line on the main process). Returns the Trainer's TrainOutput, or None when that
    checkpoint is its stage's last step already (at max_steps, or at the rollout-token budget of a
    trainer that has one: `finished_from`). A stage that generates rollouts then writes what it spent
    (`rollout_budget.write_stage_tokens`)."""
    progress = show_stage_progress(trainer, label, postfix)
    warn_only_untied_missing_keys(trainer)
    checkpoint = resume_point(stage_dir)
    max_steps = trainer.args.max_steps
    step = None if checkpoint is None else checkpoint_step(Path(checkpoint))
    if step is not None and step > max_steps:
        raise ValueError(f"{label}: {Path(checkpoint).parent.parent} holds {Path(checkpoint).name}, past max_steps "
                         f"{max_steps}; give another output folder, or max_steps >= {step} to continue it")
    budget = getattr(trainer, "max_rollout_tokens", None)
    last = None if step is None else _last_step(checkpoint, step, max_steps, budget)
    if last is not None:
        if is_main_process():
            print(stage_line(label, "skipped", f"{last}: nothing to train"), flush=True)
        output = finished_from(trainer, checkpoint, progress)
    else:
        if checkpoint is not None and is_main_process():
            print(resume_line(label, checkpoint, max_steps), flush=True)
        output = trainer.train(resume_from_checkpoint=checkpoint)
    write_stage_tokens(trainer, stage_dir)
    return output


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
