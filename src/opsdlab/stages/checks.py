"""Held-out checks during an RLVR or OPSD stage: when to stop training, and which checkpoint the stage hands on.

Self-distillation shortens a reasoning model's responses for a while and then costs it accuracy
(runs of the original OPSD code collapse after a few hundred steps). A stage with `check_every: N`
therefore grades the model it is training on held-out problems before its first step and every N
steps (and at its last step), appends one line per check to `checks.jsonl`, stops when a stopping
rule (`STOP_RULES`) says the damage has begun, and, once training ends, makes its output model the
checkpoint a selection rule (`SELECT_RULES`) picks, e.g. the shortest one within an accuracy
tolerance of the start.

Files in the stage folder (only with `check_every > 0`):

    checks.jsonl            one line per check: step, avg@k with its CI, mean response tokens and their
                            ratio to the start's, truncation and repetition rates, mean token entropy, seconds
    stop.json               {rule, step, why} when a stopping rule ended training (rule: the one that fired)
    selection.json          {rule, step, why, checkpoint, candidates, excluded}: which check's weights model/
                            holds, and the checks no rule may pick (a collapse sign, below)
    checkpoints/start/      the weights before the first step, when the selection rule may pick them

Collapse signs. Training can end in truncation collapse (StableOPD, arXiv 2604.08527): responses
suddenly grow, loop, and run into the length cap; or accuracy falls while lengths look normal. Each
check therefore records, beside avg@k, the signs of damage measured against the start
(`COLLAPSE_SIGNS`): avg@k below the start's by more than `stop_tolerance` with its CI below the
start's (`accuracy_drop`), mean length more than `stop_length_ratio` times the start's, a truncation
rate or a share of looping responses (`metrics.collapse.repeats`) more than `stop_truncation` or
`stop_repetition` above the start's; and the model's mean token entropy over its responses (entropy
drift, TRACE arXiv 2605.10194), recorded only. Each sign is a stopping rule of its own name, and
`stop` may list several (`collapse`: all four). Whatever `stop` is, a check that shows a sign and
every check after it are never selected (`usable_records`): the check a damage rule stopped at is
never the model a stage hands on, a collapsed model's accuracy may still look fine on a few
problems, and its length, inflated or cut at the cap, says nothing about a compression.

Every check step is saved as a checkpoint (the Trainer's own rotation is turned off); after each
save, the checkpoints kept are the newest (what a resume needs), the one the selection rule picks
among the checks so far, and the `keep_checkpoints` most recent other checked ones; the others are
deleted. Keeping the current pick is enough: every selection rule picks, among one more check,
either its previous pick or the new check (`test_checks`), so a checkpoint deleted once is never
picked later. The collapse exclusion keeps this: the checks a rule sees grow by the new one until
the first sign, and never change after it.

A resumed stage reads `checks.jsonl` and drops the lines after the step it resumes from (their
weights died with the interrupted run; those steps are trained and checked again), so the file
never holds two lines for one step. A stage that a rule stopped is not trained further on a rerun:
it goes straight to the selection.

Under several processes (DDP, DeepSpeed ZeRO-1/2) every process checks its share of the problems
with its own whole copy of the weights, as the pipeline's evaluations do (`evaluate.evaluate_sharded`),
and every process receives the merged result, so all take the same stop and selection decisions
without another exchange. Weights sharded over processes (FSDP, ZeRO-3) are refused.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from transformers import TrainerCallback

from opsdlab.config.stages import CheckSettings, stop_names
from opsdlab.tasks.data import Example
from opsdlab.config.sections import SamplingConfig
from opsdlab.evaluation.evaluate import evaluate_sharded
from opsdlab.evaluation.metrics.comparison import accuracy_efficiency_score
from opsdlab.modeling.runtime import checkpoint_step, is_main_process, main_decides, read_jsonl
from opsdlab.tasks.verifier import VerifierConfig

CHECKS = "checks.jsonl"
STOP = "stop.json"
SELECTION = "selection.json"
START = "start"  # checkpoints/start: the weights before the first step

# length_plateau: stop when none of the last PLATEAU_CHECKS checks is shorter, by more than
# PLATEAU_FRACTION, than the shortest check before them.
PLATEAU_CHECKS = 3
PLATEAU_FRACTION = 0.01


# ---------------------------------------------------------------- stopping rules
# A stopping rule reads the check records so far (the first is the start) and the stage config, and
# returns why training should stop after the latest check, or None to go on.


def _no_stop(records: list[dict], config: CheckSettings) -> str | None:
    return None


def length_plateau(records: list[dict], config: CheckSettings) -> str | None:
    """Stop when none of the last 3 checks is more than 1% shorter (mean response tokens) than the
    shortest check before them: the length stopped falling, and more steps only risk accuracy."""
    if len(records) < PLATEAU_CHECKS + 1:
        return None
    before = min(r["mean_response_tokens"] for r in records[:-PLATEAU_CHECKS])
    recent = min(r["mean_response_tokens"] for r in records[-PLATEAU_CHECKS:])
    if recent >= (1 - PLATEAU_FRACTION) * before:
        return (f"the last {PLATEAU_CHECKS} checks' shortest mean length {recent:.1f} tokens is not "
                f"{PLATEAU_FRACTION:.0%} below the shortest before them, {before:.1f}")
    return None


# ---------------------------------------------------------------- collapse signs
# A collapse sign reads the start's record and one later record and says why that record shows the
# sign, or None; a threshold of null turns the sign off. Records without the field (written before it
# existed, or a measure that has no such number) show no sign.


def _rise(start: dict, record: dict, key: str) -> float | None:
    before, after = start.get(key), record.get(key)
    return None if before is None or after is None else after - before


def accuracy_dropped(start: dict, record: dict, config: CheckSettings) -> str | None:
    """avg@k below start - stop_tolerance with the upper end of its CI below the start's avg@k: a drop
    larger than the tolerance that the check's own uncertainty does not explain."""
    floor, upper = start["avg_at_k"] - config.stop_tolerance, record["avg_at_k_ci"][1]
    if record["avg_at_k"] < floor and upper < start["avg_at_k"]:
        return (f"avg@k {record['avg_at_k']:.3f} at step {record['step']} is below the start's "
                f"{start['avg_at_k']:.3f} - stop_tolerance {config.stop_tolerance:g}, and its CI's upper end "
                f"{upper:.3f} is below the start's too")
    return None


def length_inflated(start: dict, record: dict, config: CheckSettings) -> str | None:
    """Mean response tokens more than stop_length_ratio times the start's."""
    ratio, before = config.stop_length_ratio, start["mean_response_tokens"]
    if ratio is None or before <= 0 or record["mean_response_tokens"] <= ratio * before:
        return None
    return (f"mean length {record['mean_response_tokens']:.1f} tokens at step {record['step']} is "
            f"{record['mean_response_tokens'] / before:.2f}x the start's {before:.1f}, above stop_length_ratio "
            f"{ratio:g}")


def truncation_rose(start: dict, record: dict, config: CheckSettings) -> str | None:
    """A truncation rate more than stop_truncation above the start's (an absolute rise of a share)."""
    rise = _rise(start, record, "truncation_rate")
    if config.stop_truncation is None or rise is None or rise <= config.stop_truncation:
        return None
    return (f"truncation rate {record['truncation_rate']:.3f} at step {record['step']} is {rise:.3f} above the "
            f"start's {start['truncation_rate']:.3f}, more than stop_truncation {config.stop_truncation:g}")


def repetition_rose(start: dict, record: dict, config: CheckSettings) -> str | None:
    """A share of looping responses (`metrics.collapse.repeats`) more than stop_repetition above the start's."""
    rise = _rise(start, record, "repetition_rate")
    if config.stop_repetition is None or rise is None or rise <= config.stop_repetition:
        return None
    return (f"repetition rate {record['repetition_rate']:.3f} at step {record['step']} is {rise:.3f} above the "
            f"start's {start['repetition_rate']:.3f}, more than stop_repetition {config.stop_repetition:g}")


COLLAPSE_SIGNS: dict[str, Callable[[dict, dict, CheckSettings], str | None]] = {
    "accuracy_drop": accuracy_dropped,
    "length_inflation": length_inflated,
    "truncation": truncation_rose,
    "repetition": repetition_rose,
}


def collapse_signs(start: dict, record: dict, config: CheckSettings) -> dict[str, str]:
    """Sign name -> why, for every collapse sign `record` shows against `start` (empty: none)."""
    signs = {name: sign(start, record, config) for name, sign in COLLAPSE_SIGNS.items()}
    return {name: why for name, why in signs.items() if why is not None}


def _sign_rule(name: str) -> Callable[[list[dict], CheckSettings], str | None]:
    """The stopping rule of one collapse sign: stop at the first check that shows it."""

    def rule(records: list[dict], config: CheckSettings) -> str | None:
        return COLLAPSE_SIGNS[name](records[0], records[-1], config) if len(records) > 1 else None

    rule.__name__ = rule.__qualname__ = name
    rule.__doc__ = f"Stop at the first check that shows the {name} collapse sign ({COLLAPSE_SIGNS[name].__doc__})"
    return rule


STOP_RULES: dict[str, Callable[[list[dict], CheckSettings], str | None]] = {
    "none": _no_stop,
    "length_plateau": length_plateau,
    **{name: _sign_rule(name) for name in COLLAPSE_SIGNS},
}


def stop_reason(records: list[dict], config: CheckSettings) -> tuple[str, str] | None:
    """(rule, why) for the first of the configured stopping rules (`stop`, one name or several) that
    fires after the latest check, or None to go on."""
    for name in stop_names(config.stop):
        why = STOP_RULES[name](records, config)
        if why is not None:
            return name, why
    return None


# ---------------------------------------------------------------- selection rules
# A selection rule reads every check record (the first is the start) and the stage config, and
# picks one. Each must pick, among records + [new], either its pick among records or new (see the
# module docstring: the checkpoints kept on disk rely on it).


@dataclass(frozen=True)
class Choice:
    """A selection rule's pick: the index of the chosen record, why, and per record what the rule read."""

    index: int
    why: str
    notes: list[dict] = field(default_factory=list)


def select_last(records: list[dict], config: CheckSettings) -> Choice:
    """The last check it is given: the weights training ended with, unless a collapse sign excluded them."""
    return Choice(len(records) - 1, "the last check")


def shortest_within_tolerance(records: list[dict], config: CheckSettings) -> Choice:
    """Among the checks whose avg@k >= start - select_tolerance, the one with the fewest mean response
    tokens (ties: the earliest). The start itself always qualifies, so there is always a pick."""
    floor = records[0]["avg_at_k"] - config.select_tolerance
    within = [r["avg_at_k"] >= floor for r in records]
    index = min((i for i, ok in enumerate(within) if ok), key=lambda i: (records[i]["mean_response_tokens"], i))
    chosen = records[index]
    why = (f"the shortest ({chosen['mean_response_tokens']:.1f} tokens) of the {sum(within)} checks with avg@k >= "
           f"the start's {records[0]['avg_at_k']:.3f} - select_tolerance {config.select_tolerance:g}")
    return Choice(index, why, [{"within_tolerance": ok} for ok in within])


def best_aes(records: list[dict], config: CheckSettings) -> Choice:
    """The check with the highest accuracy-efficiency score against the start
    (`metrics.comparison.accuracy_efficiency_score`: relative length saved, plus 3x a relative accuracy
    gain or minus 5x a loss); ties: the earliest.

    With a start of accuracy 0 (or length 0) the relative changes are undefined; the rule then ranks
    by accuracy and then by length, the order AES takes as the start's accuracy goes to 0.
    """
    start = records[0]
    if start["avg_at_k"] > 0 and start["mean_response_tokens"] > 0:
        scores = [accuracy_efficiency_score(start["avg_at_k"], r["avg_at_k"], start["mean_response_tokens"],
                                            r["mean_response_tokens"]) for r in records]
        index = max(range(len(records)), key=lambda i: (scores[i], -i))
        why = f"the highest AES against the start: {scores[index]:.3f}"
        return Choice(index, why, [{"aes": round(score, 6)} for score in scores])
    index = max(range(len(records)), key=lambda i: (records[i]["avg_at_k"], -records[i]["mean_response_tokens"], -i))
    why = ("the start's accuracy (or length) is 0, so AES is undefined: the most accurate check, then the shortest "
           f"(avg@k {records[index]['avg_at_k']:.3f}, {records[index]['mean_response_tokens']:.1f} tokens)")
    return Choice(index, why)


SELECT_RULES: dict[str, Callable[[list[dict], CheckSettings], Choice]] = {
    "last": select_last,
    "shortest_within_tolerance": shortest_within_tolerance,
    "best_aes": best_aes,
}


def usable_records(records: list[dict], config: CheckSettings) -> tuple[list[dict], list[dict]]:
    """The records a selection rule may pick from, the ones before the first that shows a collapse sign
    (`collapse_signs` against the start; the start never shows one), and the excluded ones, each
    {step, signs: {sign: why}} (a check after the first collapsed one is excluded with the signs it
    shows itself, possibly none)."""
    first = next((i for i, r in enumerate(records[1:], 1) if collapse_signs(records[0], r, config)), len(records))
    excluded = [{"step": r["step"], "signs": collapse_signs(records[0], r, config)} for r in records[first:]]
    return records[:first], excluded


def pick(records: list[dict], config: CheckSettings) -> tuple[int, Choice, list[dict]]:
    """The index in `records` of the check the configured selection rule picks among the usable records,
    its `Choice` and the excluded records (`usable_records`)."""
    usable, excluded = usable_records(records, config)
    choice = SELECT_RULES[config.select](usable, config)
    return choice.index, choice, excluded


# ---------------------------------------------------------------- the callback


def evaluate_held_out(model, tokenizer, examples: list[Example], verifier: VerifierConfig, sampling: SamplingConfig,
                      *, thinking: bool, desc: str, entropy: bool = False) -> dict:
    """The summary of `evaluate` on `examples`, split over the processes of the launch as the pipeline's
    evaluations are (every process gets the merged summary). Checks sample with the transformers backend
    (the training model itself), so `entropy` is always computed there."""
    return evaluate_sharded(model, tokenizer, examples, verifier, sampling, thinking=thinking, desc=desc,
                            entropy=entropy)[1]


def check_line(record: dict) -> str:
    """A check record as one console line: avg@k with its CI, mean tokens (x the start's), the truncation and
    repetition rates and the mean token entropy (nats), each shown where the record has it."""
    lo, hi = record["avg_at_k_ci"]
    parts = [f"check @{record['step']}: avg@{record['k']} {record['avg_at_k']:.3f} [{lo:.3f}, {hi:.3f}]",
             f"mean tokens {record['mean_response_tokens']:.1f}"
             + (f" ({record['length_ratio']:.2f}x start)" if record.get("length_ratio") is not None else "")]
    for key, label, form in (("truncation_rate", "truncated", "{:.0%}"), ("repetition_rate", "looping", "{:.0%}"),
                             ("mean_token_entropy", "entropy", "{:.2f}")):
        if record.get(key) is not None:
            parts.append(f"{label} {form.format(record[key])}")
    return ", ".join(parts) + f" ({record['seconds']:.1f}s)"


def may_pick_start(config: CheckSettings) -> bool:
    """Whether a selection may pick the start, so its weights must be saved: any rule but `last`, and `last`
    too while a collapse sign may exclude every later check."""
    thresholds = (config.stop_length_ratio, config.stop_truncation, config.stop_repetition)
    return config.select != "last" or any(t is not None for t in thresholds)


def _check_folder(stage_dir: Path, step: int) -> Path:
    return stage_dir / "checkpoints" / (START if step == 0 else f"checkpoint-{step}")


def stopped_step(stage_dir: Path) -> int | None:
    """The step a stopping rule ended this stage at, if its stop.json names a checkpoint that is complete."""
    try:
        step = json.loads((Path(stage_dir) / STOP).read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None
    return step if (_check_folder(Path(stage_dir), step) / "trainer_state.json").is_file() else None


class HeldOutCheck(TrainerCallback):
    """Checks, stops and selects for one RLVR or OPSD stage (see the module docstring); built by `attach_checks`."""

    def __init__(self, trainer, config: CheckSettings, stage_dir: Path, examples: list[Example],
                 verifier: VerifierConfig, *, thinking: bool, label: str):
        self.trainer, self.config, self.stage_dir = trainer, config, Path(stage_dir)
        self.examples = list(examples)[:config.check_problems]
        self.verifier, self.thinking, self.label = verifier, thinking, label
        max_new_tokens = config.check_max_new_tokens or trainer.args.max_completion_length
        # One seed for every check: the checks share their random draws, so two checks differ by the weights.
        self.sampling = SamplingConfig(k=config.check_k, temperature=config.check_temperature,
                                       max_new_tokens=max_new_tokens, seed=trainer.args.seed)
        self.records: list[dict] = []
        self.stopped = False

    @property
    def path(self) -> Path:
        return self.stage_dir / CHECKS

    # -------------------------------------------------------------- resume
    def resume(self, step: int) -> None:
        """Take up the checks of a stage that continues from `step`: lines after it (and at step 0, all)
        are dropped, as is a stop.json after it, since the weights they describe were not saved."""
        records = main_decides(lambda: read_jsonl(self.path))
        self.records = [r for r in records if 0 < step and r["step"] <= step]
        if is_main_process() and len(self.records) != len(records):
            self.stage_dir.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            stop = self.stage_dir / STOP
            if stop.exists() and json.loads(stop.read_text())["step"] > step:
                stop.unlink()

    def on_train_begin(self, args, state, control, **kwargs):
        self.resume(state.global_step)
        if not self.records:  # the stage's start: step 0, or the step checks were first turned on at
            self.check(state.global_step, control)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % self.config.check_every == 0 or step >= state.max_steps:
            self.check(step, control)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.prune()

    # -------------------------------------------------------------- one check
    def check(self, step: int, control) -> dict:
        """Grade the training model at `step`, append its line, save the step, apply the stopping rules."""
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        if step == 0 and may_pick_start(self.config):  # keep the start's weights
            self.trainer.save_model(str(_check_folder(self.stage_dir, 0)))
        start = time.perf_counter()
        was_training = model.training
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        # Sampling seeds torch's generator: in a forked RNG state, a checked run trains on the batches of an unchecked one.
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            try:
                summary = self.measure(model, self.trainer.processing_class, step)
            finally:
                model.train(was_training)
        tokens = summary["mean_response_tokens"]
        first = (self.records or [{"mean_response_tokens": tokens}])[0]["mean_response_tokens"]
        record = {"step": step, "avg_at_k": summary["avg_at_k"], "avg_at_k_ci": list(summary["avg_at_k_ci"]),
                  "mean_response_tokens": tokens, "length_ratio": tokens / first if first > 0 else None,
                  "truncation_rate": summary.get("truncation_rate"), "repetition_rate": summary.get("repetition_rate"),
                  "mean_token_entropy": summary.get("mean_token_entropy"), "problems": len(self.examples),
                  "k": self.sampling.k, "seconds": round(time.perf_counter() - start, 3)}
        self.records.append(record)
        stop = stop_reason(self.records, self.config)
        if stop is not None:
            record["stop"] = stop[0]
        if is_main_process():
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(f"[{self.label}] {check_line(record)}", flush=True)
        if step > 0:
            control.should_save = True  # a check step may be selected: its weights must be on disk
        if stop is not None:
            rule, why = stop
            if is_main_process():
                (self.stage_dir / STOP).write_text(json.dumps({"rule": rule, "step": step, "why": why}, indent=2))
                print(f"[{self.label}] stopping at step {step} ({rule}): {why}", flush=True)
            control.should_training_stop = True
            self.stopped = True
        return record

    def measure(self, model, tokenizer, step: int) -> dict:
        """The held-out summary (avg@k, its CI, mean response tokens, truncation and repetition rates, mean
        token entropy) of `model` as it is at `step`."""
        return evaluate_held_out(model, tokenizer, self.examples, self.verifier, self.sampling,
                                 thinking=self.thinking, desc=f"{self.label} check @{step}", entropy=True)

    # -------------------------------------------------------------- selection and disk
    def choice(self) -> tuple[dict, Choice, list[dict]]:
        """The selected record, the rule's choice among the usable records, and the excluded records."""
        index, choice, excluded = pick(self.records, self.config)
        return self.records[index], choice, excluded

    def prune(self) -> None:
        """Delete the checkpoints nothing needs (module docstring): keep the newest, the current pick and
        the `keep_checkpoints` most recent other checked ones."""
        folders = {checkpoint_step(f): f for f in (self.stage_dir / "checkpoints").glob("checkpoint-*")}
        if not folders or not self.records:
            return
        newest = max(folders)
        picked = self.choice()[0]["step"]
        others = [r["step"] for r in self.records if r["step"] not in (newest, picked)]
        keep = {newest, picked, *others[max(0, len(others) - self.config.keep_checkpoints):]}
        for step, folder in folders.items():
            if step not in keep:
                shutil.rmtree(folder, ignore_errors=True)
        start = _check_folder(self.stage_dir, 0)
        if 0 not in keep and start.exists():
            shutil.rmtree(start, ignore_errors=True)

    def select(self) -> dict:
        """Put the selected check's weights into the trainer's model and write selection.json; returns it."""
        record, choice, excluded = self.choice()
        step = record["step"]
        folder = _check_folder(self.stage_dir, step)
        # The trainer's model holds the weights of its own last step (a stopped stage rerun holds the start's).
        if step != self.trainer.state.global_step:
            if not main_decides(folder.is_dir):
                raise FileNotFoundError(f"{self.label}: select {self.config.select} picks step {step}, whose checkpoint "
                                        f"{folder} was deleted; were select or keep_checkpoints changed since the "
                                        "stage started?")
            self.trainer._load_from_checkpoint(str(folder), model=self.trainer.accelerator.unwrap_model(self.trainer.model))
        why = choice.why
        if excluded:
            signs = ", ".join(excluded[0]["signs"])
            why += f"; steps from {excluded[0]['step']} on are excluded (collapse sign: {signs})"
        selection = {
            "rule": self.config.select, "step": step, "why": why,
            "checkpoint": str(folder.relative_to(self.stage_dir)),
            "candidates": [{"step": r["step"], "avg_at_k": r["avg_at_k"], "avg_at_k_ci": r["avg_at_k_ci"],
                            "mean_response_tokens": r["mean_response_tokens"],
                            **(choice.notes[i] if i < len(choice.notes) else {})} for i, r in enumerate(self.records)],
            "excluded": excluded,
        }
        if is_main_process():
            (self.stage_dir / SELECTION).write_text(json.dumps(selection, indent=2))
            print(f"[{self.label}] model/ holds step {step} ({self.config.select}): {why}", flush=True)
        self.trainer.accelerator.wait_for_everyone()
        return selection


def attach_checks(trainer, config: CheckSettings, stage_dir: Path, examples: list[Example] | None,
                  verifier: VerifierConfig, *, thinking: bool, stage: str, label: str) -> HeldOutCheck | None:
    """A `HeldOutCheck` added to `trainer` when `config.check_every > 0` (else None, and nothing changes).

    Raises a ValueError naming the key when checks are asked for without held-out problems, or under
    weights sharded over processes (FSDP, DeepSpeed ZeRO-3), where a process alone cannot generate.
    """
    if not config.check_every:
        return None
    if not examples:
        raise ValueError(f"{stage}.check_every: held-out checks need held-out problems (check_examples); none were "
                         "given to this stage")
    accelerator = trainer.accelerator
    sharded = accelerator.distributed_type == DistributedType.FSDP or (
        accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3)
    if sharded:
        raise ValueError(f"{stage}.check_every: held-out checks generate with each process's whole copy of the weights; "
                         f"set {stage}.check_every=0 under FSDP or DeepSpeed ZeRO-3")
    if len(examples) < config.check_problems and is_main_process():
        print(f"[{label}] checks grade the {len(examples)} held-out problems given ({stage}.check_problems is "
              f"{config.check_problems})", file=sys.stderr, flush=True)
    trainer.args.save_total_limit = None  # the check prunes checkpoints itself (`HeldOutCheck.prune`)
    check = HeldOutCheck(trainer, config, stage_dir, examples, verifier, thinking=thinking, label=label)
    trainer.add_callback(check)
    return check


def train_checked(trainer, check: HeldOutCheck | None, train: Callable[[], object]) -> None:
    """`train()`, then with checks the selected check's weights put into the trainer's model.

    A stage that a stopping rule already stopped (a complete checkpoint at its stop.json's step) is
    not trained again: its checks are read back and the selection made from them.
    """
    if check is None:
        train()
        return
    stop = main_decides(lambda: stopped_step(check.stage_dir))
    if stop is None:
        train()
    else:
        check.resume(stop)
        if is_main_process():
            print(f"[{check.label}] stopped at step {stop} by its {STOP} rule: not training further", flush=True)
    check.select()
