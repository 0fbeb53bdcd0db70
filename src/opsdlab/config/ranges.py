"""The numbers of the stage configs: the range of each numeric field, and how a batch splits over processes.

Values that TRL, transformers or torch would refuse only once a stage runs (after the stages before
it) are refused when the config is built (`check_ranges`). A stage's batch counts rows per optimizer
step over all processes and gradient-accumulation steps; `per_device_rows` turns it into the
per-device micro-batch that the Trainer takes, and refuses a split that is not even.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable


# The learning-rate schedules a stage can run: transformers' others need an evaluation strategy
# (reduce_lr_on_plateau, greedy) or `lr_scheduler_kwargs` that no stage passes (cosine_with_min_lr,
# cosine_warmup_with_min_lr, warmup_stable_decay), and would fail once the stage's trainer starts.
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                 "inverse_sqrt")


def _at_least(bound: float) -> Callable[[float], bool]:
    return lambda value: value >= bound


def _above(bound: float) -> Callable[[float], bool]:
    return lambda value: value > bound


def _within(low: float, high: float) -> Callable[[float], bool]:
    return lambda value: low <= value <= high


def _below(bound: float) -> Callable[[float], bool]:
    return lambda value: value < bound


def _share(value: float) -> bool:
    """In (0, 1]."""
    return 0 < value <= 1


# The range of each numeric field of the stage configs (SFT, RLVR, OPSD) whose values outside it
# TRL, transformers or torch refuse only once the stage runs (after the stages before it), or which
# train nothing; `check_ranges` checks a config's fields against it when the config is built. A field
# absent from a config is not checked; null passes where a field takes it. Field -> (test, range, why).
RANGES: dict[str, tuple[Callable[[float], bool], str, str]] = {
    "learning_rate": (_above(0), "> 0", "torch's AdamW refuses a negative one, and 0 trains nothing"),
    "weight_decay": (_at_least(0), ">= 0", "torch's AdamW refuses a negative one"),
    "warmup_steps": (_at_least(0), ">= 0", "transformers' TrainingArguments refuses a negative one"),
    "warmup_ratio": (_within(0, 1), "in [0, 1]", "a fraction of max_steps"),
    "save_steps": (_at_least(1), ">= 1", "transformers saves every save_steps steps"),
    "logging_steps": (_at_least(1), ">= 1", "transformers logs every logging_steps steps"),
    "max_length": (_at_least(1), ">= 1", "tokens per training row"),
    "max_completion_length": (_at_least(1), ">= 1", "tokens per rollout"),
    "temperature": (_above(0), "> 0", "rollouts are sampled, and transformers refuses a temperature <= 0"),
    "top_p": (_share, "in (0, 1]", "transformers' top-p sampling refuses other values"),
    "epsilon": (_at_least(0), ">= 0", "the clip range of the policy ratio"),
    "epsilon_high": (_at_least(0), ">= 0 or null", "the upper clip range of the policy ratio"),
    "beta": (_at_least(0), ">= 0", "the weight of the KL penalty"),
    "num_iterations": (_at_least(1), ">= 1", "optimizer passes over each generation batch"),
    "format_reward_weight": (_at_least(0), ">= 0", "the weight of the format reward (0: none)"),
    "train_problems": (_at_least(1), ">= 1", "training problems drawn from the task"),
    "max_rollout_tokens": (_at_least(1), ">= 1 or null", "response tokens generated before the stage ends"),
    "ema_rate": (_share, "in (0, 1]", "the ema teacher's step toward the student"),
    "token_stats_rows": (_at_least(0), ">= 0", "rollouts per step whose per-token numbers are kept"),
    "lora_alpha": (_at_least(1), ">= 1", "LoRA's scale alpha / r; 0 leaves the adapters without effect"),
    "vllm_max_model_length": (_at_least(1), ">= 1 or null", "vLLM's context length in tokens"),
    "contrast_floor": (_below(0), "< 0 or null", "a floor of log-probabilities"),
    "supervised_tokens": (_at_least(1), ">= 1 or null", "response tokens of each rollout that carry the loss"),
    "position_floor": (_within(0, 1), "in [0, 1]", "the linear weight of a rollout's last supervised token"),
    "margin_threshold": (_within(-100, 100), "in [-100, 100]",
                         "a difference of log-probabilities; beyond it every token or none is cut"),
    "margin_window": (_at_least(1), ">= 1", "response tokens in the margin's trailing mean"),
    "anchor_beta": (_at_least(0), ">= 0", "the weight of the KL to the starting model (0: none)"),
    "stop_length_ratio": (_at_least(1), ">= 1 or null", "a check's mean length against the start's"),
    "stop_truncation": (_within(0, 1), "in [0, 1] or null", "a rise of the truncation rate, a share"),
    "stop_repetition": (_within(0, 1), "in [0, 1] or null", "a rise of the share of looping responses"),
}


def check_ranges(stage: str, config) -> None:
    """Raise a ValueError naming `stage` and the field for the first number of the stage config
    `config` (a dataclass) that is not finite or lies outside its `RANGES` entry, and for a
    learning-rate schedule outside `LR_SCHEDULERS`."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{stage}: {f.name} must be a finite number, got {value!r}")
    for name, (test, allowed, why) in RANGES.items():
        value = getattr(config, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not test(value):
            raise ValueError(f"{stage}: {name} must be {allowed} ({why}), got {value!r}")
    schedule = getattr(config, "lr_scheduler_type", None)
    if schedule is not None and schedule not in LR_SCHEDULERS:
        raise ValueError(f"{stage}: lr_scheduler_type must be one of {list(LR_SCHEDULERS)} (transformers' others "
                         "need an evaluation strategy or scheduler arguments that the stages do not pass), got "
                         f"{schedule!r}")


def per_device_rows(stage: str, rows: int, what: str, num_processes: int, accumulation_steps: int) -> int:
    """Rows per device per micro-batch, for `rows` rows per optimizer step over all processes and micro-batches.

    `what` says how `rows` is made (e.g. "batch_size (32)"); an uneven split is an error naming the values.
    """
    share = num_processes * accumulation_steps
    if rows % share:
        raise ValueError(
            f"{stage}: {what} = {rows} rows per optimizer step do not split evenly over {num_processes} "
            f"process(es) x gradient_accumulation_steps {accumulation_steps} (= {share} micro-batches); "
            f"make it a multiple of {share}"
        )
    return rows // share


def rollouts_per_device(stage: str, prompts_per_step: int, rollouts_per_prompt: int, num_processes: int,
                        accumulation_steps: int) -> int:
    """Rollouts per device per micro-batch for one optimizer step of `prompts_per_step` prompts.

    The step's prompts x rollouts are summed over all processes and accumulation steps. Each
    process generates whole groups (dynamic sampling, refill and the sibling teacher context read
    groups locally), so the prompts must also divide evenly over the processes.
    """
    if prompts_per_step % num_processes:
        raise ValueError(
            f"{stage}: prompts_per_step ({prompts_per_step}) must be a multiple of the number of processes "
            f"({num_processes}): each process generates whole groups of rollouts"
        )
    return per_device_rows(stage, prompts_per_step * rollouts_per_prompt,
                           f"prompts_per_step ({prompts_per_step}) x rollouts per prompt ({rollouts_per_prompt})",
                           num_processes, accumulation_steps)
