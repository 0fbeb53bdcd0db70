"""Compaction methods: what an arm does to the starting checkpoint, one named choice per arm (`method:`).

Every method starts from the same checkpoint (the run's last stage, RLVR by default) with the arm's
budget of generated rollouts (`max_steps` x `prompts_per_step` x `rollouts_per_prompt`, or under
`max_rollout_tokens` the response tokens they may generate, `rollout_budget`), and is evaluated and
reported like any other arm:

- `opsd`: on-policy self-distillation toward the model reading the reference solution, with the
  arm's gate, teacher context, divergence and teacher weights (the paper's method).
- `crisp`: the teacher is the same model told to be concise (no reference solution), reverse KL on
  every rollout, and the teacher re-copied from the student every `teacher_refresh_steps` steps
  (CRISP, arXiv 2603.05433; its published setting refreshes every 50 steps).
- `contrastive`: OPSD whose teacher signal is contrasted with the same teacher reading a negative
  context, so that what any privileged prompt shifts (style) cancels and what the true reference adds
  remains (`contrastive`). `contrast_variant` says which negative and which target:
  `unrelated_solution` (default) contrasts with another problem's solution on the full vocabulary;
  `rlcsd_plugin` is the RLCSD authors' OPSD plug-in (arXiv 2606.11709, `opsd_ectr` in their code):
  an incorrect sibling rollout, a top-k-plus-tail support, tokens weighted by KL / (KL + tau).
- `length_rl`: RLVR continued with a length-aware reward (DLER, arXiv 2510.15110: a correct
  response earns its reward only within a target length; batch-wise reward normalisation, the
  higher clip of the run's `rlvr.epsilon_high`, dynamic sampling).
- `budget`: no training; the starting checkpoint evaluated with each response cut at a token budget
  and the answer forced (budget forcing), the zero-training baseline.

What a method sets and needs of an arm's settings (its defaults, the prompts its teacher reads) is
configuration, checked when a config loads: `config.methods.METHODS`. This module holds how each
method trains (`TRAINING`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

from opsdlab.config.stages import VLLM_FIELDS, CheckSettings, OPSDStageConfig, RLVRStageConfig
from opsdlab.stages.opsd import run_opsd
from opsdlab.stages.rlvr import run_rlvr


def train_opsd(model, tokenizer, examples, verifier, arm: OPSDStageConfig, stage_dir: Path, *, thinking: bool,
               seed: int, check_examples, rlvr: RLVRStageConfig, label: str = "opsd") -> Path:
    return run_opsd(model, tokenizer, examples, verifier, arm, stage_dir, thinking=thinking, seed=seed,
                    check_examples=check_examples, label=label)


# The arm settings a length-aware RL run takes over from the arm (its budget, optimizer and
# generation settings); the loss settings (loss_type, clipping, KL beta) are the run's `rlvr` section's.
_FROM_ARM = ("max_steps", "max_rollout_tokens", "prompts_per_step", "learning_rate", "lr_scheduler_type",
             "max_completion_length", "temperature", "gradient_accumulation_steps", "gradient_checkpointing",
             "save_steps", "logging_steps", "report_to", "train_problems", *VLLM_FIELDS)


def length_rl_config(arm: OPSDStageConfig, rlvr: RLVRStageConfig) -> RLVRStageConfig:
    """The RLVR settings of a `length_rl` arm: the run's RL loss settings, the arm's budget and
    optimizer, groups of the arm's `rollouts_per_prompt`, DLER's batch-wise reward normalisation and
    dynamic sampling. The arm's held-out check settings carry over too."""
    checks = {f.name: getattr(arm, f.name) for f in fields(CheckSettings)}
    return replace(rlvr, **{name: getattr(arm, name) for name in _FROM_ARM}, **checks,
                   group_size=arm.rollouts_per_prompt, scale_rewards="batch", dynamic_sampling=True)


def train_length_rl(model, tokenizer, examples, verifier, arm: OPSDStageConfig, stage_dir: Path, *, thinking: bool,
                    seed: int, check_examples, rlvr: RLVRStageConfig, label: str = "opsd") -> Path:
    return run_rlvr(model, tokenizer, examples, verifier, length_rl_config(arm, rlvr), stage_dir, thinking=thinking,
                    seed=seed, check_examples=check_examples, length_reward=arm.length_reward,
                    length_target=arm.length_target, length_target_quantile=arm.length_target_quantile,
                    label=label)


# How each method (`config.methods.METHODS`) trains an arm; None: it does not (budget forcing evaluates the start).
TRAINING: dict[str, Callable | None] = {
    "opsd": train_opsd,
    "crisp": train_opsd,
    "contrastive": train_opsd,
    "length_rl": train_length_rl,
    "budget": None,
}
