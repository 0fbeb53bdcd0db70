"""Compaction methods: what an arm does to the starting checkpoint, one named choice per arm (`method:`).

Every method starts from the same checkpoint (the run's last stage, RLVR by default) with the arm's
budget of generated rollouts (`max_steps` x `prompts_per_step` x `rollouts_per_prompt`), and is
evaluated and reported like any other arm:

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

A method may set defaults of the arm's `opsd` settings (`Method.defaults`): the arm's own overrides
still win, so `{method: crisp, gate: correct}` is CRISP on correct rollouts only.

What an arm needs of its training data follows from the prompts its teacher reads: `Method.contexts`
names the arm keys that choose them (`opsd` and `crisp`: teacher_context; `contrastive`: teacher_context
and contrast_context; `length_rl` and `budget`: none), and `prompts.CONTEXT_READS` what each context
shows. `solution_keys` is the result: the default `opsd` arm (solution) and `contrastive` (its
`unrelated` contrast) need a reference solution per problem; `crisp` (concise), `length_rl`, `budget`
and an `answer`-context arm train on problems and answers alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from opsdlab.stages.checks import CheckSettings
from opsdlab.loss.contrastive import VARIANTS
from opsdlab.stages.opsd import OPSDStageConfig, run_opsd
from opsdlab.tasks.prompts import CONTEXT_READS
from opsdlab.stages.rlvr import VLLM_FIELDS, RLVRStageConfig, run_rlvr


@dataclass(frozen=True)
class Method:
    """One compaction method: what it sets by default, and how it trains (None: it does not)."""

    summary: str
    defaults: dict = field(default_factory=dict)
    train: Callable | None = None
    reference: str = ""
    # The arm keys that name the prompt contexts (`prompts.TEACHER_CONTEXTS`) its teacher reads; what
    # each context reads of a problem is `prompts.CONTEXT_READS`.
    contexts: tuple = ("teacher_context",)
    # settings -> further defaults that depend on the arm's other settings (contrastive: its variant's)
    option_defaults: Callable[[dict], dict] | None = None

    @property
    def uses_teacher(self) -> bool:
        """Whether it reads the model under a teacher prompt (the pipeline checks that prompt first)."""
        return bool(self.contexts)

    def defaults_for(self, settings: dict) -> dict:
        """The defaults this method sets for an arm whose settings (before them) are `settings`."""
        return {**self.defaults, **(self.option_defaults(settings) if self.option_defaults else {})}


def train_opsd(model, tokenizer, examples, verifier, arm: OPSDStageConfig, stage_dir: Path, *, thinking: bool,
               seed: int, check_examples, rlvr: RLVRStageConfig, label: str = "opsd") -> Path:
    return run_opsd(model, tokenizer, examples, verifier, arm, stage_dir, thinking=thinking, seed=seed,
                    check_examples=check_examples, label=label)


# The arm settings a length-aware RL run takes over from the arm (its budget, optimizer and
# generation settings); the loss settings (loss_type, clipping, KL beta) are the run's `rlvr` section's.
_FROM_ARM = ("max_steps", "prompts_per_step", "learning_rate", "lr_scheduler_type", "max_completion_length",
             "temperature", "gradient_accumulation_steps", "gradient_checkpointing", "save_steps", "logging_steps",
             "report_to", "train_problems", *VLLM_FIELDS)


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


def _variant_defaults(settings: dict) -> dict:
    """A contrastive arm's defaults from its `contrast_variant` (`contrastive.VARIANTS`); none for an unknown
    name, which the arm's config check then refuses."""
    variant = VARIANTS.get(settings.get("contrast_variant"))
    return variant.defaults if variant is not None else {}


METHODS: dict[str, Method] = {
    "opsd": Method("on-policy self-distillation toward the model reading the reference", train=train_opsd,
                   reference="Kim & Lee 2026"),
    "crisp": Method("self-distillation toward the model told to be concise, teacher refreshed periodically",
                    defaults={"teacher_context": "concise", "divergence": "reverse_kl", "gate": "all",
                              "teacher_weights": "periodic"},
                    train=train_opsd, reference="arXiv 2603.05433"),
    "contrastive": Method("self-distillation on the teacher's reference signal minus its signal under a negative "
                          "context (contrast_variant: another problem's solution, or RLCSD's incorrect sibling)",
                          train=train_opsd, reference="after arXiv 2606.11709",
                          option_defaults=_variant_defaults, contexts=("teacher_context", "contrast_context")),
    "length_rl": Method("RLVR continued with a truncation length penalty", train=train_length_rl,
                        reference="arXiv 2510.15110", contexts=()),
    "budget": Method("no training: responses cut at a token budget, the answer forced", train=None, contexts=()),
}


def check_method(name: str, where: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"{where}: method must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]


def method_of(arm_overrides: dict, section: OPSDStageConfig, where: str) -> Method:
    """The method an arm names (its own `method`, else the `opsd` section's)."""
    return check_method(str(arm_overrides.get("method", section.method)), where)


def check_arm(arm: OPSDStageConfig, where: str) -> None:
    """What a method needs of an arm's settings, checked before anything runs."""
    if arm.method == "length_rl":
        from opsdlab.loss.rewards import LENGTH_REWARDS

        if arm.length_reward not in LENGTH_REWARDS:
            raise ValueError(f"{where}: length_reward must be one of {sorted(LENGTH_REWARDS)}, got {arm.length_reward!r}")
        if arm.rollouts_per_prompt < 2:
            raise ValueError(f"{where}: method length_rl is group-relative RL; it needs rollouts_per_prompt >= 2")
    if arm.method == "contrastive":
        try:
            VARIANTS[arm.contrast_variant].check(arm)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from error


def solution_keys(arm: OPSDStageConfig) -> list[str]:
    """The arm's keys (`key=context`) whose teacher prompt reads each training problem's reference
    solution (`prompts.CONTEXT_READS`); empty when the arm trains on problem + answer data."""
    return [f"{key}={getattr(arm, key)}" for key in METHODS[arm.method].contexts
            if CONTEXT_READS[getattr(arm, key)] == "solution"]
